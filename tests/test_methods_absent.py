"""Absent-class calibration (γ, AUSUC, seen/absent accuracies) vs brute-force NumPy sweeps."""
import chex
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np

from glajax import GlajaxError
from glajax import methods as M

ABSENT = np.array([False, False, True, False, True, True, False])   # U = {2, 4, 5}


def _problem(seed, num_samples=150, round_to=None):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 7, num_samples)
  logits = 2.0 * rng.normal(size=(num_samples, 7))
  logits[np.arange(num_samples), labels] += 2.0
  logits[:, ~ABSENT] += 1.5   # fine-tuned: seen classes dominate
  if round_to:
    logits = np.round(logits / round_to) * round_to   # many ties of δ
  return logits.astype(np.float32), labels.astype(np.int32)


def _accuracies(logits, labels, gamma):
  """(Acc_{S/Y}, Acc_{U/Y}, Acc_{Y/Y}) after adding γ to the absent logits, by argmax."""
  hits = (logits + gamma * ABSENT).argmax(axis=1) == labels
  label_absent = ABSENT[labels]
  return hits[~label_absent].mean(), hits[label_absent].mean(), hits.mean()


def _brute_force_gammas(logits, labels):
  """Candidate γ: ±∞ and the midpoints between consecutive distinct flip points δ_i."""
  z = logits.astype(np.float64)
  delta = np.unique(z[:, ~ABSENT].max(axis=1) - z[:, ABSENT].max(axis=1))
  return np.concatenate([[-1e9], (delta[:-1] + delta[1:]) / 2, [1e9]])


class AbsentClassTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_apply_and_alg_gamma(self):
    logits, labels = _problem(0)
    labels = np.array([0, 1, 3, 6])[labels % 4]   # fine-tuning data: seen labels only
    np.testing.assert_allclose(self.variant(M.apply_gamma)(logits, ABSENT, 1.25),
                               logits + 1.25 * ABSENT, atol=1e-6)
    seen = np.flatnonzero(~ABSENT)
    expected = np.mean([np.mean([z[c] for c in seen if c != y]) for z, y in zip(logits, labels)])
    expected -= logits[:, ABSENT].mean()
    np.testing.assert_allclose(self.variant(M.alg_gamma)(logits, labels, ABSENT), expected,
                               atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_seen_absent_accuracies(self):
    logits, labels = _problem(1)
    result = self.variant(M.seen_absent_accuracies)(logits, labels, ABSENT)
    label_absent = ABSENT[labels]
    s, u, y = _accuracies(logits, labels, 0.0)
    seen_only = np.where(ABSENT, -np.inf, logits).argmax(1) == labels
    absent_only = np.where(ABSENT, logits, -np.inf).argmax(1) == labels
    expected = {"acc_y_y": y, "acc_s_y": s, "acc_u_y": u,
                "acc_s_s": seen_only[~label_absent].mean(),
                "acc_u_u": absent_only[label_absent].mean()}
    for key, value in expected.items():
      np.testing.assert_allclose(result[key], value, atol=1e-6, err_msg=key)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ausuc_and_oracle_match_brute_force_sweep(self):
    ausuc = self.variant(lambda z, y: M.ausuc(z, y, ABSENT, return_curve=True))
    oracle_gamma = self.variant(lambda z, y: M.oracle_gamma(z, y, ABSENT))
    for seed, round_to in ((2, None), (3, 0.5)):
      logits, labels = _problem(seed, round_to=round_to)
      gammas = _brute_force_gammas(logits, labels)
      points = np.array([_accuracies(logits, labels, g) for g in gammas])
      expected_area = np.trapezoid(points[:, 1], points[:, 0]) * -1   # seen decreases with γ
      area, curve = ausuc(logits, labels)
      np.testing.assert_allclose(area, expected_area, atol=1e-6)
      self.assertEqual(curve["seen"].shape, (len(labels) + 1,))
      np.testing.assert_allclose([curve["seen"][0], curve["absent"][0]], points[0, :2], atol=1e-7)
      np.testing.assert_allclose([curve["seen"][-1], curve["absent"][-1]], points[-1, :2],
                                 atol=1e-7)
      oracle = oracle_gamma(logits, labels)
      np.testing.assert_allclose(_accuracies(logits, labels, float(oracle))[2], points[:, 2].max(),
                                 atol=1e-9)

  @hypothesis.settings(max_examples=5, deadline=None, derandomize=True)
  @hypothesis.given(seed=st.integers(0, 10_000), offset=st.floats(-5.0, 5.0))
  def test_ausuc_of_perfect_model_is_one(self, seed, offset):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, 60).astype(np.int32)
    logits = rng.normal(size=(60, 7)).astype(np.float32)
    logits[np.arange(60), labels] += 10.0
    logits[:, ABSENT] += offset   # any miscalibration of the absent block is swept away
    labels[:2] = [0, 2]   # both seen and absent samples present
    logits[0, 0], logits[1, 2] = 20.0, 20.0
    np.testing.assert_allclose(M.ausuc(logits, labels, ABSENT), 1.0, atol=1e-6)

  def test_pcv_gamma(self):
    splits, expected = [], []
    for seed in range(3):
      logits, labels = _problem(10 + seed)
      source = 0.4
      gammas = _brute_force_gammas(logits, labels)
      points = np.array([_accuracies(logits, labels, g) for g in gammas])
      feasible = points[:, 1] >= source - 1e-12
      assert feasible.any()
      best = np.where(feasible, points[:, 2], -1).max()
      splits.append((logits, labels, ABSENT, source))
      expected.append(best)
    gamma = M.pcv_gamma(splits)
    single = [float(M.pcv_gamma([split])) for split in splits]
    np.testing.assert_allclose(gamma, np.mean(single), rtol=1e-6)
    for (logits, labels, _, source), g, best in zip(splits, single, expected):
      s, u, y = _accuracies(logits, labels, g)
      assert u >= source and abs(y - best) < 1e-9

  def test_errors(self):
    logits, labels = _problem(4, num_samples=20)
    with self.assertRaisesRegex(GlajaxError, "empty absent set"):
      M.ausuc(logits, labels, np.zeros(7, bool))
    with self.assertRaisesRegex(GlajaxError, "every class marked absent"):
      M.apply_gamma(logits, np.ones(7, bool), 1.0)
    with self.assertRaisesRegex(GlajaxError, "boolean mask"):
      M.alg_gamma(logits, labels, ABSENT.astype(np.int32))
    with self.assertRaisesRegex(GlajaxError, "seen classes only"):
      M.alg_gamma(logits, np.full(20, 2, np.int32), ABSENT)
    with self.assertRaisesRegex(GlajaxError, "both seen and absent"):
      M.ausuc(logits, np.zeros(20, np.int32), ABSENT)
    with self.assertRaisesRegex(GlajaxError, "pseudo split"):
      M.pcv_gamma([])
    with self.assertRaisesRegex(GlajaxError, "finite"):
      M.oracle_gamma(logits * np.nan, labels, ABSENT)
    self.assertEqual(M.apply_gamma(jnp.asarray(logits, jnp.bfloat16), ABSENT, 1.0).dtype,
                     jnp.float32)

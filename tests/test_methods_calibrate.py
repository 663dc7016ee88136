"""Temperature scaling and the ECE family vs plain NumPy loops and SciPy."""
import chex
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from absl.testing import parameterized

from glajax import GlajaxError
from glajax import methods as M


def _problem(seed, num_samples=500, num_classes=6, scale=2.5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_samples)
  logits = scale * rng.normal(size=(num_samples, num_classes))
  logits[np.arange(num_samples), labels] += 1.5
  return logits.astype(np.float32), labels.astype(np.int32)


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _ece_loop(confidence, correct, edges):
  """ECE with explicit (lo, hi] bins: Σ_b n_b/N |acc_b − conf_b|; also per-bin gaps."""
  total, gaps = 0.0, []
  for lo, hi in zip(edges[:-1], edges[1:]):
    in_bin = (confidence > lo) & (confidence <= hi)
    if in_bin.any():
      gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
      total += in_bin.sum() / len(confidence) * gap
      gaps.append(gap)
  return total, gaps


def _carot_per_batch_ece(logits, labels, batch_size, n_bins):
  """MLAI-Yonsei/CaRot src/models/eval.py ``eval_single_dataset``: per unshuffled batch, a fresh
  ``MulticlassCalibrationError(num_classes, n_bins=10, norm='l1')`` on softmax probabilities
  (torchmetrics' top-label binning: bucketize on linspace(0, 1, n_bins + 1), bins (lo, hi]),
  ``tot_ece += ece * logits.shape[0]``; then ``tot_ece / n``."""
  import torch  # pylint: disable=import-outside-toplevel
  tot_ece, n = 0.0, 0
  boundaries = torch.linspace(0, 1, n_bins + 1)
  for start in range(0, len(labels), batch_size):
    batch_logits = torch.from_numpy(logits[start:start + batch_size])
    y = torch.from_numpy(labels[start:start + batch_size]).long()
    prob = torch.softmax(batch_logits, dim=1)
    confidences, predictions = prob.max(dim=1)
    accuracies = predictions.eq(y).float()
    indices = torch.bucketize(confidences, boundaries) - 1
    count = torch.zeros(n_bins).scatter_add_(0, indices, torch.ones_like(confidences))
    conf = torch.nan_to_num(torch.zeros(n_bins).scatter_add_(0, indices, confidences) / count)
    acc = torch.nan_to_num(torch.zeros(n_bins).scatter_add_(0, indices, accuracies) / count)
    ece = torch.sum(torch.abs(acc - conf) * count / count.sum())
    tot_ece += ece * batch_logits.shape[0]
    n += y.size(0)
  return float(tot_ece / n)


def _top_label(logits, labels):
  probs = _softmax(logits)
  return probs.max(axis=1), (logits.argmax(axis=1) == labels).astype(np.float64)


class CalibrationMetricsTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(15, 10)
  def test_ece_and_mce(self, num_bins):
    logits, labels = _problem(0)
    confidence, correct = _top_label(logits, labels)
    expected, gaps = _ece_loop(confidence, correct, np.linspace(0, 1, num_bins + 1))
    np.testing.assert_allclose(self.variant(lambda z, y: M.ece(z, y, num_bins))(logits, labels),
                               expected, atol=1e-5)
    np.testing.assert_allclose(self.variant(lambda z, y: M.mce(z, y, num_bins))(logits, labels),
                               max(gaps), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_batch_ece_weighted_by_batch_size_as_carot(self):
    logits, labels = _problem(1)
    per_batch = self.variant(lambda z, y: M.ece(z, y, 10, per_batch=128))(logits, labels)
    np.testing.assert_allclose(per_batch, _carot_per_batch_ece(logits, labels, 128, 10),
                               atol=1e-6)
    # Batches 128, 128, 128, 116: the size weighting differs from a plain mean of batch ECEs.
    plain = np.mean([_ece_loop(*_top_label(logits[s:s + 128], labels[s:s + 128]),
                               np.linspace(0, 1, 11))[0] for s in range(0, 500, 128)])
    assert abs(float(per_batch) - plain) > 1e-6
    # One batch: the whole-set ECE.
    np.testing.assert_allclose(M.ece(logits, labels, 10, per_batch=500), M.ece(logits, labels, 10),
                               atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_adaptive_ece(self):
    logits, labels = _problem(2)
    confidence, correct = _top_label(logits, labels)
    order = np.argsort(confidence, kind="stable")
    expected = sum(abs(correct[chunk].sum() - confidence[chunk].sum())
                   for chunk in np.array_split(order, 15)) / len(order)
    np.testing.assert_allclose(self.variant(M.adaptive_ece)(logits, labels), expected, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_classwise_ece(self):
    logits, labels = _problem(3)
    probs = _softmax(logits)
    expected = np.mean([_ece_loop(probs[:, c], (labels == c).astype(float),
                                  np.linspace(0, 1, 16))[0] for c in range(6)])
    # a probability of exactly 0 falls in the first bin in glajax, outside (0, 1/15] here.
    assert (probs > 0).all()
    np.testing.assert_allclose(self.variant(M.classwise_ece)(logits, labels), expected, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nll_brier_reliability(self):
    logits, labels = _problem(4)
    probs = _softmax(logits)
    np.testing.assert_allclose(self.variant(M.nll)(logits, labels),
                               -np.log(probs[np.arange(500), labels]).mean(), rtol=1e-5)
    np.testing.assert_allclose(self.variant(M.brier)(logits, labels),
                               ((probs - np.eye(6)[labels]) ** 2).sum(1).mean(), rtol=1e-5)
    diagram = self.variant(lambda z, y: M.reliability_diagram(z, y, 5))(logits, labels)
    confidence, correct = _top_label(logits, labels)
    for b, (lo, hi) in enumerate(zip(np.linspace(0, 1, 6)[:-1], np.linspace(0, 1, 6)[1:])):
      in_bin = (confidence > lo) & (confidence <= hi)
      self.assertEqual(int(diagram["count"][b]), in_bin.sum())
      if in_bin.any():
        np.testing.assert_allclose(diagram["confidence"][b], confidence[in_bin].mean(), atol=1e-5)
        np.testing.assert_allclose(diagram["accuracy"][b], correct[in_bin].mean(), atol=1e-6)
    np.testing.assert_allclose(diagram["bin_upper"], np.linspace(0, 1, 6)[1:], atol=1e-7)

  @hypothesis.settings(max_examples=2, deadline=None, derandomize=True)
  @hypothesis.given(seed=st.integers(0, 1000))
  def test_ece_of_calibrated_simulation_tends_to_zero(self, seed):
    """Labels drawn from the model's own softmax: ECE shrinks like 1/√N."""
    rng = np.random.default_rng(seed)
    errors = []
    for num_samples in (1_000, 50_000):
      logits = (2.0 * rng.normal(size=(num_samples, 5))).astype(np.float32)
      probs = _softmax(logits)
      labels = (probs.cumsum(axis=1) < rng.random((num_samples, 1))).sum(axis=1)
      errors.append(float(M.ece(logits, np.minimum(labels, 4).astype(np.int32))))
    assert errors[1] < 0.012
    assert errors[1] < errors[0]


class FitTemperatureTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_scipy(self):
    logits, labels = _problem(5, scale=5.0)   # over-confident: T > 1

    def nll(t):
      return -np.log(_softmax(logits / t)[np.arange(500), labels]).mean()

    expected = scipy.optimize.minimize_scalar(nll, bounds=(0.01, 100), method="bounded",
                                              options={"xatol": 1e-8}).x
    temperature = self.variant(M.fit_temperature)(logits, labels)
    np.testing.assert_allclose(temperature, expected, rtol=1e-3)
    assert float(temperature) > 1.0
    bf16 = M.fit_temperature(jnp.asarray(logits, jnp.bfloat16), labels)
    self.assertEqual(bf16.dtype, jnp.float32)


class BadInputTest(parameterized.TestCase):

  def test_errors(self):
    logits, labels = _problem(6, num_samples=20)
    with self.assertRaisesRegex(GlajaxError, "num_bins"):
      M.ece(logits, labels, num_bins=0)
    with self.assertRaisesRegex(GlajaxError, "per_batch"):
      M.ece(logits, labels, per_batch=0)
    with self.assertRaisesRegex(GlajaxError, "labels"):
      M.nll(logits, labels[:10])
    with self.assertRaisesRegex(GlajaxError, "finite"):
      M.brier(np.full_like(logits, np.inf), labels)
    with self.assertRaisesRegex(GlajaxError, "\\[0, 6\\)"):
      M.fit_temperature(logits, labels + 6)

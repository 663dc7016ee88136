"""Logit adjustment, GLA/backdoor ensembles, WiSE-FT and output ensembles vs NumPy."""
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from glajax import GlajaxError
from glajax import methods as M


def _logits(seed, shape=(12, 5)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class AdjustTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_logit_adjust(self):
    z, prior = _logits(0), _log_softmax(_logits(1, (5,)))
    out = self.variant(lambda a, b: M.logit_adjust(a, b, tau=0.5))(z, prior)
    np.testing.assert_allclose(out, z - 0.5 * prior, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_logit_adjusted_loss(self):
    z, prior = _logits(2), _log_softmax(_logits(3, (5,)))
    labels = np.arange(12) % 5
    loss = self.variant(lambda a, y, b: M.logit_adjusted_loss(a, y, b, tau=1.5))(z, labels, prior)
    expected = -_log_softmax(z + 1.5 * prior)[np.arange(12), labels].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    bf16 = M.logit_adjusted_loss(jnp.asarray(z, jnp.bfloat16), labels, prior)
    self.assertEqual(bf16.dtype, jnp.float32)
    np.testing.assert_allclose(bf16, -_log_softmax(np.asarray(jnp.asarray(z, jnp.bfloat16),
                                                              np.float32) + prior)
                               [np.arange(12), labels].mean(), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gla_ensemble(self):
    ft, zs = _logits(4), _logits(5)
    zs_prior, ft_prior, target = (_log_softmax(_logits(s, (5,))) for s in (6, 7, 8))
    ensemble = self.variant(lambda *a: M.gla_ensemble(*a, ft_temperature=2.0))
    np.testing.assert_allclose(ensemble(ft, zs, zs_prior, ft_prior, target),
                               ft / 2.0 - ft_prior + zs - zs_prior + target, atol=1e-5)
    np.testing.assert_allclose(self.variant(M.gla_ensemble)(ft, zs, zs_prior),
                               ft + zs - zs_prior, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_backdoor_ensemble(self):
    logits = [_logits(s) for s in range(3)]
    np.testing.assert_allclose(self.variant(M.backdoor_ensemble)(logits), sum(logits), atol=1e-5)

  def test_errors(self):
    z = _logits(0)
    with self.assertRaisesRegex(GlajaxError, "log_prior: expected shape"):
      M.logit_adjust(z, np.zeros(4, np.float32))
    with self.assertRaisesRegex(GlajaxError, "zs_logits: expected shape"):
      M.gla_ensemble(z, z[:-1], np.zeros(5, np.float32))
    with self.assertRaisesRegex(GlajaxError, "empty"):
      M.backdoor_ensemble([])
    with self.assertRaisesRegex(GlajaxError, "logits_list\\[1\\]"):
      M.backdoor_ensemble([z, z[:, :4]])
    with self.assertRaisesRegex(GlajaxError, "labels"):
      M.logit_adjusted_loss(z, np.full(12, 7), np.zeros(5, np.float32))


def _params(seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {"encoder": {"kernel": rng.normal(size=(3, 4)).astype(dtype),
                      "bias": rng.normal(size=(4,)).astype(dtype)},
          "head": [rng.normal(size=(4, 2)).astype(dtype)], "step": np.int32(7)}


class WiseFtTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_interpolation(self):
    p0, p1 = _params(0), _params(1)
    merged = self.variant(M.wise_ft)(p0, p1, 0.3)
    expected = jax.tree.map(lambda a, b: (0.7 * a + 0.3 * b).astype(a.dtype), p0, p1)
    expected["step"] = np.int32(7)
    chex.assert_trees_all_close(merged, expected, atol=1e-6)
    chex.assert_trees_all_equal_dtypes(merged, p0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fisher_merge(self):
    p0, p1 = _params(0), _params(1)
    f0 = jax.tree.map(lambda a: np.abs(np.asarray(a, np.float32)), _params(2))
    f1 = jax.tree.map(lambda a: np.abs(np.asarray(a, np.float32)), _params(3))
    merged = self.variant(lambda a, b, c, d: M.wise_ft(a, b, 0.4, fisher=(c, d)))(p0, p1, f0, f1)
    k0, k1 = p0["encoder"]["kernel"], p1["encoder"]["kernel"]
    c0 = 0.6 * np.maximum(f0["encoder"]["kernel"], 1e-8)
    c1 = 0.4 * np.maximum(f1["encoder"]["kernel"], 1e-8)
    np.testing.assert_allclose(merged["encoder"]["kernel"], (c0 * k0 + c1 * k1) / (c0 + c1),
                               rtol=1e-5)

  @hypothesis.settings(max_examples=5, deadline=None, derandomize=True)
  @hypothesis.given(seed=st.integers(0, 1000), bf16=st.booleans())
  def test_endpoints(self, seed, bf16):
    dtype = jnp.bfloat16 if bf16 else np.float32
    p0, p1 = (jax.tree.map(lambda a: jnp.asarray(a, dtype) if a.ndim else a, _params(s))
              for s in (seed, seed + 1))
    chex.assert_trees_all_equal(M.wise_ft(p0, p1, 0.0), p0)
    chex.assert_trees_all_equal(M.wise_ft(p0, p1, 1.0), p1 | {"step": p0["step"]})

  def test_errors(self):
    p0 = _params(0)
    bad = _params(1)
    bad["encoder"]["kernel"] = bad["encoder"]["kernel"][:2]
    bad["head"].append(np.zeros(1, np.float32))
    bad["encoder"]["bias"] = bad["encoder"]["bias"].astype(np.float64)
    with self.assertRaisesRegex(GlajaxError, "3 mismatches") as context:
      M.wise_ft(p0, bad, 0.5)
    for path in ("['encoder']['kernel']", "['encoder']['bias']", "['head'][1]"):
      self.assertIn(path, str(context.exception))
    for alpha in (-0.1, 1.5):
      with self.assertRaisesRegex(GlajaxError, "alpha"):
        M.wise_ft(p0, _params(1), alpha)
    with self.assertRaisesRegex(GlajaxError, "non-floating"):
      M.wise_ft(p0, _params(1) | {"step": np.int32(8)}, 0.5)
    with self.assertRaisesRegex(GlajaxError, "fisher"):
      M.wise_ft(p0, _params(1), 0.5, fisher=_params(2))


class OutputEnsembleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_logits_and_probs(self):
    z0, z1 = _logits(0), _logits(1)
    mixed = self.variant(lambda a, b: M.output_ensemble(a, b, 0.25))(z0, z1)
    np.testing.assert_allclose(mixed, 0.75 * z0 + 0.25 * z1, atol=1e-6)
    probs = self.variant(lambda a, b: M.output_ensemble(a, b, 0.25, space="probs"))(z0, z1)
    np.testing.assert_allclose(probs, 0.75 * np.exp(_log_softmax(z0))
                               + 0.25 * np.exp(_log_softmax(z1)), atol=1e-6)

  def test_errors(self):
    with self.assertRaisesRegex(GlajaxError, "alpha"):
      M.output_ensemble(_logits(0), _logits(1), 2.0)
    with self.assertRaisesRegex(GlajaxError, "space"):
      M.output_ensemble(_logits(0), _logits(1), 0.5, space="features")
    with self.assertRaisesRegex(GlajaxError, "logits_1"):
      M.output_ensemble(_logits(0), _logits(1)[:3], 0.5)

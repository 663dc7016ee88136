"""Label-prior estimation (GLA) against SciPy, NumPy and a simulation with a known prior."""
import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from absl.testing import parameterized

from glajax import GlajaxError
from glajax import methods as M


def _random_problem(seed, num_samples=600, num_classes=8, scale=3.0):
  rng = np.random.default_rng(seed)
  labels = np.arange(num_samples) % num_classes
  logits = scale * rng.normal(size=(num_samples, num_classes))
  logits[np.arange(num_samples), labels] += 2.0
  logits += np.linspace(2.0, -2.0, num_classes)
  return logits.astype(np.float32), labels.astype(np.int32)


def _overconfident_problem(seed, num_samples=400, num_classes=10):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_samples)
  logits = 60.0 * rng.normal(size=(num_samples, num_classes))
  logits[np.arange(num_samples), labels] += 40.0
  return logits.astype(np.float32), labels.astype(np.int32)


def _official_gla_search(logits, labels, thres):
  """BeierZhu/GLA GLA.FS.public trainers/util.py ``Calibrater.search_T`` / ``search_recurse``
  (confidences and accuracy in percent, float32 torch softmax, Python-float temperatures)."""
  import torch  # pylint: disable=import-outside-toplevel
  logits_t = torch.from_numpy(logits)
  acc = 100.0 * (logits_t.argmax(dim=1) == torch.from_numpy(labels)).float().mean().item()

  def compute_confidence(t):
    probability = torch.softmax(logits_t / t, dim=-1)
    confidence, _ = torch.max(probability, dim=-1)
    return 100 * confidence.mean().item()

  def search_recurse(t_min, t_max):
    conf_min = compute_confidence(t_min)
    gap_min = abs(conf_min - acc)
    conf_max = compute_confidence(t_max)
    gap_max = abs(conf_max - acc)
    alpha = gap_min / (gap_min + gap_max)
    t_mid = t_min * (1 - alpha) + t_max * alpha
    conf_mid = compute_confidence(t_mid)
    gap_mid = abs(conf_mid - acc)
    if gap_mid <= thres:
      return t_mid, conf_mid
    if conf_max > acc:
      t_max *= 1.1
    elif conf_min < acc:
      t_min /= 1.1
    elif gap_min < gap_max:
      t_max = t_mid
    else:
      t_min = t_mid
    return search_recurse(t_min, t_max)

  t_best, confidence = search_recurse(0.1, 10)
  return t_best, confidence, acc


def _normalise(v):
  v = np.asarray(v, np.float64)
  return v - np.log(np.exp(v - v.max()).sum()) - v.max()


def _scipy_log_prior(logits, labels):
  """argmin_θ mean CE(z − θ, y) with SciPy BFGS in float64, then normalise(θ + log freq)."""
  z = logits.astype(np.float64)
  num_samples, num_classes = z.shape
  freq = np.bincount(labels, minlength=num_classes) / num_samples

  def value_and_grad(theta):
    shifted = z - theta
    top = shifted.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(shifted - top).sum(axis=1))
    probs = np.exp(shifted - lse[:, None])
    value = np.mean(lse - shifted[np.arange(num_samples), labels])
    return value, freq - probs.mean(axis=0)

  result = scipy.optimize.minimize(value_and_grad, np.zeros(num_classes), jac=True,
                                   method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
  return _normalise(result.x + np.log(freq))


def _numpy_residual(logits, labels, log_prior):
  z = logits.astype(np.float64)
  freq = np.bincount(labels, minlength=z.shape[1]) / z.shape[0]
  shifted = z - (np.asarray(log_prior, np.float64) - np.log(freq))
  probs = np.exp(shifted - shifted.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  return np.abs(probs.mean(axis=0) - freq).max()


class EstimateLogPriorTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_newton_matches_scipy(self):
    self._check_against_scipy(self.variant(
        lambda z, y: M.estimate_log_prior(z, y, return_info=True)))

  @parameterized.parameters(("lbfgs", "auto"), ("fixed_point", "auto"), ("newton", "pallas"),
                            ("fixed_point", "pallas"))
  def test_other_solvers_match_scipy(self, solver, implementation):
    self._check_against_scipy(jax.jit(functools.partial(
        M.estimate_log_prior, solver=solver, implementation=implementation, return_info=True)))

  def _check_against_scipy(self, estimate):
    logits, labels = _random_problem(0)
    log_prior, info = estimate(logits, labels)
    expected = _scipy_log_prior(logits, labels)
    np.testing.assert_allclose(log_prior, expected, atol=2e-4)
    self.assertAlmostEqual(float(jax.nn.logsumexp(log_prior)), 0.0, delta=1e-5)
    self.assertLess(float(info["residual"]), 1e-5)
    self.assertAlmostEqual(float(info["residual"]), _numpy_residual(logits, labels, log_prior),
                           delta=2e-6)
    self.assertGreater(int(info["iterations"]), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gla_reference_matches_numpy_sgd(self):
    logits, labels = _random_problem(1)
    steps = 30
    estimate = self.variant(lambda z, y: M.estimate_log_prior(
        z, y, solver="gla_reference", max_iter=steps, return_info=True))
    log_prior, info = estimate(logits, labels)
    z = logits.astype(np.float64)
    num_samples, num_classes = z.shape
    freq = np.bincount(labels, minlength=num_classes) / num_samples
    q = np.full(num_classes, 1.0 / num_classes)
    learning_rate = 1e-5 * (num_samples / num_classes) / 50
    for _ in range(steps):   # d/dq mean CE(z − log q, y) = (freq − p̄) / q
      shifted = z - np.log(q)
      probs = np.exp(shifted - shifted.max(axis=1, keepdims=True))
      probs /= probs.sum(axis=1, keepdims=True)
      q = q - learning_rate * (freq - probs.mean(axis=0)) / q
    np.testing.assert_allclose(log_prior, _normalise(np.log(q) + np.log(freq)), atol=1e-5)
    self.assertEqual(int(info["iterations"]), steps)

  def test_float_temperature_equals_scaled_logits(self):
    logits, labels = _random_problem(2)
    np.testing.assert_allclose(M.estimate_log_prior(logits, labels, temperature=2.5),
                               M.estimate_log_prior(logits / 2.5, labels), atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gla_temperature_search_matches_the_official_recursion(self):
    cases = [(_random_problem(3, scale=2.0), 0.1, lambda t: 0.1 < t < 10),
             (_random_problem(3, scale=2.0), 1.0, lambda t: 0.1 < t < 10),
             # overconfident: 60·normal logits, ~30 % accuracy: the answer lies above 10
             (_overconfident_problem(5), 0.1, lambda t: t > 10),
             (_overconfident_problem(6), 1.0, lambda t: t > 10)]
    for (logits, labels), tol, expected_range in cases:
      search = self.variant(functools.partial(M.match_confidence_temperature, tol=tol))
      got = float(search(logits, labels))
      want, want_confidence, accuracy = _official_gla_search(logits, labels, tol)
      assert expected_range(want), want
      np.testing.assert_allclose(got, want, rtol=1e-4)
      z = logits.astype(np.float64) / got
      confidence = 100 * (np.exp(z - z.max(1, keepdims=True)) /
                          np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)).max(1).mean()
      assert abs(confidence - accuracy) <= tol + 1e-3
      np.testing.assert_allclose(confidence, want_confidence, atol=1e-3)
    _, info = M.estimate_log_prior(*_overconfident_problem(5), temperature="match_confidence",
                                   return_info=True)
    np.testing.assert_allclose(info["temperature"],
                               _official_gla_search(*_overconfident_problem(5), 0.1)[0], rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_match_confidence_temperature_bisection_against_brentq(self):
    logits, labels = _random_problem(3, scale=2.0)
    temperature = self.variant(functools.partial(M.match_confidence_temperature,
                                                 search="bisection"))(logits, labels)
    z = logits.astype(np.float64)
    accuracy = np.mean(z.argmax(axis=1) == labels)

    def gap(t):
      scaled = z / t
      probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
      return (probs / probs.sum(axis=1, keepdims=True)).max(axis=1).mean() - accuracy

    expected = scipy.optimize.brentq(gap, 0.1, 10.0, xtol=1e-10)
    np.testing.assert_allclose(temperature, expected, rtol=1e-4)

  def test_bfloat16_input_is_computed_in_float32(self):
    logits, labels = _random_problem(4)
    as_bf16 = jnp.asarray(logits, jnp.bfloat16)
    log_prior = M.estimate_log_prior(as_bf16, labels)
    self.assertEqual(log_prior.dtype, jnp.float32)
    np.testing.assert_allclose(log_prior,
                               M.estimate_log_prior(as_bf16.astype(jnp.float32), labels),
                               atol=1e-6)

  @hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
  @hypothesis.given(seed=st.integers(0, 10_000), shift=st.floats(-20.0, 20.0))
  def test_shift_invariance(self, seed, shift):
    """Per-sample constants change nothing; a class offset v moves log π_p by v (normalised)."""
    logits, labels = _random_problem(seed)
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=8).astype(np.float32)
    base = M.estimate_log_prior(logits, labels)
    per_sample = logits + shift * rng.random((600, 1)).astype(np.float32)
    np.testing.assert_allclose(M.estimate_log_prior(per_sample, labels), base, atol=2e-4)
    np.testing.assert_allclose(M.estimate_log_prior(logits + offset, labels),
                               _normalise(np.asarray(base) + offset), atol=2e-4)


def _gaussian_bayes_logits(rng, num_samples, class_probs, log_prior, means):
  """x | y ~ N(μ_y, I); Bayes logits of a model whose prior is π: −‖x − μ_c‖²/2 + log π_c."""
  labels = rng.choice(len(class_probs), size=num_samples, p=class_probs)
  x = means[labels] + rng.normal(size=(num_samples, means.shape[1]))
  logits = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1) + log_prior
  return logits.astype(np.float32), labels.astype(np.int32)


@pytest.mark.parametrize("estimation_data", ["balanced", "imbalanced"])
def test_recovers_known_prior_of_simulated_model(estimation_data):
  """Simulated ground truth: 10 classes, π_c ∝ exp(−0.4c) (ratio 37), N = 20 000.

  Measured (error = max_c |log π̂_c − log π_c|): balanced data corr 0.99934, error 0.066;
  imbalanced data (reversed long tail, 176 to 6590 samples a class) corr 0.99962, error 0.072;
  residual 8e-8 and 2e-7 (newton, 5 steps).
  """
  rng = np.random.default_rng(0)
  num_classes = 10
  means = 1.2 * rng.normal(size=(num_classes, 6))
  true_prior = np.exp(-0.4 * np.arange(num_classes))
  true_prior /= true_prior.sum()
  class_probs = (np.full(num_classes, 1 / num_classes) if estimation_data == "balanced"
                 else true_prior[::-1])
  if estimation_data == "imbalanced":
    _gaussian_bayes_logits(rng, 20_000, np.full(num_classes, 1 / num_classes),
                           np.log(true_prior), means)   # same stream as the balanced case
  logits, labels = _gaussian_bayes_logits(rng, 20_000, class_probs, np.log(true_prior), means)
  log_prior, info = M.estimate_log_prior(logits, labels, return_info=True)
  error = np.abs(np.asarray(log_prior) - np.log(true_prior)).max()
  assert np.corrcoef(log_prior, np.log(true_prior))[0, 1] > 0.998
  assert error < 0.12
  assert float(info["residual"]) < 1e-5
  # Ignoring the data-frequency correction would be off by log freq on imbalanced data.
  if estimation_data == "imbalanced":
    uncorrected = _normalise(np.asarray(log_prior) - np.log(np.bincount(labels) / len(labels)))
    assert np.abs(uncorrected - np.log(true_prior)).max() > 1.0


class BadInputTest(parameterized.TestCase):

  def test_errors(self):
    logits, labels = _random_problem(5, num_samples=40, num_classes=4)
    cases = [
        (dict(logits=logits[:, :, None], labels=labels), "rank 2"),
        (dict(logits=logits, labels=labels[:-1]), "shape \\(40,\\)"),
        (dict(logits=logits, labels=labels.astype(np.float32)), "integer"),
        (dict(logits=logits, labels=np.where(labels == 0, 4, labels)), "\\[0, 4\\)"),
        (dict(logits=logits, labels=np.where(labels == 3, 2, labels)), "missing classes"),
        (dict(logits=np.where(np.eye(40, 4) > 0, np.nan, logits), labels=labels), "finite"),
        (dict(logits=logits.astype(np.int32), labels=labels), "floating"),
        (dict(logits=logits, labels=labels, solver="adam"), "solver"),
        (dict(logits=logits, labels=labels, num_classes=5), "num_classes"),
        (dict(logits=logits, labels=labels, temperature="auto"), "temperature"),
        (dict(logits=logits, labels=labels, temperature=-1.0), "temperature"),
        (dict(logits=logits, labels=labels, implementation="cuda"), "implementation"),
        (dict(logits=logits, labels=labels, solver="lbfgs", implementation="pallas"),
         "implementation.*'pallas' serves newton"),
        (dict(logits=np.zeros((40, 9000), np.float32), labels=np.arange(40) % 9000,
              implementation="pallas"), "implementation"),
    ]
    for kwargs, message in cases:
      with self.assertRaisesRegex(GlajaxError, message):
        M.estimate_log_prior(**kwargs)

  def test_missing_class_under_jit_is_nan_not_a_silent_number(self):
    logits, labels = _random_problem(5, num_samples=40, num_classes=4)
    estimate = jax.jit(functools.partial(M.estimate_log_prior, solver="fixed_point"))(
        logits, np.where(labels == 3, 2, labels))
    assert np.isnan(estimate).all()


def _matrix_reductions(jaxpr, shape):
  """For every while_loop body (inner loops first): how many reductions read an array of
  ``shape`` (each is one memory-bound pass over E once XLA fuses its elementwise producers
  into it; nested loops counted on their own), and how many arrays of that shape the loop
  carries or closes over (1: E itself, nothing else of that size lives across iterations)."""
  loops = []

  def reads(jaxpr):
    count = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "while":
        body = eqn.params["body_jaxpr"].jaxpr
        held = sum(getattr(v.aval, "shape", None) == shape for v in eqn.invars)
        loops.append((reads(body), held, reads(eqn.params["cond_jaxpr"].jaxpr)))
        continue
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        count += reads(sub)
      if eqn.primitive.name in ("reduce_sum", "reduce_max", "reduce_min", "dot_general"):
        count += any(getattr(v.aval, "shape", None) == shape for v in eqn.invars)
    return count

  reads(jaxpr)
  return loops


def test_newton_reads_the_matrix_in_fused_passes():
  """Issue 14: the solve reads E in passes, one per reduction, and keeps no other (N, C) array;
  ``passes`` counts them: 2 to start, then per Newton step 2 per CG step (a Hessian-vector
  product: a row then a column reduction) and 2 per line-search trial (f and ∇f there).
  CG's first step and the first trial run outside their loops (each loop condition is a host
  round trip on a GPU)."""
  logits, labels = _random_problem(3, num_samples=640, num_classes=16)
  jaxpr = jax.make_jaxpr(lambda z, y: M.estimate_log_prior(z, y, return_info=True))(
      logits, labels).jaxpr
  # (passes in the body, (N, C) arrays held, passes in the condition): CG, line search, Newton
  # (whose body holds CG's first step and the first trial)
  assert _matrix_reductions(jaxpr, logits.shape) == [(2, 1, 0), (2, 1, 0), (4, 1, 0)]
  _, info = M.estimate_log_prior(logits, labels, return_info=True)
  passes, steps = int(info["passes"]), int(info["iterations"])
  assert 2 + 4 * steps <= passes <= 2 + steps * 2 * (20 + 11)
  _, info = M.estimate_log_prior(logits, labels, solver="fixed_point", return_info=True)
  assert int(info["passes"]) == 2 * (int(info["iterations"]) + 1)


def test_pallas_reads_the_matrix_once_per_pass():
  """With ``implementation="pallas"`` every loop body reads E in one Pallas kernel and in no XLA
  reduction, and ``passes`` counts one read per row-then-column pass."""
  logits, labels = _random_problem(3, num_samples=640, num_classes=16)
  estimate = functools.partial(M.estimate_log_prior, implementation="pallas", return_info=True)
  jaxpr = jax.make_jaxpr(estimate)(logits, labels).jaxpr
  assert _matrix_reductions(jaxpr, (640, 16)) == [(0, 1, 0)] * 3   # E: 640 × 16, unpadded

  def direct(jaxpr):   # pallas_calls of a jaxpr (inside nested jits, not inside its loops)
    return sum(1 if eqn.primitive.name == "pallas_call" else
               sum(map(direct, jax.extend.core.jaxprs_in_params(eqn.params)))
               for eqn in jaxpr.eqns if eqn.primitive.name != "while")

  def kernels(jaxpr):   # pallas_calls in each while body
    found = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "while":
        found.append(direct(eqn.params["body_jaxpr"].jaxpr))
        found += kernels(eqn.params["body_jaxpr"].jaxpr)
      else:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          found += kernels(sub)
    return found

  # Newton's body (CG's first step and the first trial), CG's step, a backtracking trial
  assert kernels(jaxpr) == [2, 1, 1]
  _, info = estimate(logits, labels)
  assert int(info["passes"]) <= 1 + int(info["iterations"]) * (20 + 11)
  _, info = estimate(logits, labels, solver="fixed_point")
  assert int(info["passes"]) == int(info["iterations"]) + 1


def test_newton_stops_cg_at_the_accuracy_the_tolerance_needs():
  """CG's residual target is max(η‖∇f‖, tol/10): the last Newton step need not solve H d = −∇f
  to η ≈ ‖∇f‖^½ when a tenth of ``tol`` already ends the solve. Measured on these problems
  (reads of E): 42, 38, 22 with the η target alone; 26, 24, 22 with the floor."""
  for seed in (0, 1, 3):
    logits, labels = _random_problem(seed)
    log_prior, info = M.estimate_log_prior(logits, labels, return_info=True)
    assert int(info["passes"]) <= 32, (seed, int(info["passes"]))
    assert _numpy_residual(logits, labels, log_prior) < 1e-6


@pytest.mark.parametrize("reciprocal", [True, False])
def test_row_column_pass_against_numpy(reciprocal):
  """t = E u, c = Eᵀ φ(t), φ = 1/t or r ∘ t, both implementations under jit, at shapes the Pallas
  layout must pad (300 rows → 384, 37 columns → 64) against float64 NumPy."""
  from glajax.methods import _row_column_pass as rcp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  exp_z = rng.random((300, 37)).astype(np.float32)
  u, r = rng.random(37).astype(np.float32), rng.random(300).astype(np.float32)
  t_want = exp_z.astype(np.float64) @ u
  c_want = exp_z.T.astype(np.float64) @ (1.0 / t_want if reciprocal else r * t_want)
  for implementation in rcp.IMPLEMENTATIONS:
    def run(e, u, r, implementation=implementation):
      return rcp.row_column_pass(rcp.prepare(e, implementation), u, r, reciprocal=reciprocal)
    t, c = jax.jit(run)(exp_z, u, r)
    np.testing.assert_allclose(t, t_want, rtol=1e-6)
    np.testing.assert_allclose(c, c_want, rtol=1e-5)


def test_pallas_pass_lowers_to_a_triton_kernel_for_cuda():
  """Without a GPU: the kernel's Triton lowering (block shapes, loads, the row loop) runs for a
  CUDA target at the benchmark's 50 000 × 1 000, so a GPU run does not find it broken."""
  from glajax.methods import _row_column_pass as rcp  # pylint: disable=import-outside-toplevel

  kernel = functools.partial(rcp._pallas_pass, interpret=False)  # pylint: disable=protected-access
  padded = jax.eval_shape(lambda e: rcp.prepare(e, "pallas").values,
                          jax.ShapeDtypeStruct((50_000, 1_000), jnp.float32)).shape
  assert padded == (50_048, 1_024)
  try:
    lowered = jax.jit(kernel, static_argnames="reciprocal").trace(
        *(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in (padded, (1_024,), (50_048,))),
        reciprocal=False).lower(lowering_platforms=("cuda",))
  except (ImportError, NotImplementedError) as e:   # a jaxlib without Triton's dialect
    pytest.skip(f"no CUDA lowering here: {e}")
  text = lowered.as_text()
  assert "__gpu$xla.gpu.triton" in text and "grid_x = 391" in text


def test_value_checks_bring_no_logits_to_the_host(monkeypatch):
  """Issue 14: on an accelerator, checking finite logits, labels in range and every class
  present reduces on the device; only scalars and the (C,) class counts reach the host. Copying
  the (N, C) logits there cost ~100 ms on an H200 for 50 000 × 1 000, more than the solve. (On a
  CPU, reading them as NumPy is free and faster; the test makes the arrays count as on a
  device, and then checks both paths find the same bad values.)"""
  from glajax.methods import _checks  # pylint: disable=import-outside-toplevel
  logits, labels = _random_problem(4, num_samples=600, num_classes=12)
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  converted = []
  real = np.asarray

  def recording(x, *args, **kwargs):   # NumPy conversions of device arrays, by shape
    if isinstance(x, jax.Array):
      converted.append(x.shape)
    return real(x, *args, **kwargs)

  monkeypatch.setattr(_checks, "_on_host", lambda x: False)
  monkeypatch.setattr(np, "asarray", recording)
  M.estimate_log_prior(logits, labels).block_until_ready()
  monkeypatch.setattr(np, "asarray", real)
  assert all(np.prod(shape) <= logits.shape[1] for shape in converted), converted
  for on_host in (False, True):
    monkeypatch.setattr(_checks, "_on_host", lambda x, on_host=on_host: on_host)
    with pytest.raises(GlajaxError, match="2 non-finite"):
      M.estimate_log_prior(logits.at[3, 4].set(jnp.nan).at[5, 0].set(jnp.inf), labels)
    with pytest.raises(GlajaxError, match=r"range \[-1, 11\]"):
      M.estimate_log_prior(logits, labels.at[0].set(-1))


def test_device_value_checks_run_inside_jit_on_captured_arrays(monkeypatch):
  """A concrete array captured by a jitted function (a log-prior in a loss, labels beside traced
  logits) is still checked while the jit traces: the device reductions run then and there rather
  than being staged into the trace (which failed on an H200 with a ConcretizationTypeError)."""
  from glajax.methods import _checks  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(_checks, "_on_host", lambda x: False)   # as on an accelerator
  logits, labels = _random_problem(5, num_samples=300, num_classes=6)
  log_prior = jnp.log(jnp.full((6,), 1 / 6))
  adjusted = jax.jit(lambda z: M.logit_adjust(z, log_prior))(logits)
  np.testing.assert_allclose(adjusted, M.logit_adjust(logits, log_prior), rtol=1e-6)
  labels = jnp.asarray(labels)
  jax.jit(lambda z: M.estimate_log_prior(z, labels))(logits).block_until_ready()
  bad_prior, bad_labels = log_prior.at[2].set(jnp.inf), jnp.where(labels == 3, 0, labels)
  with pytest.raises(GlajaxError, match="1 non-finite"):
    jax.jit(lambda z: M.logit_adjust(z, bad_prior))(logits)
  with pytest.raises(GlajaxError, match="1 missing classes"):
    jax.jit(lambda z: M.estimate_log_prior(z, bad_labels))(logits)

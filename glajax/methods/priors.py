"""Label-prior estimation of a zero-shot model (GLA, Zhu et al., NeurIPS 2023).

Given zero-shot logits z_i and labels y_i of labelled downstream data, solve the convex problem

    θ* = argmin_θ f(θ),   f(θ) = (1/N) Σ_i CE(z_i − θ, y_i),
    ∇f(θ)_c = freq_c − p̄_c,   p̄_c = (1/N) Σ_i softmax(z_i − θ)_c,
    ∇²f(θ) = (1/N) Σ_i (diag p_i − p_i p_iᵀ),

and return the zero-shot model's log prior log π_p = normalise(θ* + log freq), normalise(v) =
v − logsumexp(v). At the optimum the debiased model's mean predicted probability of every class
equals that class's label frequency; the optimality residual max_c |p̄_c − freq_c| measures how
close a solution is. All computation is float32 (inputs may be bfloat16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glajax.errors import bad_argument
from glajax.methods import _checks, _row_column_pass

SOLVERS = ("newton", "lbfgs", "fixed_point", "gla_reference")
DEFAULT_MAX_ITER = {"newton": 50, "lbfgs": 500, "fixed_point": 5000, "gla_reference": 1000}
TEMPERATURE_RANGE = (0.1, 10.0)  # where the temperature searches start (GLA's [T_lo, T_hi])


def normalise_log_prior(log_prior: jax.Array) -> jax.Array:
  """Returns ``v − logsumexp(v)``: a log prior whose probabilities sum to one."""
  return log_prior - jax.nn.logsumexp(log_prior)


def estimate_log_prior(logits, labels, *, num_classes: int | None = None,
                       solver: str = "newton", temperature=None, tol: float = 1e-6,
                       max_iter: int | None = None, implementation: str = "auto",
                       return_info: bool = False):
  """Estimates the label prior baked into a zero-shot model (GLA).

  Solves θ* = argmin_θ (1/N) Σ_i CE(z_i/T − θ, y_i) and returns
  log π_p = normalise(θ* + log freq), shape (C,), logsumexp = 0 (see the module docstring).

  Args:
    logits: (N, C) zero-shot logits (float32 or bfloat16; computed in float32).
    labels: (N,) int labels; every class must occur (an absent class has no finite prior).
    num_classes: C, defaults to ``logits.shape[1]`` (must equal it).
    solver: ``"newton"`` (truncated Newton-CG, matrix-free Hessian; the default),
      ``"lbfgs"`` (optax L-BFGS with zoom line search),
      ``"fixed_point"`` (θ_c ← θ_c + log(p̄_c / freq_c)), or ``"gla_reference"`` (GLA's released
      solver: 1000 plain gradient steps on q = exp(θ) from uniform, lr = 1e-5·(N/C)/50; not
      converged in general, offered to reproduce published numbers).
    temperature: ``None`` (T = 1), a float T, or ``"match_confidence"`` (GLA's search,
      ``match_confidence_temperature``: the mean max-softmax confidence of z/T within 0.1 pp of
      the accuracy of z).
    tol: stop when the residual max_c |p̄_c − freq_c| ≤ tol (ignored by ``gla_reference``).
    max_iter: iteration cap (defaults: newton 50, lbfgs 500, fixed_point 5000,
      gla_reference 1000 steps exactly).
    implementation: how ``newton`` and ``fixed_point`` read E = exp(z − max z) in each
      row-then-column pass (``_row_column_pass``): ``"xla"`` (two reductions, two reads of E),
      ``"pallas"`` (one Pallas kernel, one read; Triton on a GPU, Pallas' interpreter
      elsewhere, which is exact but slow; at most 8192 classes) or ``"auto"`` (``"xla"``: the
      Pallas kernel is not yet measured on a GPU, ``benchmarks/bench_prior.py
      --implementations xla,pallas`` measures it).
    return_info: also return a dict with ``residual`` (float32, from the exact softmax),
      ``iterations`` (Newton steps, L-BFGS or fixed-point iterations, SGD steps), ``passes``
      (memory-bound reads of the (N, C) matrix E = exp(z − max z) inside the solve, for
      ``newton`` and ``fixed_point``; −1 where not counted) and the ``temperature`` used.

  Jittable with ``solver``, ``temperature`` (if a string), ``tol``, ``max_iter``,
  ``num_classes``, ``implementation`` and ``return_info`` static. Value checks (finite logits,
  labels in range, every class present) run only on concrete inputs; traced inside ``jit``, a
  class missing from the labels makes the whole estimate NaN instead of raising.
  """
  logits = _checks.logits_array("logits", logits)
  num_samples, classes = logits.shape
  if num_classes is not None and num_classes != classes:
    raise bad_argument("num_classes", f"logits.shape[1] = {classes}", num_classes)
  labels = _checks.labels_array("labels", labels, num_samples, classes)
  _checks.choice("solver", solver, SOLVERS)
  implementation = _implementation(implementation, solver, classes)
  if _checks.is_concrete(labels):
    missing = np.flatnonzero(_checks.class_counts(labels, classes) == 0)
    if missing.size:
      raise bad_argument("labels", "every class to occur in the estimation labels (the prior of "
                         "an absent class cannot be estimated)",
                         f"{missing.size} missing classes, e.g. {missing[:10].tolist()}")
  match = isinstance(temperature, str)
  if match:
    _checks.choice("temperature", temperature, ("match_confidence",))
    temperature = None
  elif temperature is not None:
    _checks.in_range("temperature", temperature, 1e-6, np.inf)
  if not isinstance(tol, (int, float, np.floating, np.integer)) or isinstance(tol, bool) or not (
      np.isfinite(tol) and tol >= 0):
    raise bad_argument("tol", "a finite number >= 0", repr(tol))
  if max_iter is None:
    max_iter = DEFAULT_MAX_ITER[solver]
  max_iter = _checks.positive_int("max_iter", max_iter)
  return _estimate(logits, labels, temperature, match_confidence=match, solver=solver, tol=tol,
                   max_iter=max_iter, implementation=implementation, return_info=return_info)


def _implementation(implementation: str, solver: str, num_classes: int) -> str:
  """The pass implementation for ``solver``: ``"auto"`` resolved, ``"pallas"`` checked."""
  _checks.choice("implementation", implementation, ("auto",) + _row_column_pass.IMPLEMENTATIONS)
  if implementation != "pallas":
    return "xla"
  if solver not in ("newton", "fixed_point"):
    raise bad_argument("implementation", "'auto' or 'xla' for solver "
                       f"{solver!r} ('pallas' serves newton and fixed_point)", "'pallas'")
  if num_classes > _row_column_pass.MAX_PALLAS_COLUMNS:
    raise bad_argument("implementation", "'auto' or 'xla' for more than "
                       f"{_row_column_pass.MAX_PALLAS_COLUMNS} classes", "'pallas'")
  return implementation


@functools.partial(jax.jit, static_argnames=("match_confidence", "solver", "tol", "max_iter",
                                             "implementation", "return_info"))
def _estimate(logits, labels, temperature, *, match_confidence, solver, tol, max_iter,
              implementation, return_info):
  z = logits.astype(jnp.float32)
  if match_confidence:
    temperature = match_confidence_temperature(z, labels)
  elif temperature is None:
    temperature = jnp.float32(1.0)
  z = z / temperature
  freq = jnp.bincount(labels, length=z.shape[1]).astype(jnp.float32) / z.shape[0]
  solve = {"newton": functools.partial(_newton, implementation=implementation),
           "fixed_point": functools.partial(_fixed_point, implementation=implementation),
           "lbfgs": _lbfgs, "gla_reference": _gla_reference}[solver]
  theta, iterations, passes = solve(z, labels, freq, tol=tol, max_iter=max_iter)
  log_prior = normalise_log_prior(theta + jnp.log(freq))
  log_prior = jnp.where(jnp.all(freq > 0), log_prior, jnp.nan)   # missing class under jit
  if not return_info:
    return log_prior
  info = {"residual": optimality_residual(z, labels, theta), "iterations": iterations,
          "passes": jnp.asarray(passes, jnp.int32),
          "temperature": jnp.asarray(temperature, jnp.float32)}
  return log_prior, info


def optimality_residual(logits, labels, theta) -> jax.Array:
  """max_c |(1/N) Σ_i softmax(z_i − θ)_c − freq_c|, computed in float32."""
  z = jnp.asarray(logits, jnp.float32)
  freq = jnp.bincount(labels, length=z.shape[1]).astype(jnp.float32) / z.shape[0]
  return jnp.max(jnp.abs(_mean_probs(z, theta) - freq))


def _mean_probs(z, theta):
  return jnp.mean(jax.nn.softmax(z - theta, axis=-1), axis=0)


def _objective(z, labels, theta):
  """f(θ) = (1/N) Σ_i [logsumexp(z_i − θ) − (z_{i,y_i} − θ_{y_i})]."""
  shifted = z - theta
  return jnp.mean(jax.nn.logsumexp(shifted, axis=-1)
                  - jnp.take_along_axis(shifted, labels[:, None], axis=-1)[:, 0])


class _Factored:
  """f and its derivatives with the exponentials taken once: E = exp(z − max_c z), so that

  logsumexp(z_i − θ) = max_c z_ic + log s_i − m,   s = E w,   w = e^{m−θ}  (m = min θ, exact
  for any m), and p_ic = E_ic w_c / s_i. Every quantity the solvers need is then a row
  reduction of E followed by a column reduction that needs its result
  (``_row_column_pass.row_column_pass``: two reads of E with ``"xla"``, one with ``"pallas"``),
  so E is the only (N, C) array a solve reads and none is written:

    gradient(θ)     s = E w, f(θ) from s;  p̄ = w ∘ Eᵀ(1/s)/N, so ∇f = freq − p̄
    hvp(v)          a = E(w∘v)/s²,  ∇²f v = p̄∘v − w ∘ Eᵀa/N

  Reductions are ``jnp.sum`` of broadcast products, not matrix-vector products: XLA:CPU's f32
  GEMV accumulates sequentially, and its ~3e-6 error in p̄ stalled the solvers above tol = 1e-6.
  (The exact Hessian diagonal, p̄ − w² ∘ (E∘E)ᵀ(1/s²)/N, would ride along in the column pass as
  a sibling reduction, but XLA:CPU runs that reduction ~25× slower than p̄'s at 50 000 × 1 000,
  so CG keeps the free diag(p̄) preconditioner.)
  """

  def __init__(self, z, labels, freq, implementation="xla"):
    row_max = jnp.max(z, axis=-1)
    self.matrix = _row_column_pass.prepare(jnp.exp(z - row_max[:, None]), implementation)
    self.constant = jnp.mean(row_max - jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0])
    self.freq = freq

  def objective(self, theta):
    """f(θ) alone, for autodiff (the ``"xla"`` layout)."""
    m = jax.lax.stop_gradient(jnp.min(theta))
    sums = jnp.sum(self.matrix.values * jnp.exp(m - theta), axis=-1)
    return jnp.mean(jnp.log(sums)) - m + self.constant + jnp.dot(self.freq, theta)

  def gradient(self, theta):
    """(f(θ), s, w, p̄), ∇f = freq − p̄: one row-then-column pass."""
    m = jnp.min(theta)
    w = jnp.exp(m - theta)
    sums, column = _row_column_pass.row_column_pass(self.matrix, w, reciprocal=True)
    value = jnp.mean(jnp.log(sums)) - m + self.constant + jnp.dot(self.freq, theta)
    return value, sums, w, w * column / self.matrix.shape[0]

  def hvp(self, sums, w, pbar, v):
    """∇²f v = p̄∘v − w ∘ Eᵀ(E(w∘v)/s²)/N: one row-then-column pass."""
    _, column = _row_column_pass.row_column_pass(self.matrix, w * v, 1.0 / (sums * sums),
                                                 reciprocal=False)
    return pbar * v - w * column / self.matrix.shape[0]


def _fixed_point(z, labels, freq, *, tol, max_iter, implementation):
  """θ_c ← θ_c + log(p̄_c / freq_c) (EM for the prior; a gradient step preconditioned by p̄).
  It is generalized iterative scaling (Darroch & Ratcliff, 1972) for the class biases −θ, whose
  class features are one-hot (they sum to 1), so no step increases f.

  One row-then-column pass over E per iteration (``_Factored.gradient``)."""
  factored = _Factored(z, labels, freq, implementation)

  def cond(state):
    _, pbar, it = state
    return (jnp.max(jnp.abs(freq - pbar)) > tol) & (it < max_iter)

  def body(state):
    theta, pbar, it = state
    theta = theta + jnp.log(pbar / freq)
    return theta, factored.gradient(theta)[3], it + 1

  theta = jnp.zeros_like(freq)
  theta, _, it = jax.lax.while_loop(cond, body, (theta, factored.gradient(theta)[3], 0))
  return theta, it, factored.matrix.reads_per_pass * (it + 1)


def _newton(z, labels, freq, *, tol, max_iter, implementation, max_cg: int = 20):
  """Truncated Newton from one fixed-point step: H d = −∇f by conjugate gradients, then a
  backtracking step.

  Everything runs inside one jitted ``while_loop`` (no Python in the solve; on a GPU, XLA
  brings each loop condition to the host, so the loops are kept short) and reads E in
  row-then-column passes (see ``_Factored``):
  - each CG step is one Hessian-vector product, H v = p̄ ∘ v − w ∘ Eᵀ(E(w∘v)/s²)/N (the row,
    then the column reduction: the dependency is inherent), never the C×C Hessian, whose N·C²
    flops cost ~1.2 s per step on 2 CPU cores at 50 000 × 1 000; CG is preconditioned with
    diag(p̄), so its first iterate is the fixed-point step;
  - each line-search trial is one pass that gives f and ∇f at the trial point, so the accepted
    trial's gradient comes with it.
  CG stops at relative residual min(0.1, ‖∇f‖^½) (superlinear convergence, Eisenstat–Walker),
  or once its residual is below tol/10, which ends the solve anyway.
  H is singular along the all-ones direction and ∇f ⊥ 1, so CG stays in the range of H. A step
  that increases f beyond float32 rounding (1e-6 relative) is halved; when 10 halvings do not
  help, f is at float32 precision and the solver stops. Iterations count Newton steps; the
  third result counts reads of E for the memory-floor accounting.
  """
  factored = _Factored(z, labels, freq, implementation)

  def direction(grad, sums, w, pbar):
    precond = 1.0 / pbar
    forcing = jnp.minimum(0.1, jnp.sqrt(jnp.sqrt(jnp.sum(grad ** 2))))
    target = jnp.maximum(jnp.sum(grad ** 2) * forcing ** 2, (0.1 * tol) ** 2)

    def cond(cg):
      _, r, _, _, k = cg
      return (jnp.sum(r ** 2) > target) & (k < max_cg)

    def body(cg):
      d, r, s, rz, k = cg
      hs = factored.hvp(sums, w, pbar, s)
      step = rz / jnp.dot(s, hs)
      d, r = d + step * s, r - step * hs
      zr = precond * r
      rz_new = jnp.dot(r, zr)
      return d, r, zr + (rz_new / rz) * s, rz_new, k + 1

    r = -grad
    zr = precond * r
    # The first step runs outside the loop: |∇f|∞ > tol ≥ 10·target^½ makes it always needed,
    # and on a GPU each evaluation of a loop's condition is a round trip to the host.
    first = body((jnp.zeros_like(grad), r, zr, jnp.dot(r, zr), 0))
    d, _, _, _, k = jax.lax.while_loop(cond, body, first)
    return d, k

  def cond(state):
    _, _, grad, _, _, _, it, scale, _ = state
    return (jnp.max(jnp.abs(grad)) > tol) & (it < max_iter) & (scale > 2.0 ** -10)

  def body(state):
    theta, value, grad, sums, w, pbar, it, _, passes = state
    step, cg_steps = direction(grad, sums, w, pbar)

    def not_better(search):
      scale, new_value, *_ = search
      return (new_value > value + 1e-6 * jnp.abs(value)) & (scale > 2.0 ** -10)

    def halve(search):
      scale, *_, trials = search
      return (scale * 0.5, *factored.gradient(theta + scale * 0.5 * step), trials + 1)

    scale, *trial, trials = jax.lax.while_loop(
        not_better, halve, (1.0, *factored.gradient(theta + step), 1))
    accepted = scale > 2.0 ** -10
    # Rejected (f at float32 precision): keep θ and its gradient; the loop stops on scale.
    theta = jnp.where(accepted, theta + scale * step, theta)
    value, sums, w, pbar = (jnp.where(accepted, new, old)
                            for new, old in zip(trial, (value, sums, w, pbar)))
    passes = passes + factored.matrix.reads_per_pass * (cg_steps + trials)
    return theta, value, freq - pbar, sums, w, pbar, it + 1, scale, passes

  # Start one fixed-point step from θ = 0 (generalized iterative scaling: it never increases f).
  # From θ = 0 itself a full Newton step overshoots on CLIP-like logits (f 1.9 → 30, three
  # halvings); the start cut the clip_like solve from 6 Newton steps to 3 (36 → 20 reads).
  theta = jnp.log(factored.gradient(jnp.zeros_like(freq))[3] / freq)
  value, sums, w, pbar = factored.gradient(theta)
  init = (theta, value, freq - pbar, sums, w, pbar, 0, 1.0, 2 * factored.matrix.reads_per_pass)
  theta, *_, it, _, passes = jax.lax.while_loop(cond, body, init)
  return theta, it, passes


def _lbfgs(z, labels, freq, *, tol, max_iter):
  """optax L-BFGS (memory 10, zoom line search) on the factored f."""
  objective = _Factored(z, labels, freq).objective
  optimizer = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def cond(state):
    _, _, grad, it = state
    return (jnp.max(jnp.abs(grad)) > tol) & (it < max_iter)

  def body(state):
    theta, opt_state, _, it = state
    value, grad = value_and_grad(theta, state=opt_state)
    updates, opt_state = optimizer.update(grad, opt_state, theta, value=value, grad=grad,
                                          value_fn=objective)
    theta = optax.apply_updates(theta, updates)
    return theta, opt_state, grad, it + 1

  theta = jnp.zeros_like(freq)
  init = (theta, optimizer.init(theta), jnp.full_like(freq, jnp.inf), 0)
  theta, _, _, it = jax.lax.while_loop(cond, body, init)
  return theta, it, -1   # passes not counted (optax's zoom line search evaluates f at will)


def _gla_reference(z, labels, freq, *, tol, max_iter):
  """GLA's released solver: ``max_iter`` plain SGD steps on q from uniform.

  q ← q − lr · ∂/∂q (1/N) Σ_i CE(z_i − log q, y_i),  lr = 1e-5 · (N/C) / 50,  q_0 = 1/C.
  GLA writes the simplex constraint with Lagrange multipliers λ (Σq = 1) and μ (q ≥ 0); at the
  interior optimum both are zero and the released code steps on q alone, leaving Σq
  unnormalised (the log prior is normalised afterwards). ``tol`` is unused: it runs every step.
  """
  del tol
  num_samples, num_classes = z.shape
  learning_rate = 1e-5 * (num_samples / num_classes) / 50
  grad = jax.grad(lambda q: _objective(z, labels, jnp.log(q)))
  q = jax.lax.fori_loop(0, max_iter, lambda _, q: q - learning_rate * grad(q),
                        jnp.full_like(freq, 1.0 / num_classes))
  return jnp.log(q), jnp.asarray(max_iter), -1   # passes over z/exp, not over E: not counted


def match_confidence_temperature(logits, labels, num_steps: int = 40, *, search: str = "gla",
                                 tol: float = 0.1, max_iter: int = 500) -> jax.Array:
  """GLA's temperature T: the mean max-softmax confidence of z/T matches the accuracy of z.

  ``search="gla"`` (the default) is GLA's own search (BeierZhu/GLA ``GLA.FS.public.zip``,
  ``trainers/util.py`` ``Calibrater.search_recurse``; ``trainers/zsclip.py``
  ``binary_search_recurse`` is the same), in percent: from [T_lo, T_hi] = [0.1, 10], each round
  takes T_mid = T_lo + α·(T_hi − T_lo), α = gap_lo / (gap_lo + gap_hi) with gap = |100·conf(T) −
  100·acc|, and stops when gap_mid ≤ ``tol`` (pp); otherwise T_hi ← 1.1·T_hi if conf(T_hi) > acc
  (still too confident: the upper end grows), else T_lo ← T_lo/1.1 if conf(T_lo) < acc, else the
  end farther from its target moves to T_mid. GLA calls it with ``thres=0.1`` for the zero-shot
  model (``Calibrater.search_T``'s default, ``CalibratedZeroshotCLIP.test``) and ``thres=1.``
  for the fine-tuned model (``trainers/gla.py``). Its recursion has no bound; here it stops after
  ``max_iter`` rounds with the last T_mid.

  ``search="bisection"``: the exact root by ``num_steps`` bisection steps on log T within
  [0.1, 10], clipped to the range when the accuracy lies outside the confidences it spans
  (glajax's earlier search).

  Float32, jittable (``search``, ``tol``, ``max_iter`` and ``num_steps`` static).
  """
  z = _checks.logits_array("logits", logits).astype(jnp.float32)
  _checks.nonempty("logits", z)
  labels = _checks.labels_array("labels", labels, *z.shape)
  num_steps = _checks.positive_int("num_steps", num_steps)
  max_iter = _checks.positive_int("max_iter", max_iter)
  _checks.choice("search", search, ("gla", "bisection"))
  if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
    raise bad_argument("tol", "a tolerance > 0 in percentage points", repr(tol))
  accuracy = jnp.mean((jnp.argmax(z, axis=-1) == labels).astype(jnp.float32))

  def confidence(t):
    return jnp.mean(jnp.max(jax.nn.softmax(z / t, axis=-1), axis=-1))

  if search == "gla":
    return _gla_temperature_search(confidence, 100.0 * accuracy, tol, max_iter)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    too_confident = confidence(jnp.exp(mid)) > accuracy
    return jnp.where(too_confident, mid, lo), jnp.where(too_confident, hi, mid)

  lo, hi = jnp.log(jnp.asarray(TEMPERATURE_RANGE, jnp.float32))
  lo, hi = jax.lax.fori_loop(0, num_steps, body, (lo, hi))
  return jnp.exp(0.5 * (lo + hi))


def _gla_temperature_search(confidence, accuracy, tol, max_iter):
  """GLA's ``search_recurse`` as a ``while_loop`` (confidences and accuracy in percent)."""

  def gap_of(t):
    conf = 100.0 * confidence(t)
    return conf, jnp.abs(conf - accuracy)

  def round_(state):
    t_lo, t_hi, _, _, it = state
    conf_lo, gap_lo = gap_of(t_lo)
    conf_hi, gap_hi = gap_of(t_hi)
    total = gap_lo + gap_hi
    alpha = jnp.where(total > 0, gap_lo / jnp.where(total > 0, total, 1.0), 0.5)
    t_mid = t_lo * (1.0 - alpha) + t_hi * alpha
    _, gap_mid = gap_of(t_mid)
    grow = conf_hi > accuracy
    shrink = ~grow & (conf_lo < accuracy)
    narrow = ~grow & ~shrink
    new_hi = jnp.where(grow, t_hi * 1.1, jnp.where(narrow & (gap_lo < gap_hi), t_mid, t_hi))
    new_lo = jnp.where(shrink, t_lo / 1.1, jnp.where(narrow & ~(gap_lo < gap_hi), t_mid, t_lo))
    return new_lo, new_hi, t_mid, gap_mid <= tol, it + 1

  def keep_going(state):
    return ~state[3] & (state[4] < max_iter)

  lo, hi = map(jnp.float32, TEMPERATURE_RANGE)
  state = (lo, hi, jnp.float32(1.0), jnp.asarray(False), jnp.int32(0))
  return jax.lax.while_loop(keep_going, round_, state)[2]

"""Prior estimation on 50 000 × 1 000 logits: glajax's exact solver vs GLA's reference solver.

The reference is GLA's released estimator written in PyTorch the way the original does it
(q = uniform, ``requires_grad``, ``torch.optim.SGD`` with lr = 1e-5·(N/C)/50, 1000 steps of
``F.cross_entropy(logits - log q, labels)``). Both run on the same logits in the same process;
the optimum θ* is computed independently in float64 NumPy (fixed point to residual < 1e-12).

    python benchmarks/bench_prior.py [--data clip_like|clip_mild|extreme] [--num-samples 50000]
        [--num-classes 1000] [--threads 2]
        [--solvers newton,fixed_point,lbfgs] [--implementations xla,pallas]
        [--reference-steps 1000] [--out results.json] [--bandwidth-tbps 4.3] [--profile-dir DIR]

The reference runs on CUDA when PyTorch sees a GPU. Each JAX solver's row reports
``passes_over_E`` (from ``return_info``) and, from it, the memory floor: passes × N·C·4 bytes /
bandwidth, and how many times above that floor the measured time is, and how much of the time
the input checks take (the public call's time minus the jitted solve's). ``--implementations``
runs ``newton`` and ``fixed_point`` with each way of reading E (``"pallas"``: one read per
row-then-column pass; on a CPU it runs in Pallas' interpreter). ``--profile-dir`` also
traces three solves per solver with ``jax.profiler`` and reports kernel launches, summed kernel
time and the top kernels per solve (the gap between kernel time and wall time is launch and
host overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def make_logits(num_samples: int, num_classes: int, data: str = "clip_like", seed: int = 0):
  """Logits with a known long-tailed prior, labels balanced (every class occurs).

  ``clip_like``: z = 100·(0.2 + 0.02·ε + 0.08·onehot(y)) + log π_true, ε ~ N(0, 1) i.i.d.,
  log π_true ~ N(0, 1) sorted (CLIP's scale; top-1 accuracy ≈ 0.65).
  ``clip_mild``: the same with log π_true ~ N(0, 0.3²).
  ``extreme``: z = 4·(2·ε + 6·onehot(y)) + log π_true with log π_true ~ N(0, 1.5²): far more
  confident and skewed than CLIP (GLA's reference SGD drives some q below 0 here).
  """
  rng = np.random.default_rng(seed)
  prior_std, noise, margin, scale = {"clip_like": (1.0, 0.02, 0.08, 100.0),
                                     "clip_mild": (0.3, 0.02, 0.08, 100.0),
                                     "extreme": (1.5, 2.0, 6.0, 4.0)}[data]
  log_prior = np.sort(rng.normal(0.0, prior_std, num_classes))[::-1]
  log_prior -= np.log(np.exp(log_prior).sum())
  labels = np.arange(num_samples) % num_classes
  rng.shuffle(labels)
  logits = rng.normal(0.0, noise, (num_samples, num_classes))
  logits[np.arange(num_samples), labels] += margin
  logits = scale * logits + log_prior
  return logits.astype(np.float32), labels.astype(np.int32), log_prior


def optimum_float64(logits, labels, tol=1e-12, max_iter=20000):
  """θ* by the fixed point θ ← θ + log(p̄/freq) in float64 (factored: one exp pass)."""
  z = logits.astype(np.float64)
  num_samples, num_classes = z.shape
  freq = np.bincount(labels, minlength=num_classes) / num_samples
  exp_z = np.exp(z - z.max(axis=1, keepdims=True))
  theta = np.zeros(num_classes)
  for it in range(max_iter):
    w = np.exp(theta.min() - theta)
    pbar = w * (exp_z.T @ (1.0 / (exp_z @ w))) / num_samples
    if np.abs(pbar - freq).max() < tol:
      break
    theta += np.log(pbar / freq)
  return theta, it


def residual_float64(logits, labels, theta):
  """max_c |mean_i softmax(z_i − θ)_c − freq_c| in float64."""
  z = logits.astype(np.float64) - theta
  z -= z.max(axis=1, keepdims=True)
  probs = np.exp(z)
  probs /= probs.sum(axis=1, keepdims=True)
  freq = np.bincount(labels, minlength=z.shape[1]) / z.shape[0]
  return float(np.abs(probs.mean(axis=0) - freq).max())


def normalised(log_prior):
  log_prior = np.asarray(log_prior, np.float64)
  return log_prior - np.log(np.exp(log_prior - log_prior.max()).sum()) - log_prior.max()


def gla_reference_torch(logits, labels, steps, threads):
  """GLA's solver, in PyTorch as released: plain SGD on q from uniform; returns (log q, s/step)."""
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  logits_t = torch.from_numpy(logits).to(device)
  labels_t = torch.from_numpy(labels).long().to(device)
  num_samples, num_classes = logits.shape
  q = torch.ones(num_classes, device=device) / num_classes
  q.requires_grad_(True)
  optimizer = torch.optim.SGD([q], lr=1e-5 * (num_samples / num_classes) / 50)
  first_nonpositive = None   # monitoring only: the first step after which some q_c <= 0
  start = time.perf_counter()
  for step in range(steps):
    loss = F.cross_entropy(logits_t - torch.log(q), labels_t)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if first_nonpositive is None and bool((q.detach() <= 0).any()):
      first_nonpositive = step + 1
  if device == "cuda":
    torch.cuda.synchronize()
  seconds = time.perf_counter() - start
  return (torch.log(q.detach()).double().cpu().numpy(), seconds, f"{torch.__version__} ({device})",
          first_nonpositive)


def _profile(estimate, trace_dir: str, solves: int = 3) -> dict:
  """Kernel launches, summed kernel time and the top kernels per solve (jax.profiler)."""
  import jax
  from bench_train_step import (  # pylint: disable=import-outside-toplevel
      device_kernels, kernel_totals, top_kernels)
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(solves):
    jax.block_until_ready(estimate())
  jax.profiler.stop_trace()
  kernels = device_kernels(trace_dir)
  return {**kernel_totals(kernels, solves), "top_kernels": top_kernels(kernels, solves, 8)}


def _best_seconds(fn, repeats: int) -> tuple[float, list[float]]:
  import jax
  jax.block_until_ready(fn())   # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times), times


def _time_solver(methods, z, y, solver, implementation, args, nbytes, report, reference_seconds):
  """One solver's row: the public call (checks + solve), the jitted solve alone, passes over E."""
  from glajax.methods import priors  # pylint: disable=import-outside-toplevel

  def public():
    return methods.estimate_log_prior(z, y, solver=solver, implementation=implementation,
                                      return_info=True)

  def solve_only():   # the jitted core that estimate_log_prior calls after its checks
    return priors._estimate(  # pylint: disable=protected-access
        z, y, None, match_confidence=False, solver=solver, tol=1e-6,
        max_iter=priors.DEFAULT_MAX_ITER[solver],
        implementation=implementation, return_info=True)

  best, times = _best_seconds(public, args.repeats)
  solve_best, _ = _best_seconds(solve_only, args.repeats)
  log_prior, info = public()
  passes = int(info["passes"])
  floor = (passes * nbytes / (args.bandwidth_tbps * 1e12)) if passes > 0 else None
  row = {**report(np.asarray(log_prior), best), "all_seconds": times,
         "solve_only_seconds": solve_best, "checks_seconds": best - solve_best,
         "iterations": int(info["iterations"]), "passes_over_E": passes,
         "memory_floor_seconds": floor, "times_memory_floor": (best / floor) if floor else None,
         "reported_residual_float32": float(info["residual"]),
         "speedup_vs_reference": reference_seconds / best}
  if args.profile_dir:
    try:   # a profiler failure must not lose the timings
      row["profile"] = _profile(public, f"{args.profile_dir}/{solver}_{implementation}")
    except Exception as e:  # pylint: disable=broad-except
      row["profile_error"] = f"{type(e).__name__}: {e}"[:500]
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", choices=("clip_like", "clip_mild", "extreme"), default="clip_like")
  parser.add_argument("--num-samples", type=int, default=50000)
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--solvers", default="newton,fixed_point,lbfgs")
  parser.add_argument("--implementations", default="xla",
                      help="comma-separated: how newton and fixed_point read E (xla, pallas)")
  parser.add_argument("--reference-steps", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--bandwidth-tbps", type=float, default=4.3,
                      help="memory bandwidth for the memory-floor column (H200: ~4.3 TB/s)")
  parser.add_argument("--profile-dir", default=None,
                      help="trace 3 solves per solver here and report their kernels")
  args = parser.parse_args()

  logits, labels, true_log_prior = make_logits(args.num_samples, args.num_classes, args.data)
  accuracy = float(np.mean(logits.argmax(axis=1) == labels))
  freq = np.bincount(labels, minlength=args.num_classes) / args.num_samples
  results = {"data": args.data, "N": args.num_samples, "C": args.num_classes,
             "zero_shot_accuracy": accuracy, "threads": args.threads,
             "cpu": platform.processor() or platform.machine(), "load_avg_start": os.getloadavg()}
  theta_star, star_iters = optimum_float64(logits, labels)
  log_prior_star = normalised(theta_star + np.log(freq))
  results["optimum"] = {"iterations": star_iters,
                        "residual": residual_float64(logits, labels, theta_star),
                        "corr_with_truth": float(np.corrcoef(log_prior_star, true_log_prior)[0, 1])}

  def report(log_prior, seconds):
    theta = log_prior - np.log(freq)
    return {"seconds": seconds, "residual": residual_float64(logits, labels, theta),
            "max_abs_log_prior_error_vs_optimum": float(np.abs(normalised(log_prior)
                                                               - log_prior_star).max()),
            "corr_with_optimum": float(np.corrcoef(log_prior, log_prior_star)[0, 1])}

  log_q, seconds, torch_version, first_nonpositive = gla_reference_torch(
      logits, labels, args.reference_steps, args.threads)
  results["torch_version"] = torch_version
  results["gla_reference_torch"] = {**report(log_q + np.log(freq), seconds),
                                    "steps": args.reference_steps,
                                    "first_step_with_q_nonpositive": first_nonpositive,
                                    "seconds_per_step": seconds / args.reference_steps}
  print(json.dumps(results, indent=1), flush=True)

  import jax
  import jax.numpy as jnp
  from glajax import methods as M
  results["jax_version"] = jax.__version__
  results["jax_device"] = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
  z, y = jnp.asarray(logits), jnp.asarray(labels)
  for solver in args.solvers.split(","):
    for implementation in (args.implementations.split(",")
                           if solver in ("newton", "fixed_point") else ["xla"]):
      name = solver if implementation == "xla" else f"{solver}_{implementation}"
      results[name] = _time_solver(M, z, y, solver, implementation, args, logits.nbytes, report,
                                   seconds)
      print(name, json.dumps(results[name]), flush=True)
  results["load_avg_end"] = os.getloadavg()
  print(json.dumps(results, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()

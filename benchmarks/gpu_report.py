"""Writes the markdown results file of ``benchmarks/gpu.sh`` from its logs and JSON outputs."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re


def _read(path):
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def _json(path):
  text = _read(path)
  return json.loads(text) if text else None


def _contrastive(logs: str, contrastive_args: str) -> list[str]:
  lines = ["## Contrastive steps (FLYP, CaRot: both towers)", "", "```",
           f"python benchmarks/bench_train_step.py {contrastive_args} --task flyp|carot", "```",
           "", "| task | images/s | GFLOP/image | MFU |", "|---|---|---|---|"]
  for task in ("flyp", "carot"):
    r = _json(f"{logs}/{task}.json")
    if r:
      mfu = f"{100 * r['jax_mfu']:.1f} %" if r.get("jax_mfu") else "n/a"
      lines.append(f"| {task} (prompts of {r.get('prompt_length')} tokens) | "
                   f"{r['jax_images_per_s']:.1f} | {r['train_gflop_per_image']:.1f} | {mfu} |")
    else:
      lines.append(f"| {task} | no result (see {task}.log) | | |")
  return lines + [""]


def _explore(logs: str, explore_args: str) -> list[str]:
  report = _json(f"{logs}/explore/explore.json")
  lines = ["## Variants (gpu_explore.py)", "", "```",
           f"python benchmarks/gpu_explore.py {explore_args}", "```", ""]
  if not report:
    return lines + ["No result (see explore.log):", "", "```",
                    *_read(f"{logs}/explore.log").splitlines()[-25:], "```", ""]
  lines += ["Attention in bfloat16, ‖x − ref‖ / ‖ref‖ (out: float64 NumPy reference; dq, dk, dv: "
            "XLA float32 gradients at \"highest\"):", "",
            "| shape | kernel | out | dq | dk | dv |", "|---|---|---|---|---|---|"]
  for r in report.get("attention_numerics", []):
    if "error" in r:
      lines.append(f"| {r['shape']} | {r['impl']} | {r['error'][:80]} | | | |")
    else:
      lines.append(f"| {r['shape']} | {r['impl']} | {r['rel_err_out']:.1e} | "
                   f"{r['rel_err_dq']:.1e} | {r['rel_err_dk']:.1e} | {r['rel_err_dv']:.1e} |")
  lines += ["", "Train step variants (the default, fused q/k/v + cuDNN attention, is above):", "",
            "| variant | XLA_FLAGS | batch | images/s | MFU |", "|---|---|---|---|---|"]
  for r in report.get("variants", []):
    if r.get("images_per_s"):
      mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "n/a"
      lines.append(f"| {r['name']} | `{r['flags']}` | {r['batch']} | {r['images_per_s']:.1f} | "
                   f"{mfu} |")
    else:
      lines.append(f"| {r['name']} | `{r['flags']}` | {r['batch']} | rc {r['rc']} | |")
  cb = report.get("prior_command_buffers")
  if cb:
    lines += ["", f"Prior with `{cb['flags']}`: " + (", ".join(
        f"{solver} {cb[solver]['seconds'] * 1e3:.2f} ms" for solver in _solver_rows(cb))
        or f"rc {cb['rc']}")]
  if report.get("skipped"):
    lines += ["", f"Skipped for time: {', '.join(report['skipped'])}"]
  return lines + [""]


def _solver_rows(results: dict) -> list[str]:
  """The solver rows of a bench_prior result (``newton``, ``newton_pallas``, ...), in order."""
  return [name for name in results
          if name.split("_pallas")[0] in ("newton", "fixed_point", "lbfgs")
          and isinstance(results[name], dict) and "seconds" in results[name]]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--logs", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--tests", default="")
  parser.add_argument("--train-args", default="")
  parser.add_argument("--prior-args", default="")
  parser.add_argument("--contrastive-args", default="")
  parser.add_argument("--explore-args", default="")
  args = parser.parse_args()
  logs = args.logs
  lines = [f"# issue 14 on an accelerator: `bash benchmarks/gpu.sh` "
           f"({datetime.date.today().isoformat()})", ""]
  lines += ["## Device and versions", "", "```", _read(f"{logs}/versions.log").strip(), "```", "",
            "Steps (rc, seconds):", "", "```", _read(f"{logs}/steps.txt").strip(), "```", ""]

  tests_log = _read(f"{logs}/tests.log")
  summary = [l for l in tests_log.splitlines() if re.search(r"\d+ (passed|failed)", l)]
  failed = [l for l in tests_log.splitlines() if l.startswith(("FAILED", "ERROR"))]
  skipped = [l for l in tests_log.splitlines() if l.startswith("SKIPPED")]
  lines += ["## Tests", "", "```", "python -m pytest -p no_tensorflow -m 'slow or not slow' "
            + args.tests, "```", "", f"Result: `{summary[-1].strip('= ') if summary else 'none'}`",
            ""]
  if failed or skipped:
    lines += ["```", *failed[:40], *skipped[:20], "```", ""]

  train = _json(f"{logs}/train_step.json")
  lines += ["## Train step (ViT-B/16 fine-tuning step)", "", "```",
            f"python benchmarks/bench_train_step.py {args.train_args}", "```", ""]
  if train:
    mfu = lambda k: f"{100 * train[k]:.1f} %" if train.get(k) else "n/a"   # noqa: E731
    lines += ["| system | images/s | MFU |", "|---|---|---|",
              f"| glajax (jit, {train['dtype']} compute, f32 params) | "
              f"{train['jax_images_per_s']:.1f} | {mfu('jax_mfu')} |"]
    if train.get("torch_error"):
      lines += [f"| PyTorch, {train['torch_anchor']} | failed: {train['torch_error'][:300]} | |"]
    if train.get("torch_images_per_s"):
      lines += [f"| PyTorch, {train['torch_anchor']} | {train['torch_images_per_s']:.1f} | "
                f"{mfu('torch_mfu')} |"]
      lines += ["", f"glajax / PyTorch: **{train['speedup']:.2f}×**"]
    lines += ["", f"{train['train_gflop_per_image']:.1f} GFLOP per image per step; device "
              f"{train['device']}; versions {train['versions']}", ""]
    if train.get("kernel_totals"):
      totals = train["kernel_totals"]
      lines += [f"Kernels per step: {totals['kernels_per_step']:.0f}, summed kernel time "
                f"{totals['kernel_ms_per_step']:.1f} ms per step (the step takes "
                f"{1e3 * train['batch'] / train['jax_images_per_s']:.1f} ms).", ""]
    if train.get("kernel_categories"):
      lines += ["Kernel time by kind (jax.profiler, per glajax step; `KERNEL_CATEGORIES` in "
                "bench_train_step.py):", "", "| kind | ms/step | share | calls/step |",
                "|---|---|---|---|"]
      for c in train["kernel_categories"]:
        efficiency = (f" (GEMM efficiency ≤ {100 * c['efficiency_upper_bound']:.0f} % of peak)"
                      if c.get("efficiency_upper_bound") else "")
        lines.append(f"| {c['category']}{efficiency} | {c['ms_per_step']:.3f} | "
                     f"{100 * c['share']:.1f} % | {c['calls_per_step']:.0f} |")
      lines.append("")
    if train.get("top_kernels"):
      lines += ["Top kernels (jax.profiler, per glajax step):", "",
                "| kernel | ms/step | share | calls/step |", "|---|---|---|---|"]
      for k in train["top_kernels"]:
        lines.append(f"| `{k['name']}` | {k['ms_per_step']:.3f} | {100 * k['share']:.1f} % | "
                     f"{k['calls_per_step']:.0f} |")
      lines.append("")
  else:
    lines += ["No result (see train_step.log):", "", "```",
              *_read(f"{logs}/train_step.log").splitlines()[-25:], "```", ""]

  prior = _json(f"{logs}/prior.json")
  lines += ["## Prior estimation", "", "```", f"python benchmarks/bench_prior.py {args.prior_args} "
            "--solvers newton,fixed_point --implementations xla,pallas", "```", ""]
  if prior:
    ref = prior["gla_reference_torch"]
    lines += [f"{prior['N']} × {prior['C']} logits ({prior['data']}), JAX on "
              f"{prior.get('jax_device')}, reference in torch {prior['torch_version']}.", "",
              "| solver | time | of which checks | reads of E | memory floor | × floor | "
              "iterations | residual |", "|---|---|---|---|---|---|---|---|",
              f"| GLA reference SGD ({ref['steps']} steps) | {ref['seconds'] * 1e3:.1f} ms | | | | "
              f"| {ref['steps']} | {ref['residual']:.1e} |"]
    profiles = []
    for solver in _solver_rows(prior):
      r = prior[solver]
      if r.get("profile"):
        profiles.append(f"- {solver}: {r['profile']['kernels_per_step']:.0f} kernels and "
                        f"{r['profile']['kernel_ms_per_step']:.3f} ms of kernel time per solve "
                        f"(wall {r['seconds'] * 1e3:.3f} ms); top: " + ", ".join(
                            f"`{k['name'][:40]}` {k['ms_per_step']:.3f} ms"
                            for k in r["profile"]["top_kernels"][:3]))
      floor = r.get("memory_floor_seconds")
      checks = (f"{r['checks_seconds'] * 1e3:.2f} ms" if r.get("checks_seconds") is not None
                else "")
      lines.append(f"| {solver} | {r['seconds'] * 1e3:.2f} ms | {checks} | "
                   f"{r.get('passes_over_E')} | {floor * 1e3:.3f} ms | "
                   f"{r['times_memory_floor']:.1f} | {r['iterations']} | {r['residual']:.1e} |"
                   if floor else
                   f"| {solver} | {r['seconds'] * 1e3:.2f} ms | {checks} | | | | "
                   f"{r['iterations']} | {r['residual']:.1e} |")
    lines += ["", *(["Profile (jax.profiler, 3 solves):", "", *profiles, ""] if profiles else [])]
  else:
    lines += ["No result (see prior.log):", "", "```",
              *_read(f"{logs}/prior.log").splitlines()[-25:], "```", ""]
  lines += _contrastive(logs, args.contrastive_args)
  lines += _explore(logs, args.explore_args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines))


if __name__ == "__main__":
  main()

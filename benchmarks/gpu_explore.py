"""Issue 14's exploration on one accelerator call: which changes move the ViT-B/16 train step.

Runs, within ``--budget`` seconds (each part skipped once the budget is spent):
1. attention numerics: ``attend`` with cuDNN's flash kernel and with the XLA einsum path, in
   bfloat16, against a float64 reference (output) and XLA's float32 gradients at "highest",
   ViT (L = 197) and causal text (L = 77);
2. the prior solve (newton, fixed_point; XLA and Pallas passes) with XLA's while loops in
   CUDA-graph command buffers (no host round trip per iteration), against ``bench_prior.py``'s
   default run;
3. train-step variants of ``bench_train_step.py`` (bfloat16), each in its own process so that
   XLA_FLAGS can differ: three q/k/v matmuls (the previous implementation's, from
   tests/test_attention.py) with the default attention kernel, no Triton GEMMs, XLA's cuDNN
   layer norm, twice the batch (``bench_train_step.py`` itself measures the default: fused
   q/k/v, cuDNN attention).

    python benchmarks/gpu_explore.py --out DIR [--preset vit_b16] [--batch 256] [--budget 200]

Writes ``DIR/explore.json`` (``gpu_report.py`` renders it) and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = ["--dtype", "bfloat16", "--steps", "15", "--warmup", "3", "--repeats", "1", "--skip_torch"]
NO_TRITON_GEMM = "--xla_gpu_enable_triton_gemm=false"
CUDNN_LAYER_NORM = "--xla_gpu_enable_cudnn_layer_norm=true"
COMMAND_BUFFERS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
                   "WHILE,CONDITIONAL")


def run_variant(argv: list[str]) -> None:
  """``bench_train_step.main`` with ``argv``; ``--separate-qkv`` first restores the three q/k/v
  matmuls of the previous implementation (the attention kernel stays ``--attention``'s)."""
  sys.path.insert(0, HERE)
  if argv and argv[0] == "--separate-qkv":
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from glajax.models import layers  # pylint: disable=import-outside-toplevel
    from test_attention import legacy_attention_call  # pylint: disable=import-outside-toplevel
    layers.Attention.__call__ = (
        lambda self, x: legacy_attention_call(self, x, self.implementation))
    argv = argv[1:]
  import bench_train_step  # pylint: disable=import-outside-toplevel
  sys.argv = ["bench_train_step.py", *argv]
  bench_train_step.main()


def attention_numerics() -> list[dict]:
  """cuDNN vs XLA ``attend`` in bfloat16: ‖x − ref‖/‖ref‖ of the output against the float64
  NumPy reference of tests/test_attention.py, and of the q/k/v gradients of ⟨out, g⟩ (random
  cotangent g) against XLA's float32 gradients at "highest" precision."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from glajax.models.layers import attend  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
  from test_attention import _reference  # pylint: disable=import-outside-toplevel

  def reference(q, k, v, g, causal):
    with jax.default_matmul_precision("highest"):
      grads = jax.grad(lambda q, k, v: jnp.sum(
          attend(q, k, v, causal=causal, implementation="xla") * g), argnums=(0, 1, 2))(q, k, v)
    return [_reference(q, k, v, causal)] + [np.asarray(x, np.float64) for x in grads]

  rows = []
  rng = np.random.default_rng(0)
  for name, (b, length, heads, dim, causal) in {"vision": (8, 197, 12, 64, False),
                                                 "text": (8, 77, 8, 64, True)}.items():
    q, k, v, g = (rng.normal(size=(b, length, heads, dim)).astype(np.float32) for _ in range(4))
    ref = reference(q, k, v, g, causal)
    for impl in ("xla", "cudnn"):
      args = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
      gb = jnp.asarray(g, jnp.bfloat16)
      fn = jax.jit(lambda q, k, v, impl=impl: attend(q, k, v, causal=causal, implementation=impl))
      grad = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(
          attend(q, k, v, causal=causal, implementation=impl).astype(jnp.float32) * gb),
          argnums=(0, 1, 2)))
      try:
        got = [fn(*args)] + list(grad(*args))
        lowered = fn.lower(*args).as_text()
        errors = [float(np.linalg.norm(np.asarray(x, np.float64) - r) / np.linalg.norm(r))
                  for x, r in zip(got, ref)]
        rows.append({"shape": name, "impl": impl, "rel_err_out": errors[0],
                     "rel_err_dq": errors[1], "rel_err_dk": errors[2], "rel_err_dv": errors[3],
                     "cudnn_custom_call": "cudnn" in lowered.lower()})
      except Exception as e:  # pylint: disable=broad-except
        rows.append({"shape": name, "impl": impl, "error": f"{type(e).__name__}: {e}"[:400]})
  return rows


def _run(cmd: list[str], env_extra: dict, timeout: float, log_path: str) -> tuple[int, float]:
  env = {**os.environ, **env_extra}
  start = time.time()
  with open(log_path, "w") as log:
    try:
      rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      rc = 124
  return rc, time.time() - start


def _tail(path: str, lines: int = 6) -> str:
  with open(path) as f:
    return "".join(f.readlines()[-lines:])[-800:]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--budget", type=float, default=200.0)
  parser.add_argument("--preset", default="vit_b16", help="bench_train_step's (small: a CPU try)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--prior-size", default="50000x1000", help="N x C of the prior run")
  parser.add_argument("--variant", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.variant is not None:
    return run_variant(args.variant)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  left = lambda: args.budget - (time.time() - start)
  report = {"preset": args.preset, "variants": [], "skipped": []}

  def save():
    with open(os.path.join(args.out, "explore.json"), "w") as f:
      json.dump(report, f, indent=1)

  report["attention_numerics"] = attention_numerics()
  print(json.dumps(report["attention_numerics"], indent=1), flush=True)
  save()

  def variant(name, extra_args, flags="", legacy=None, batch=args.batch):
    if left() < 30:
      report["skipped"].append(name)
      return
    out = os.path.join(args.out, f"v_{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--variant",
           *([legacy] if legacy else []), *TRAIN, "--preset", args.preset, "--batch",
           str(batch), "--out", out, *extra_args]
    log = os.path.join(args.out, f"v_{name}.log")
    rc, seconds = _run(cmd, {"XLA_FLAGS": flags} if flags else {}, left(), log)
    row = {"name": name, "rc": rc, "seconds": round(seconds, 1), "flags": flags, "batch": batch,
           "legacy": legacy, "args": extra_args}
    if rc == 0:
      with open(out) as f:
        result = json.load(f)
      row.update(images_per_s=result["jax_images_per_s"], mfu=result.get("jax_mfu"))
    else:
      row["log_tail"] = _tail(log)
    report["variants"].append(row)
    print(json.dumps(row), flush=True)
    save()

  if left() >= 30:
    samples, classes = args.prior_size.split("x")
    log, out = (os.path.join(args.out, f"prior_command_buffers.{ext}") for ext in ("log", "json"))
    rc, seconds = _run([sys.executable, os.path.join(HERE, "bench_prior.py"), "--num-samples",
                        samples, "--num-classes", classes, "--reference-steps", "10",
                        "--repeats", "5", "--solvers", "newton,fixed_point",
                        "--implementations", "xla,pallas", "--out", out],
                       {"XLA_FLAGS": COMMAND_BUFFERS}, left(), log)
    report["prior_command_buffers"] = {"rc": rc, "seconds": round(seconds, 1),
                                       "flags": COMMAND_BUFFERS}
    if rc == 0:
      with open(out) as f:
        result = json.load(f)
      report["prior_command_buffers"].update(
          {name: row for name, row in result.items()
           if name.split("_pallas")[0] in ("newton", "fixed_point")})
    else:
      report["prior_command_buffers"]["log_tail"] = _tail(log)
  else:
    report["skipped"].append("prior_command_buffers")
  save()
  # Most informative first (each costs ~50 s on the H200). Measured twice already and dropped:
  # the previous attention (2 782 images/s) and the fused q/k/v with XLA attention (2 653).
  variant("separate_qkv_default_attention", [], legacy="--separate-qkv")
  variant("no_triton_gemm", [], flags=NO_TRITON_GEMM)
  variant("cudnn_layer_norm", [], flags=CUDNN_LAYER_NORM)
  variant("batch_x2", [], batch=2 * args.batch)

  save()
  print("\n| variant | flags | batch | images/s | MFU | rc | s |\n|---|---|---|---|---|---|---|")
  for row in report["variants"]:
    mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") else ""
    print(f"| {row['name']} | {row['flags']} | {row['batch']} | "
          f"{row.get('images_per_s', 0):.0f} | {mfu} | {row['rc']} | {row['seconds']} |")
  print("skipped:", report["skipped"], "total s:", round(time.time() - start))


if __name__ == "__main__":
  main()

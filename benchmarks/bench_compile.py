"""Compile time and program size of the train step, from the program alone (no weights, nothing
runs).

Each model is built abstractly (``nnx.eval_shape``) at bfloat16 compute, float32 parameters (the
recipes' defaults); its train step (``engine.make_train_step`` of ``bench_memory``'s tasks:
``classifier`` = WiSE-FT's end-to-end fine-tuning, ``carot`` = CaRot's two towers with the EMA
teacher) is lowered with abstract inputs and compiled for one device, timed separately, with the
rematerialisation policy ``--remat`` sets on both towers. The program's size: matmuls
(``stablehlo.dot_general``) in the lowered program and lines of the optimised HLO. The glajax it
measures is the one on ``PYTHONPATH``, so one script times two versions:

  PYTHONPATH=/path/to/old python benchmarks/bench_compile.py --out old.json
  PYTHONPATH=. python benchmarks/bench_compile.py --out new.json
  python benchmarks/bench_compile.py --table old.json new.json
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("GLAJAX_BENCH_DEVICES", "1")   # bench_memory's virtual devices: one
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import glajax  # noqa: E402
from bench_memory import _abstract, _image_size, _task, write_results  # noqa: E402
from glajax import parallel  # noqa: E402
from glajax.models import layers  # noqa: E402
from glajax.models.clip import CLIP, CLIPConfig  # noqa: E402
from glajax.train import engine  # noqa: E402
from glajax.train.state import create_train_state, make_optimizer  # noqa: E402

PRESETS = {"vit_b16": CLIPConfig.vit_b16, "vit_l14": CLIPConfig.vit_l14}
TASKS = ("classifier", "carot")


def _with_remat(config: CLIPConfig, remat: str) -> CLIPConfig:
  return dataclasses.replace(config, vision=dataclasses.replace(config.vision, remat=remat),
                             text=dataclasses.replace(config.text, remat=remat))


def measure(preset: str, task_name: str, remat: str, batch: int) -> dict:
  """Seconds to lower and to compile the train step of ``preset`` / ``task_name`` at ``batch``
  on one device, and the program's size."""
  config = _with_remat(PRESETS[preset](), remat)
  model = nnx.eval_shape(lambda: CLIP(config, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                      rngs=nnx.Rngs(0)))
  task, recipe = _task(task_name, model, 1000)
  mesh = parallel.make_mesh(jax.devices()[:1])
  graphdef, params, rest = engine.split_model(task.model)
  tx, _ = make_optimizer(recipe.optimizer, params, 10_000, engine.param_groups(task.model))
  state = jax.eval_shape(
      lambda p: create_train_state(p, tx, 0, task.teacher_update is not None), params)
  shardings = (parallel.shardings(state, mesh), parallel.shardings(rest, mesh))
  step = engine.make_train_step(graphdef, task.loss_fn, tx, mesh,
                                teacher_update=task.teacher_update, shardings=shardings)
  size = _image_size(task.model.backbone)
  inputs = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  clock = time.perf_counter()
  lowered = step.lower(_abstract(state, shardings[0]), _abstract(rest, shardings[1]), inputs)
  lower_s = time.perf_counter() - clock
  clock = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - clock
  return {"model": preset, "task": task_name, "remat": remat, "batch": batch,
          "scanned": hasattr(layers, "Blocks"), "commit": _commit(),
          "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
          "matmuls": lowered.as_text().count("stablehlo.dot_general"),
          "hlo_lines": compiled.as_text().count("\n")}


def _commit() -> str:
  directory = os.path.dirname(os.path.dirname(os.path.abspath(glajax.__file__)))
  try:
    return subprocess.run(["git", "-C", directory, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "?"


def table(rows: list[dict]) -> str:
  """A markdown table of ``measure`` results, as given."""
  lines = ["| glajax | blocks | model | task | remat | lower (s) | compile (s) | matmuls "
           "| optimised HLO lines |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['commit']} | {'scanned' if r['scanned'] else 'unrolled'} | "
                 f"{r['model']} | {r['task']} | {r['remat']} | {r['lower_s']} | "
                 f"{r['compile_s']} | {r['matmuls']} | {r['hlo_lines']:,} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(PRESETS))
  parser.add_argument("--tasks", default="classifier")
  parser.add_argument("--remat", default="none", help="policies, comma-separated")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  parser.add_argument("--table", nargs="+", default=None,
                      help="print the table of these JSON files instead of measuring")
  args = parser.parse_args()
  if args.table:
    rows = [row for path in args.table for row in json.load(open(path))["rows"]]
    print(table(rows))
    return
  rows = []
  for model in args.models.split(","):
    for task in args.tasks.split(","):
      for remat in args.remat.split(","):
        rows.append(measure(model, task, remat, args.batch))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  write_results(rows, jax.devices()[0].device_kind, table(rows), args.out)


if __name__ == "__main__":
  main()

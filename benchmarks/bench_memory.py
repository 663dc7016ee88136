"""Per-device memory of the train step, replicated vs FSDP, from the compiled program alone.

Each model is built abstractly (``nnx.eval_shape``: shapes, no weights), its train step is
``engine.make_train_step`` placed as ``train.sharding`` says, lowered with abstract inputs and
compiled for a mesh of N devices (the host platform's virtual devices: no accelerator needed).
From the compiled step, per device:

* state = parameters + optimiser state (+ the EMA teacher), summed over the step's input
  shardings (one shard of each array);
* arguments, temporaries: XLA's ``compiled.memory_analysis()`` (the step's outputs alias its
  donated state, so arguments + temporaries is the step's footprint);

Under FSDP the state falls as 1/N; the temporaries hold the activations of the batch's 1/N, the
parameters outside the towers' blocks gathered whole, and each tower's blocks gathered one at a
time inside its scan (with remat "none", the backward pass keeps each block's weights).

Adding a model is one line in ``MODELS``. Usage::

  python benchmarks/bench_memory.py                                # the table, 1 / 8 / 64 devices
  python benchmarks/bench_memory.py --models vit_b16 --devices 1,8 --tasks classifier,carot
  python benchmarks/bench_memory.py --models vit_l14_336 --devices 64 --model_parallel 1,4
"""
from __future__ import annotations

import os
import sys

DEVICE_COUNT = int(os.environ.get("GLAJAX_BENCH_DEVICES", "64"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICE_COUNT}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402  (after XLA_FLAGS: JAX reads them when it starts)
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from glajax import parallel  # noqa: E402
from glajax.models import layers  # noqa: E402
from glajax.models.clip import CLIP, CLIPConfig  # noqa: E402
from glajax.models.heads import LinearHead  # noqa: E402
from glajax.models.siglip import SigLIP, SiglipConfig  # noqa: E402
from glajax.train import engine, recipes  # noqa: E402
from glajax.train.state import create_train_state, make_optimizer  # noqa: E402

_BUILD = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)   # the recipes' compute dtype


@dataclasses.dataclass(frozen=True)
class Model:
  build: Callable[[], nnx.Module]   # an image-text model with encode_image / encode_text
  batch: int                        # the papers' batch size
  setting: str                      # where the batch size comes from


MODELS = {
    "vit_b16": Model(lambda: CLIP(CLIPConfig.vit_b16(), rngs=nnx.Rngs(0), **_BUILD), 512,
                     "WiSE-FT / FLYP / CaRot ViT-B/16, batch 512"),
    "vit_l14_336": Model(lambda: CLIP(CLIPConfig.vit_l14_336(), rngs=nnx.Rngs(0), **_BUILD), 512,
                         "WiSE-FT ViT-L/14@336, batch 512"),
    "siglip_so400m": Model(lambda: SigLIP(SiglipConfig.so400m_p14_384(), rngs=nnx.Rngs(0),
                                          **_BUILD), 512,
                           "SigLIP So400m/14@384 with WiSE-FT's recipe, batch 512 (classifier)"),
}
TASKS = ("classifier", "carot")
CLASSES, PROMPT_LENGTH = 1000, 16


def _image_size(model) -> int:
  return model.config.vision.image_size


def _task(name: str, model, classes: int):
  """(Task, recipe) of ``name`` on the abstract ``model``: ``classifier`` is WiSE-FT's
  end-to-end fine-tuning (image tower + linear head, AdamW, text tower frozen), ``carot``
  CaRot's (both towers, AdamW, the EMA teacher)."""
  if name == "classifier":
    recipe = recipes.finetune()
    size = _image_size(model)
    graphdef, state = nnx.split(model)
    width = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode_image(x), state,
                           jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[-1]
    head = nnx.eval_shape(lambda: LinearHead(np.zeros((width, classes), np.float32)))
    return recipes.classifier_task(model, head, recipe), recipe
  recipe = recipes.carot()
  recipe.total_steps = 10_000
  text = model.config.text

  def tokenize(prompts):   # BOS, PROMPT_LENGTH - 2 ids, EOS: a prompt's length after trimming
    ids = np.full((len(prompts), text.max_position_embeddings), text.pad_token_id, np.int32)
    ids[:, 1:PROMPT_LENGTH - 1] = 7
    ids[:, 0], ids[:, PROMPT_LENGTH - 1] = text.bos_token_id, text.eos_token_id
    return ids

  names = [f"class {i}" for i in range(classes)]
  return recipes.contrastive_task(model, tokenize, names, ["a photo of a {}."], recipe), recipe


def _abstract(tree, tree_shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      tree_shardings)


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def measure(model_name: str, task_name: str, devices: int, how: str,
            batch: int | None = None, model_parallel: int = 1) -> dict:
  """Per-device bytes of the compiled train step of ``model_name`` / ``task_name`` on
  ``devices`` devices, placed as ``how`` says, at ``batch`` (default: the model's), on a mesh
  whose ``model`` axis has ``model_parallel`` devices (tensor parallelism,
  ``train.model_parallel``)."""
  spec = MODELS[model_name]
  batch = spec.batch if batch is None else batch
  task, recipe = _task(task_name, nnx.eval_shape(spec.build), CLASSES)
  mesh = parallel.make_mesh(jax.devices()[:devices], model_parallel)
  graphdef, params, rest = engine.split_model(task.model)
  tx, _ = make_optimizer(recipe.optimizer, params, 10_000, engine.param_groups(task.model))
  state = jax.eval_shape(
      lambda p: create_train_state(p, tx, 0, task.teacher_update is not None), params)
  shardings = (parallel.shardings(state, mesh, how, layers.tensor_axis),
               parallel.shardings(rest, mesh, how, layers.tensor_axis))
  step = engine.make_train_step(graphdef, task.loss_fn, tx, mesh,
                                teacher_update=task.teacher_update, shardings=shardings)
  size = _image_size(task.model.backbone)
  inputs = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  clock = time.perf_counter()
  compiled = step.lower(_abstract(state, shardings[0]), _abstract(rest, shardings[1]),
                        inputs).compile()
  seconds = time.perf_counter() - clock
  stats = compiled.memory_analysis()
  return {"model": model_name, "task": task_name, "devices": devices, "sharding": how,
          "model_parallel": model_parallel,
          "batch": batch, "setting": spec.setting,
          "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
          "state_bytes": _bytes_per_device(_abstract(state, shardings[0])),
          "argument_bytes": int(stats.argument_size_in_bytes),
          "temp_bytes": int(stats.temp_size_in_bytes),
          "output_bytes": int(stats.output_size_in_bytes),
          "alias_bytes": int(stats.alias_size_in_bytes),
          "compile_s": round(seconds, 1)}


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def _gib(n: int) -> str:
  return f"{n / 2**30:,.2f}"


def table(rows: list[dict]) -> str:
  """A markdown table of ``measure`` results."""
  lines = ["| model | task | batch | devices | sharding | state / device (MiB) "
           "| × 1 device | arguments (MiB) | temporaries (GiB) | compile (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  label = lambda r: r["sharding"] + (f" + model {r['model_parallel']}"
                                     if r.get("model_parallel", 1) > 1 else "")
  ones = {(r["model"], r["task"]): r["state_bytes"] for r in rows if r["devices"] == 1}
  for r in rows:
    one = ones.get((r["model"], r["task"]))
    ratio = f"{r['state_bytes'] / one:.3f}" if one else "—"
    lines.append(f"| {r['model']} | {r['task']} | {r['batch']} | {r['devices']} | "
                 f"{label(r)} | {_mib(r['state_bytes'])} | {ratio} | "
                 f"{_mib(r['argument_bytes'])} | {_gib(r['temp_bytes'])} | {r['compile_s']} |")
  return "\n".join(lines)


def _versions() -> dict:
  import flax  # noqa  (versions only)
  import optax  # noqa  (versions only)
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__}


def write_results(rows: list[dict], device: str, table_text: str, out: str | None) -> None:
  """Prints the device line (``device``, the processor, the versions) and ``table_text``; writes
  {"versions", "rows"} to ``out`` as JSON when given."""
  print(f"{device}, {platform.processor() or platform.machine()}, {json.dumps(_versions())}")
  print(table_text)
  if out:
    with open(out, "w") as f:
      json.dump({"versions": _versions(), "rows": rows}, f, indent=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--tasks", default="classifier")
  parser.add_argument("--devices", default="1,8,64")
  parser.add_argument("--batch", type=int, default=None, help="default: each model's")
  parser.add_argument("--model_parallel", default="1",
                      help="model-axis sizes (tensor parallelism) for N > 1 devices, e.g. 1,4")
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = parser.parse_args()
  models, tasks = args.models.split(","), args.tasks.split(",")
  counts = [int(n) for n in args.devices.split(",")]
  model_sizes = [int(m) for m in args.model_parallel.split(",")]
  for name, known in (("--models", MODELS), ("--tasks", TASKS)):
    unknown = set(models if name == "--models" else tasks) - set(known)
    if unknown:
      parser.error(f"{name}: expected names from {', '.join(known)}, found {sorted(unknown)}")
  if max(counts) > jax.device_count():
    parser.error(f"--devices: at most {jax.device_count()} (GLAJAX_BENCH_DEVICES)")
  rows = []
  for model in models:
    for task in tasks:
      for n in counts:
        for m in ([1] if n == 1 else [m for m in model_sizes if n % m == 0]):
          for how in (("replicated",) if n == 1 else parallel.SHARDINGS):
            rows.append(measure(model, task, n, how, args.batch, m))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  write_results(rows, f"{jax.devices()[0].device_kind} ×{jax.device_count()} (host platform)",
                table(rows), args.out)


if __name__ == "__main__":
  main()

"""Train-step throughput (images/s) of glajax's engine vs transformers' PyTorch CLIPModel.

The recipe is WiSE-FT's end-to-end fine-tuning (image tower + linear head on normalised features,
CE, AdamW lr 3e-5 wd 0.1, grad-norm clip 1.0), the same model and optimiser on both sides:
glajax through ``engine.make_train_step`` (jit, donated state, mesh over all local devices),
PyTorch with ``torch.optim.AdamW`` and ``torch.autocast`` for bfloat16.

Usage:
  python benchmarks/bench_train_step.py --preset small --batch 32 --dtype float32
  python benchmarks/bench_train_step.py --preset vit_b16 --batch 256 --dtype bfloat16   # a GPU
      [--torch-compile] [--profile-steps 3] [--out result.json]

``--torch-compile`` makes the PyTorch anchor the way an expert runs it: ``torch.compile`` of the
model, SDPA attention (``attn_implementation="sdpa"``), fused AdamW (``fused=True``), autocast
bfloat16. ``--profile-steps N`` traces N glajax steps with ``jax.profiler`` (Perfetto JSON) and
reports the top kernels by total time.

Model FLOPs utilisation = images/s · training FLOPs per image / peak FLOP/s, with training FLOPs
= 3 × forward matmul FLOPs of the image tower (ViT-B/16 at 224 px: ≈ 106 GFLOP); the peak comes
from ``--peak_tflops`` or a table of known accelerators (none for CPUs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glajax.models.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from glajax.models.heads import LinearHead
from glajax.train import engine, recipes
from glajax.parallel import make_mesh, replicated, shard_batch
from glajax.train.state import create_train_state, make_optimizer

PRESETS = {
    "small": (CLIPConfig(vision=CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=256,
                                                 intermediate_size=1024, num_hidden_layers=4,
                                                 num_attention_heads=4),
                         text=CLIPTextConfig(vocab_size=1000, hidden_size=64,
                                             intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=2, bos_token_id=998,
                                             eos_token_id=999),
                         projection_dim=128), 100),
    "vit_b16": (CLIPConfig.vit_b16(), 1000),
}

# Dense bfloat16 peak FLOP/s of accelerators, by a substring of jax's device_kind.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def train_flops_per_image(vision: CLIPVisionConfig) -> float:
  """3 × forward FLOPs (2 per multiply-add) of the ViT's matmuls: patch embedding, per block
  QKV/out projections 4d², MLP 2·d·d_ff per token, and attention 2·N²·d."""
  tokens, width = vision.grid_size ** 2 + 1, vision.hidden_size
  per_block = (tokens * (4 * width ** 2 + 2 * width * vision.intermediate_size)
               + 2 * tokens ** 2 * width)
  patch = (tokens - 1) * 3 * vision.patch_size ** 2 * width
  return 3 * 2 * (vision.num_hidden_layers * per_block + patch)


def _data(config: CLIPConfig, batch: int, classes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  size = config.vision.image_size
  return (rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          rng.integers(0, classes, batch).astype(np.int32))


def bench_jax(config: CLIPConfig, classes: int, images, labels, dtype, steps: int,
              warmup: int, profile_steps: int = 0, profile_dir: str | None = None) -> float:
  clip = CLIP(config, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  head = LinearHead(np.random.default_rng(1).normal(
      size=(config.projection_dim, classes)).astype(np.float32))
  recipe = recipes.finetune()
  task = recipes.classifier_task(clip, head, recipe)
  mesh = make_mesh(jax.local_devices())
  graphdef, params, rest = engine.split_model(task.model)
  tx, _ = make_optimizer(recipe.optimizer, params, total_steps=10_000)
  state = jax.device_put(create_train_state(params, tx, 0), replicated(mesh))
  rest = jax.device_put(rest, replicated(mesh))
  step = engine.make_train_step(graphdef, task.loss_fn, tx, mesh)
  batch = shard_batch({"image": images, "label": labels}, mesh)
  for _ in range(warmup):
    state, metrics = step(state, rest, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, rest, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  if profile_steps:
    jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
    for _ in range(profile_steps):
      state, metrics = step(state, rest, batch)
    jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
  return steps * len(labels) / seconds


def top_kernels(trace_dir: str, steps: int, top: int = 15) -> list[dict]:
  """Sums complete events of the Perfetto trace by name, on the device's timelines when there
  are any (process names with GPU/TPU), else on all: the top ``top`` by total time, per step."""
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  paths = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
  if not paths:
    return []
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {e["pid"]: e["args"].get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in names.items() if "GPU" in name or "TPU" in name}
  totals, counts = {}, {}
  for e in events:
    if (e.get("ph") != "X" or (device and e.get("pid") not in device)
        or e["name"].startswith("$")):   # Python frames of the host trace
      continue
    totals[e["name"]] = totals.get(e["name"], 0.0) + float(e.get("dur", 0.0))
    counts[e["name"]] = counts.get(e["name"], 0) + 1
  whole = sum(totals.values()) or 1.0
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return [{"name": name[:120], "ms_per_step": us / 1e3 / steps, "share": us / whole,
           "calls_per_step": counts[name] / steps} for name, us in ranked]


def bench_torch(config: CLIPConfig, classes: int, images, labels, bf16: bool, steps: int,
                warmup: int, compile_: bool = False) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf_config = transformers.CLIPConfig.from_dict(config.to_hf())
  if compile_:   # the expert's PyTorch: SDPA attention, torch.compile, fused AdamW
    hf = transformers.CLIPModel._from_config(hf_config, attn_implementation="sdpa")  # pylint: disable=protected-access
  else:
    hf = transformers.CLIPModel(hf_config)

  class Classifier(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.vision_model, self.visual_projection = hf.vision_model, hf.visual_projection
      self.head = torch.nn.Linear(config.projection_dim, classes)

    def forward(self, pixels):
      features = self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)
      return self.head(features / features.norm(dim=-1, keepdim=True))

  model = Classifier().to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.1, **({"fused": True} if compile_ else {}))
  if compile_:
    model = torch.compile(model)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  targets = torch.from_numpy(labels.astype(np.int64)).to(device)

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      logits = model(pixels)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for _ in range(warmup):
    step()
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return steps * len(labels) / (time.perf_counter() - start)


def _peak_flops(args) -> float | None:
  if args.peak_tflops:
    return args.peak_tflops * 1e12
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
  return None if peak is None else peak * 1e12 * jax.local_device_count()


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=2, help="alternating runs; best kept")
  parser.add_argument("--peak_tflops", type=float, default=0.0)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--remat", action="store_true", help="rematerialise the image tower")
  parser.add_argument("--torch-compile", action="store_true",
                      help="PyTorch anchor with torch.compile + SDPA + fused AdamW")
  parser.add_argument("--profile-steps", type=int, default=0,
                      help="trace this many glajax steps and report the top kernels")
  parser.add_argument("--profile-dir", default="/tmp/glajax_trace")
  parser.add_argument("--out", default=None, help="also write the report as JSON here")
  args = parser.parse_args()

  config, classes = PRESETS[args.preset]
  if args.remat:
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, remat=True))
  images, labels = _data(config, args.batch, classes)
  bf16 = args.dtype == "bfloat16"
  results = {"jax": [], "torch": []}
  for repeat in range(args.repeats):
    results["jax"].append(bench_jax(config, classes, images, labels,
                                    jnp.bfloat16 if bf16 else jnp.float32, args.steps,
                                    args.warmup, args.profile_steps if repeat == 0 else 0,
                                    args.profile_dir))
    if not args.skip_torch:
      results["torch"].append(bench_torch(config, classes, images, labels, bf16, args.steps,
                                          args.warmup, args.torch_compile))
  flops = train_flops_per_image(config.vision)
  peak = _peak_flops(args)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  report = {
      "preset": args.preset, "batch": args.batch, "dtype": args.dtype, "steps": args.steps,
      "device": f"{jax.local_device_count()} x {jax.devices()[0].device_kind}",
      "platform": platform.platform(), "processor": platform.processor(),
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__, "python": platform.python_version()},
      "train_gflop_per_image": flops / 1e9,
      "jax_images_per_s": max(results["jax"]),
      "torch_images_per_s": max(results["torch"]) if results["torch"] else None,
      "torch_anchor": ("torch.compile + SDPA + fused AdamW" if args.torch_compile
                       else "eager (transformers default attention)"),
      "all_runs": results,
  }
  if report["torch_images_per_s"]:
    report["speedup"] = report["jax_images_per_s"] / report["torch_images_per_s"]
  if peak:
    report["jax_mfu"] = report["jax_images_per_s"] * flops / peak
    if report["torch_images_per_s"]:
      report["torch_mfu"] = report["torch_images_per_s"] * flops / peak
  if args.profile_steps:
    report["top_kernels"] = top_kernels(args.profile_dir, args.profile_steps)
  print(json.dumps(report, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()

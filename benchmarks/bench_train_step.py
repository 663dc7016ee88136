"""Train-step throughput (images/s) and MFU of glajax's engine, against PyTorch for the classifier.

Tasks (``--task``), each through ``engine.make_train_step`` (jit, donated state, mesh over all
local devices):
- ``classifier``: WiSE-FT's end-to-end fine-tuning (image tower + linear head on normalised
  features, CE, AdamW lr 3e-5 wd 0.1, grad-norm clip 1.0); the same model and optimiser run in
  PyTorch (transformers ``CLIPModel``, ``torch.optim.AdamW``, ``torch.autocast`` for bfloat16);
- ``flyp``: FLYP's contrastive step (both towers, the symmetric CLIP loss, each image paired with a
  class prompt of ``--prompt-length`` tokens);
- ``carot``: CaRot's step (FLYP + orthogonality + cross term + self-distillation from the EMA
  teacher, whose forward pass both towers run too). No PyTorch anchor for the last two: MFU only.

Usage:
  python benchmarks/bench_train_step.py --preset small --batch 32 --dtype float32
  python benchmarks/bench_train_step.py --preset vit_b16 --batch 256 --dtype bfloat16   # a GPU
      [--torch-compile] [--profile-steps 3] [--attention auto|xla|cudnn] [--out result.json]
  python benchmarks/bench_train_step.py --preset vit_b16 --batch 512 --dtype bfloat16 \
      --task flyp --skip_torch
  python benchmarks/bench_train_step.py --preset demo --batch 128 --unroll 2   # no scan loop

``--torch-compile`` makes the PyTorch anchor the way an expert runs it: ``torch.compile`` of the
model, SDPA attention (``attn_implementation="sdpa"``), fused AdamW (``fused=True``), autocast
bfloat16. ``--profile-steps N`` traces N glajax steps with ``jax.profiler`` (Perfetto JSON) and
reports the top kernels by total time.

Model FLOPs utilisation = images/s · training FLOPs per image / peak FLOP/s. Training FLOPs are
3 × the forward matmul FLOPs (2 per multiply-add) of the towers the step trains (ViT-B/16 at
224 px: ≈ 106 GFLOP per image), plus 1 × forward of both towers for CaRot's teacher; the peak
comes from ``--peak_tflops`` or a table of known accelerators (none for CPUs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glajax.models.clip import CLIP, CLIPConfig
from glajax.models.clip.modeling import CLIPTextConfig, CLIPVisionConfig
from glajax.models import layers
from glajax.models.heads import LinearHead
from glajax.train import engine, recipes
from glajax.parallel import make_mesh, replicated, shard_batch
from glajax.train.state import create_train_state, make_optimizer


def _demo_foundation() -> CLIPConfig:
  """The demo's foundation model (``glajax.demo.pretrain``): 32 px, patch 8, width 64, 2 blocks."""
  from glajax.demo import pretrain  # pylint: disable=import-outside-toplevel  (TensorFlow)
  return pretrain.foundation_config(pretrain.PretrainSpec())


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
    "demo": (_demo_foundation, 100),
}
TASKS = ("classifier", "flyp", "carot")

# Dense bfloat16 peak FLOP/s of accelerators, by a substring of jax's device_kind.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def _tower_macs(tokens: int, cfg) -> int:
  """Multiply-adds of one sequence's forward through a tower's blocks: per block the q/k/v/out
  projections 4·d², the MLP 2·d·d_ff per token, and attention 2·L²·d."""
  width = cfg.hidden_size
  per_block = tokens * (4 * width**2 + 2 * width * cfg.intermediate_size) + 2 * tokens**2 * width
  return cfg.num_hidden_layers * per_block


def image_forward_flops(vision: CLIPVisionConfig) -> float:
  """2 × multiply-adds of the ViT forward: the blocks plus the patch embedding."""
  tokens = vision.grid_size**2 + 1
  patch = (tokens - 1) * 3 * vision.patch_size**2 * vision.hidden_size
  return 2.0 * (_tower_macs(tokens, vision) + patch)


def text_forward_flops(text: CLIPTextConfig, length: int) -> float:
  return 2.0 * _tower_macs(length, text)


def train_flops_per_image(config: CLIPConfig, task: str = "classifier",
                          prompt_length: int = 0) -> float:
  """3 × forward FLOPs of what the step trains (the image tower; both towers for FLYP/CaRot),
  + 1 × both towers' forward for CaRot's teacher."""
  image = image_forward_flops(config.vision)
  if task == "classifier":
    return 3 * image
  both = image + text_forward_flops(config.text, prompt_length)
  return 3 * both + (both if task == "carot" else 0)


def _data(config: CLIPConfig, batch: int, classes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  size = config.vision.image_size
  return (rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          rng.integers(0, classes, batch).astype(np.int32))


def _prompt_tokenizer(text: CLIPTextConfig, length: int, seed: int = 0):
  """A stand-in tokenizer: BOS, random ids, EOS at ``length - 1``, padding (like a CLIP prompt
  of ``length`` tokens; the task trims the padding)."""
  rng = np.random.default_rng(seed)

  def tokenize(prompts):
    ids = np.full((len(prompts), text.max_position_embeddings), text.pad_token_id, np.int32)
    ids[:, 1:length - 1] = rng.integers(0, min(text.bos_token_id, text.eos_token_id),
                                        (len(prompts), length - 2))
    ids[:, 0], ids[:, length - 1] = text.bos_token_id, text.eos_token_id
    return ids

  return tokenize


def build_task(config: CLIPConfig, classes: int, task: str, dtype, prompt_length: int):
  """(Task, recipe) of ``task`` on a randomly initialised CLIP."""
  clip = CLIP(config, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  if task == "classifier":
    recipe = recipes.finetune()
    head = LinearHead(np.random.default_rng(1).normal(
        size=(config.projection_dim, classes)).astype(np.float32))
    return recipes.classifier_task(clip, head, recipe), recipe
  recipe = recipes.flyp() if task == "flyp" else recipes.carot()
  recipe.total_steps = 10_000
  names = [f"class {i}" for i in range(classes)]
  tokenizer = _prompt_tokenizer(config.text, prompt_length)
  return recipes.contrastive_task(clip, tokenizer, names, ["a photo of a {}."], recipe), recipe


def bench_jax(config: CLIPConfig, classes: int, images, labels, dtype, steps: int,
              warmup: int, profile_steps: int = 0, profile_dir: str | None = None,
              task: str = "classifier", prompt_length: int = 16) -> float:
  built, recipe = build_task(config, classes, task, dtype, prompt_length)
  mesh = make_mesh(jax.local_devices())
  graphdef, params, rest = engine.split_model(built.model)
  tx, _ = make_optimizer(recipe.optimizer, params, total_steps=10_000,
                         aliases=engine.param_groups(built.model))
  state = create_train_state(params, tx, 0, built.teacher_update is not None)
  state = jax.device_put(state, replicated(mesh))
  rest = jax.device_put(rest, replicated(mesh))
  step = engine.make_train_step(graphdef, built.loss_fn, tx, mesh,
                                teacher_update=built.teacher_update,
                                trained=engine.trained_leaves(params, recipe, built.model))
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
    try:   # a profiler failure (no CUPTI, say) must not lose the timing above
      jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
      for _ in range(profile_steps):
        state, metrics = step(state, rest, batch)
      jax.block_until_ready((state, metrics))
      jax.profiler.stop_trace()
    except Exception as e:  # pylint: disable=broad-except
      print(f"profile failed: {type(e).__name__}: {e}", file=sys.stderr)
  return steps * len(labels) / seconds


def device_kernels(trace_dir: str) -> tuple[dict, dict]:
  """(total µs, calls) by kernel name: complete events of the newest Perfetto trace under
  ``trace_dir``, on the device's timelines when there are any (process names with GPU/TPU).
  Read once per trace; ``top_kernels``, ``kernel_categories`` and ``kernel_totals`` summarise
  the result."""
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  paths = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
  if not paths:
    return {}, {}
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
  return totals, counts


def top_kernels(kernels: tuple[dict, dict], steps: int, top: int = 15) -> list[dict]:
  """The top ``top`` of ``device_kernels`` over ``steps`` traced steps by total time, per step."""
  totals, counts = kernels
  whole = sum(totals.values()) or 1.0
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return [{"name": name[:120], "ms_per_step": us / 1e3 / steps, "share": us / whole,
           "calls_per_step": counts[name] / steps} for name, us in ranked]


KERNEL_CATEGORIES = (   # (category, substrings of the kernel name), first match wins
    ("attention (cuDNN)", ("cudnn", "sdpa", "fmha", "flash")),
    ("GEMM", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "matmul", "dot")),
    ("convolution", ("conv",)),
    ("transpose / copy", ("transpose", "copy", "concatenate", "slice", "memcpy")),
    ("reduction (norms, losses, bias gradients)", ("reduce", "softmax", "norm")),
    ("elementwise", ("loop_", "fusion")),
)


def kernel_categories(kernels: tuple[dict, dict], steps: int,
                      flops_per_step: float | None = None,
                      peak_flops: float | None = None) -> list[dict]:
  """``device_kernels``' time per step by kind (``KERNEL_CATEGORIES`` by name), largest first;
  with the step's FLOPs and the peak, also the GEMMs' own efficiency (FLOPs / (GEMM time ×
  peak), all FLOPs counted as GEMM FLOPs: an upper bound) — whether the GEMMs or everything
  else is the gap to the MFU target."""
  totals, counts = kernels
  whole = sum(totals.values()) or 1.0
  rows = {}
  for name, us in totals.items():
    lowered = name.lower()
    kind = next((kind for kind, keys in KERNEL_CATEGORIES if any(k in lowered for k in keys)),
                "other")
    row = rows.setdefault(kind, {"category": kind, "ms_per_step": 0.0, "calls_per_step": 0.0})
    row["ms_per_step"] += us / 1e3 / steps
    row["calls_per_step"] += counts[name] / steps
  for row in rows.values():
    row["share"] = row["ms_per_step"] * 1e3 * steps / whole
  gemm = rows.get("GEMM")
  if gemm and flops_per_step and peak_flops:
    gemm["efficiency_upper_bound"] = flops_per_step / (gemm["ms_per_step"] / 1e3 * peak_flops)
  return sorted(rows.values(), key=lambda row: -row["ms_per_step"])


def kernel_totals(kernels: tuple[dict, dict], steps: int) -> dict:
  """Kernel launches and summed kernel time per step, from ``device_kernels``."""
  totals, counts = kernels
  return {"kernels_per_step": sum(counts.values()) / steps,
          "kernel_ms_per_step": sum(totals.values()) / 1e3 / steps}


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
  parser.add_argument("--task", choices=TASKS, default="classifier")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=2, help="alternating runs; best kept")
  parser.add_argument("--peak_tflops", type=float, default=0.0)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--remat", default="none", choices=tuple(layers.REMAT_POLICIES),
                      help="rematerialisation policy of the blocks (layers.REMAT_POLICIES)")
  parser.add_argument("--unroll", type=int, default=1,
                      help="blocks per scan iteration, both towers (the depth or more: no loop)")
  parser.add_argument("--attention", choices=layers.ATTENTION_IMPLEMENTATIONS, default="auto",
                      help="glajax's attention kernel (models.layers.attend)")
  parser.add_argument("--prompt-length", type=int, default=16,
                      help="tokens per class prompt for --task flyp/carot (BOS..EOS)")
  parser.add_argument("--torch-compile", action="store_true",
                      help="PyTorch anchor with torch.compile + SDPA + fused AdamW")
  parser.add_argument("--profile-steps", type=int, default=0,
                      help="trace this many glajax steps and report the top kernels")
  parser.add_argument("--profile-dir", default="/tmp/glajax_trace")
  parser.add_argument("--top-kernels", type=int, default=15)
  parser.add_argument("--out", default=None, help="also write the report as JSON here")
  args = parser.parse_args()

  config, classes = PRESETS[args.preset]
  config = config() if callable(config) else config
  run = dict(remat=args.remat, attention=args.attention, unroll=args.unroll)
  config = dataclasses.replace(config, vision=layers.with_run_options(config.vision, **run),
                               text=layers.with_run_options(config.text, **run))
  images, labels = _data(config, args.batch, classes)
  bf16 = args.dtype == "bfloat16"
  skip_torch = args.skip_torch or args.task != "classifier"
  results = {"jax": [], "torch": []}
  for repeat in range(args.repeats):
    results["jax"].append(bench_jax(config, classes, images, labels,
                                    jnp.bfloat16 if bf16 else jnp.float32, args.steps,
                                    args.warmup, args.profile_steps if repeat == 0 else 0,
                                    args.profile_dir, args.task, args.prompt_length))
    if not skip_torch and "torch_error" not in results:
      try:   # a PyTorch failure (e.g. torch.compile's) must not lose glajax's figures
        results["torch"].append(bench_torch(config, classes, images, labels, bf16, args.steps,
                                            args.warmup, args.torch_compile))
      except Exception as e:  # pylint: disable=broad-except
        results["torch_error"] = f"{type(e).__name__}: {e}"[:2000]
  flops = train_flops_per_image(config, args.task, args.prompt_length)
  peak = _peak_flops(args)
  report = {
      "preset": args.preset, "task": args.task, "batch": args.batch, "dtype": args.dtype,
      "steps": args.steps, "attention": args.attention, "remat": args.remat,
      "unroll": args.unroll,
      "device": f"{jax.local_device_count()} x {jax.devices()[0].device_kind}",
      "platform": platform.platform(), "processor": platform.processor(),
      "versions": _versions(),
      "train_gflop_per_image": flops / 1e9,
      "jax_images_per_s": max(results["jax"]),
      "torch_images_per_s": max(results["torch"]) if results["torch"] else None,
      "torch_error": results.pop("torch_error", None),
      "torch_anchor": (None if skip_torch else "torch.compile + SDPA + fused AdamW"
                       if args.torch_compile else "eager (transformers default attention)"),
      "all_runs": results,
  }
  if args.task != "classifier":
    report["prompt_length"] = args.prompt_length
  if report["torch_images_per_s"]:
    report["speedup"] = report["jax_images_per_s"] / report["torch_images_per_s"]
  if peak:
    report["jax_mfu"] = report["jax_images_per_s"] * flops / peak
    if report["torch_images_per_s"]:
      report["torch_mfu"] = report["torch_images_per_s"] * flops / peak
  if args.profile_steps:
    kernels = device_kernels(args.profile_dir)
    report["top_kernels"] = top_kernels(kernels, args.profile_steps, args.top_kernels)
    report["kernel_totals"] = kernel_totals(kernels, args.profile_steps)
    report["kernel_categories"] = kernel_categories(
        kernels, args.profile_steps, flops * args.batch if peak else None, peak)
  print(json.dumps(report, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)


def _versions() -> dict:
  versions = {"jax": jax.__version__, "python": platform.python_version()}
  for name in ("flax", "torch", "transformers"):
    try:
      versions[name] = __import__(name).__version__
    except ImportError:
      versions[name] = None
  return versions


if __name__ == "__main__":
  main()

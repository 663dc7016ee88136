"""Temporaries XLA's CPU compiler plans for the gradient of a CLIP image tower: the blocks
scanned (``layers.Blocks``) against the same blocks unrolled as a Python loop, and the levers
(``scan(unroll=…)``, remat policies). Compiles only; no accelerator needed.

The loss is Σ encode features² of the image tower (``VisionTransformer``), differentiated with
respect to every parameter, ``jax.jit(jax.grad(loss)).lower(params, images).compile()``; the
numbers are ``memory_analysis().temp_size_in_bytes``. Usage::

  python benchmarks/scan_temporaries.py                              # tiny tower, float32
  python benchmarks/scan_temporaries.py --dtype bfloat16
  python benchmarks/scan_temporaries.py --vit-b16 --batch 64 --dtype bfloat16 \\
      --variants scan,loop,unroll2
  XLA_FLAGS="--xla_dump_to=/tmp/scan --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*loss.*" \\
      python benchmarks/scan_temporaries.py --remat none --variants scan    # then read
  # *cpu_after_optimizations.txt (the while loops' tuples) and *-live-range.txt (the peak's buffers)

Variants: ``scan`` (the current code), ``loop`` (per-block slices of the stacks, ``Block.__call__``
in a Python loop), ``unroll2`` / ``unrollall`` (``jax.lax.scan(..., unroll=2 / True)``). Policies
(``--remat``): ``REMAT_POLICIES``' ``none``, ``dots``, ``block``; ``dots_all``
(``jax.checkpoint_policies.dots_saveable``: attention's batched matmuls kept too);
``no_elementwise`` (every matmul's and reduction's output kept, elementwise values recomputed);
``everything`` (``everything_saveable``). The scan's step is ``jax.checkpoint``-ed as in ``Blocks``
(``prevent_cse=False``), the loop's blocks with ``prevent_cse=True``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from glajax.models import layers  # noqa: E402
from glajax.models.clip import CLIPConfig  # noqa: E402
from glajax.models.clip.modeling import VisionTransformer  # noqa: E402

_MODE = {"variant": "scan", "remat": "none"}
# REMAT_POLICIES and three more (see the module docstring)
_KEPT = {"dot_general", "reduce_sum", "reduce_max", "reduce_min", "conv_general_dilated"}
POLICIES = dict(layers.REMAT_POLICIES, dots_all=jax.checkpoint_policies.dots_saveable,
                # every matmul's and reduction's output kept; elementwise values recomputed
                no_elementwise=lambda prim, *_, **__: prim.name in _KEPT,
                everything=jax.checkpoint_policies.everything_saveable)


def _blocks_call(self, h):
  """``Blocks.__call__`` with the variant of ``_MODE`` (the scan's code otherwise unchanged)."""
  graphdef, stacked = nnx.split(self)
  variant = _MODE["variant"]

  def step(h, weights):
    return layers.Block.__call__(nnx.merge(graphdef, weights), h), None

  remat = _MODE["remat"]
  if remat != "none":
    # prevent_cse=False is safe only inside a scan; unrolled, XLA would merge the recomputation
    # with the forward pass (as run_blocks' nnx.remat does, the loop keeps it)
    step = jax.checkpoint(step, policy=POLICIES[remat], prevent_cse=variant == "loop")
  if variant == "loop":
    for i in range(len(self)):
      h = step(h, jax.tree.map(lambda x: x[i], stacked))[0]
    return h
  unroll = {"scan": 1, "unroll2": 2, "unrollall": True}[variant]
  return jax.lax.scan(step, h, stacked, unroll=unroll)[0]


layers.Blocks.__call__ = _blocks_call


def compiled(cfg, batch: int, dtype, abstract: bool):
  build = lambda: VisionTransformer(cfg, dtype=dtype, param_dtype=jnp.float32,
                                    rngs=nnx.Rngs(0))
  model = nnx.eval_shape(build) if abstract else build()
  graphdef, params = nnx.split(model)
  size = cfg.image_size
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)

  def loss(params, images):
    return jnp.sum(jnp.square(nnx.merge(graphdef, params)(images).astype(jnp.float32)))

  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  start = time.perf_counter()
  out = jax.jit(jax.grad(loss)).lower(params, images).compile()
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vit-b16", action="store_true", help="ViT-B/16's image tower")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--variants", default="scan,loop,unroll2,unrollall")
  parser.add_argument("--remat", default="none,dots,block")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  print(f"| tower | batch | dtype | remat | variant | temporaries (MB) | compile (s) |")
  print("|---|---|---|---|---|---|---|")
  for remat in args.remat.split(","):
    _MODE["remat"] = remat
    if args.vit_b16:
      cfg = dataclasses.replace(CLIPConfig.vit_b16().vision, attention="xla")
      name = "ViT-B/16"
    else:
      cfg = CLIPConfig.tiny(
          vision_image_size=32, vision_patch_size=4, vision_hidden_size=args.width,
          vision_intermediate_size=4 * args.width, vision_num_hidden_layers=args.layers,
          vision_num_attention_heads=4).vision
      name = f"tiny L={args.layers} D={args.width} T=65"
    for variant in args.variants.split(","):
      _MODE["variant"] = variant
      out, seconds = compiled(cfg, args.batch, dtype, abstract=args.vit_b16)
      temp = out.memory_analysis().temp_size_in_bytes
      print(f"| {name} | {args.batch} | {dtype.name} | {remat} | {variant} | "
            f"{temp / 1e6:,.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
  main()

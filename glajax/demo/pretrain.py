"""Pre-training the demo's small foundation models: contrastive image–caption training on the
world's long-tailed pre-training sets, with the library's CLIP, tokenizer, pipeline and engine
(see ``caption_loss_fn`` for the loss and why its optimum carries the pre-training label prior).

The world has one caption per class, so the captions are tokenised once into a table (trimmed
after the longest caption's EOS) and every example's label is its caption's row. A pre-training
set is small (8,000–20,000 images of 32 × 32), so it is read once into memory as uint8 images and
caption rows (``caption_arrays``) and batched by ``pipeline.array_batches`` (shuffled per epoch
from the seed, resumable at any step). The loss crops and normalises the uint8 images on the
device (``augment_images``: the train pipeline's RandomResizedCrop, drawn from the engine's
per-step key), so the batches stay a function of (seed, step) and no tf.data pipeline competes
with the model for the CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from glajax.data.preprocess import tf  # TensorFlow (an extra), hidden from the GPUs
import tensorflow_datasets as tfds
from flax import nnx

import glajax
from glajax.data import pipeline, preprocess, transforms, world
from glajax.models.clip import CLIPConfig
from glajax.train import engine, losses
from glajax.train.prompt_tuning import trim_to_longest

FOUNDATION_DIR = "foundation_{}"
RECIPE_FILE = "pretrain.json"


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
  """Model size and optimisation of one small foundation model."""
  width: int = 64
  layers: int = 2
  projection_dim: int = 32
  steps: int = 600
  batch_size: int = 256
  learning_rate: float = 2e-3
  warmup_steps: int = 50
  weight_decay: float = 0.1


def foundation_config(spec: PretrainSpec, image_size: int = 32):
  """A tiny ``CLIPConfig`` (patch 8, both towers ``spec.width`` wide and ``spec.layers`` deep,
  their blocks inline: ``unroll`` = the depth, no scan loop, which for blocks this small is the
  faster step on a CPU)."""
  heads = max(1, spec.width // 16)
  return CLIPConfig.tiny(
      image_size=image_size, patch_size=8, projection_dim=spec.projection_dim,
      vision_hidden_size=spec.width, vision_intermediate_size=2 * spec.width,
      vision_num_hidden_layers=spec.layers, vision_num_attention_heads=heads,
      text_hidden_size=spec.width, text_intermediate_size=2 * spec.width,
      text_num_hidden_layers=spec.layers, text_num_attention_heads=heads,
      vision_unroll=spec.layers, text_unroll=spec.layers)


def caption_texts() -> tuple[str, ...]:
  """Every caption of the world, in label order."""
  return tuple(world.CAPTION_TEMPLATE.format(c) for c in world.CLASSNAMES)


def caption_dataset(builder, split: str) -> tf.data.Dataset:
  """{"image": encoded bytes, "label": caption row} of ``split`` of the prepared world builder."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})


def caption_arrays(builder, split: str) -> dict[str, np.ndarray]:
  """{"image": (N, S, S, 3) uint8, "label": (N,) int32 caption rows}: all of ``split``, decoded
  once, in stored order."""
  ds = caption_dataset(builder, split).map(
      lambda ex: {"image": preprocess.decode_image(ex["image"]),
                  "label": tf.cast(ex["label"], tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  chunks = list(ds.as_numpy_iterator())
  return {k: np.concatenate([c[k] for c in chunks]) for k in ("image", "label")}


def _keys_weights(start, size, length: int):
  """(N, length, length) weights resizing the window [start, start + size) of each row of a
  length-long axis back to ``length`` samples: Keys' cubic kernel (a = −0.5, as TF's and PIL's
  bicubic), pixel centres at i + ½, taps outside the window dropped and the rest renormalised
  (TF's crop-then-resize)."""
  step = size / length                                               # (N,) window px per output px
  centre = start[:, None] + (jnp.arange(length) + 0.5) * step[:, None] - 0.5   # (N, out)
  taps = jnp.arange(length, dtype=jnp.float32)
  x = jnp.abs(taps[None, None, :] - centre[:, :, None])              # (N, out, in)
  a = -0.5
  kernel = jnp.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                     jnp.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
  inside = (taps[None, :] >= start[:, None]) & (taps[None, :] < (start + size)[:, None])
  kernel = jnp.where(inside[:, None, :], kernel, 0.0)
  return kernel / kernel.sum(-1, keepdims=True)


def _resize_windows(images, top, left, height, width):
  """(N, S, S, C) float images: each image's window (top, left, height, width) resized
  (bicubic) to S × S; crops never exceed the image, so no antialiasing is due."""
  rows = _keys_weights(top, height, images.shape[1])
  cols = _keys_weights(left, width, images.shape[2])
  return jnp.einsum("nyh,nhwc,nxw->nyxc", rows, images, cols,
                    precision=jax.lax.Precision.HIGHEST)


def augment_images(images, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """The train pipeline's ``preprocess.train_transform`` (no flip) on the device, for a batch of
  uint8 (N, S, S, 3) images: a RandomResizedCrop window per image (``preprocess.sample_crop``'s
  draws, from ``rng``) resized back to S × S (bicubic, clipped to [0, 255]), then CLIP-normalised
  (x / 255 − mean) / std. Returns float32."""
  n, h, w = images.shape[:3]
  area_key, ratio_key, place_key = jax.random.split(rng, 3)
  area = h * w * jax.random.uniform(area_key, (n, attempts), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (n, attempts), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  crop_w, crop_h = jnp.round(jnp.sqrt(area * aspect)), jnp.round(jnp.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= w) & (crop_h <= h)
  first = jnp.argmax(fits, axis=1)[:, None]
  any_fits = fits.any(axis=1)
  fallback_w = round(h * ratio[1]) if w / h > ratio[1] else w  # no draw fits: a central crop
  fallback_h = round(w / ratio[0]) if w / h < ratio[0] else h
  crop_h = jnp.where(any_fits, jnp.take_along_axis(crop_h, first, 1)[:, 0], fallback_h)
  crop_w = jnp.where(any_fits, jnp.take_along_axis(crop_w, first, 1)[:, 0], fallback_w)
  u = jax.random.uniform(place_key, (n, 2))
  top = jnp.where(any_fits, jnp.floor(u[:, 0] * (h - crop_h + 1)), jnp.floor((h - crop_h) / 2))
  left = jnp.where(any_fits, jnp.floor(u[:, 1] * (w - crop_w + 1)), jnp.floor((w - crop_w) / 2))
  images = _resize_windows(images.astype(jnp.float32), top, left, crop_h, crop_w)
  mean, std = jnp.asarray(transforms.CLIP_MEAN), jnp.asarray(transforms.CLIP_STD)
  return (jnp.clip(images, 0.0, 255.0) / 255.0 - mean) / std


def caption_loss_fn(text_ids):
  """loss(model, batch, rng) = CE(exp(s)·norm(f_img)·norm(f_txt)ᵀ, label): CLIP's
  image→text loss with every distinct caption of the world (``text_ids``) as a candidate.
  ``batch``: {"image": (B, S, S, 3) uint8 as stored, "label": caption rows}; the images are
  augmented and normalised here, from ``rng`` (``augment_images``).

  Its optimum is z(x, t) = log p(t | x) + c(x): the pre-training conditional, label prior included,
  which is how GLA models a foundation model's zero-shot logits (Zhu et al., NeurIPS 2023, §3).
  In-batch negatives drawn from the caption marginal would instead have the pointwise mutual
  information log p(t | x) / p(t) as optimum, which carries no label prior; the world has only
  one caption per class, so each image can be contrasted with all of them at once.
  """
  text_ids = jnp.asarray(text_ids)

  def loss_fn(model, batch, rng):
    images = augment_images(batch["image"], rng)
    logits = losses.contrastive_logits(model.encode_image(images), model.encode_text(text_ids),
                                       model.logit_scale[...])
    loss = losses.cross_entropy(logits, batch["label"])
    return loss, {"logit_scale": jnp.exp(model.logit_scale[...])}

  return loss_fn


def engine_config(spec: PretrainSpec, seed: int, progress: bool = True):
  """The engine's config for pre-training: AdamW, warmup + cosine, no checkpoints."""
  config = engine.default_config()
  config.seed = seed
  config.total_steps = spec.steps
  config.log_every = max(1, spec.steps // 10)
  config.checkpoint_every = 0
  config.tensorboard = False
  config.progress = progress
  config.optimizer.update(learning_rate=spec.learning_rate, warmup_steps=spec.warmup_steps,
                          weight_decay=spec.weight_decay, grad_clip_norm=1.0)
  return config


def pretrain(builder, index: int, spec: PretrainSpec, workdir: str, *, tokenizer, seed: int = 0,
             progress: bool = True):
  """Trains foundation model ``index`` on split ``pretrain_<index>``; returns the CLIP.

  Cached: if ``workdir/foundation_<index>`` holds a ``save_clip`` checkpoint made with the same
  specs, model config and seed (``pretrain.json``), it is loaded instead; otherwise it is trained
  (again). The engine's run directory is ``workdir/runs/pretrain_<index>``.
  """
  directory = os.path.join(workdir, FOUNDATION_DIR.format(index))
  world_spec = builder.builder_config.spec
  config = foundation_config(spec, world_spec.image_size)
  recipe = json.dumps({"pretrain": dataclasses.asdict(spec), "model": dataclasses.asdict(config),
                       "world": dataclasses.asdict(world_spec),
                       "world_version": str(builder.version), "index": index, "seed": seed},
                      sort_keys=True)
  recipe_file = os.path.join(directory, RECIPE_FILE)
  if os.path.isfile(recipe_file) and open(recipe_file).read() == recipe:
    print(f"demo: reusing pre-trained foundation model {index} from {directory}", flush=True)
    return glajax.load_clip(directory)
  model = glajax.CLIP(config, rngs=nnx.Rngs(seed * 1000 + index))
  text_ids = trim_to_longest(tokenizer(caption_texts()), model.config.text.eos_token_id)
  arrays = caption_arrays(builder, f"pretrain_{index}")

  def data(start_step):
    return pipeline.array_batches(arrays, batch_size=spec.batch_size, seed=seed * 1000 + index,
                                  start_step=start_step)

  run = f"pretrain_{index}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"  # per recipe
  model, _ = engine.fit(model, caption_loss_fn(text_ids),
                        engine_config(spec, seed * 1000 + index, progress), data,
                        os.path.join(workdir, "runs", run),
                        name=f"demo: pre-train foundation model {index}")
  # The recipe file is part of the one atomic export: its presence marks a complete checkpoint.
  glajax.save_clip(model, directory, overwrite=True, extra_files={RECIPE_FILE: recipe})
  return model

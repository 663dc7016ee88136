"""Pre-training the demo's small foundation models: contrastive image–caption training on the
world's long-tailed pre-training sets, with the library's CLIP, tokenizer, pipeline and engine
(see ``caption_loss_fn`` for the loss and why its optimum carries the pre-training label prior).

The world has one caption per class, so the captions are tokenised once into a table (trimmed
after the longest caption's EOS) and every example's label is its caption's row. A pre-training
set is small (8,000–20,000 images of 32 × 32), so it is read once into memory as uint8 images and
caption rows (``caption_arrays``) and batched by ``pipeline.array_batches`` (shuffled per epoch
from the seed, resumable at any step); images are CLIP-normalised on the device, in the loss.
The images are used as rendered, without crops: the world already draws every image's pose at
random, and a tf.data augmentation pipeline would cost more than the tiny model's step.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from glajax.data import world
from glajax.train import losses

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
  """A tiny ``CLIPConfig`` (patch 8, both towers ``spec.width`` wide and ``spec.layers`` deep)."""
  from glajax.models.clip import CLIPConfig  # pylint: disable=import-outside-toplevel
  heads = max(1, spec.width // 16)
  return CLIPConfig.tiny(
      image_size=image_size, patch_size=8, projection_dim=spec.projection_dim,
      vision_hidden_size=spec.width, vision_intermediate_size=2 * spec.width,
      vision_num_hidden_layers=spec.layers, vision_num_attention_heads=heads,
      text_hidden_size=spec.width, text_intermediate_size=2 * spec.width,
      text_num_hidden_layers=spec.layers, text_num_attention_heads=heads)


def caption_texts() -> tuple[str, ...]:
  """Every caption of the world, in label order."""
  return tuple(world.CAPTION_TEMPLATE.format(c) for c in world.CLASSNAMES)


def caption_dataset(builder, split: str) -> tf.data.Dataset:
  """{"image": encoded bytes, "label": caption row} of ``split`` of the prepared world builder."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})


def caption_arrays(builder, split: str) -> dict[str, np.ndarray]:
  """{"image": (N, S, S, 3) uint8, "label": (N,) int32 caption rows}: all of ``split``, decoded
  once, in stored order."""
  from glajax.data import preprocess  # pylint: disable=import-outside-toplevel
  ds = caption_dataset(builder, split).map(
      lambda ex: {"image": preprocess.decode_image(ex["image"]),
                  "label": tf.cast(ex["label"], tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  chunks = list(ds.as_numpy_iterator())
  return {k: np.concatenate([c[k] for c in chunks]) for k in ("image", "label")}


def normalize_images(images):
  """uint8 (..., 3) images -> CLIP-normalised float32: (x / 255 − mean) / std; float images
  are taken as normalised already."""
  from glajax.data import preprocess  # pylint: disable=import-outside-toplevel
  if images.dtype != jnp.uint8:
    return images
  mean, std = jnp.asarray(preprocess.CLIP_MEAN), jnp.asarray(preprocess.CLIP_STD)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def caption_loss_fn(text_ids):
  """loss(model, batch, rng) = CE(exp(s)·norm(f_img)·norm(f_txt)ᵀ, label): CLIP's
  image→text loss with every distinct caption of the world (``text_ids``) as a candidate.

  Its optimum is z(x, t) = log p(t | x) + c(x): the pre-training conditional, label prior included,
  which is how GLA models a foundation model's zero-shot logits (Zhu et al., NeurIPS 2023, §3).
  In-batch negatives drawn from the caption marginal would instead have the pointwise mutual
  information log p(t | x) / p(t) as optimum, which carries no label prior; the world has only
  one caption per class, so each image can be contrasted with all of them at once.
  """
  text_ids = jnp.asarray(text_ids)

  def loss_fn(model, batch, rng):
    del rng
    logits = losses.contrastive_logits(model.encode_image(normalize_images(batch["image"])),
                                       model.encode_text(text_ids), model.logit_scale[...])
    loss = losses.cross_entropy(logits, batch["label"])
    return loss, {"logit_scale": jnp.exp(model.logit_scale[...])}

  return loss_fn


def engine_config(spec: PretrainSpec, seed: int, progress: bool = True):
  """The engine's config for pre-training: AdamW, warmup + cosine, no checkpoints."""
  from glajax.train import engine  # pylint: disable=import-outside-toplevel
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
  specs and seed (``pretrain.json``), it is loaded instead; otherwise it is trained (again). The
  engine's run directory is ``workdir/runs/pretrain_<index>``.
  """
  import glajax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from glajax.data import pipeline  # pylint: disable=import-outside-toplevel
  from glajax.train import engine  # pylint: disable=import-outside-toplevel
  from glajax.train.prompt_tuning import trim_to_longest  # pylint: disable=import-outside-toplevel
  directory = os.path.join(workdir, FOUNDATION_DIR.format(index))
  world_spec = builder.builder_config.spec
  recipe = json.dumps({"pretrain": dataclasses.asdict(spec), "world": dataclasses.asdict(
      world_spec), "world_version": str(builder.version), "index": index, "seed": seed},
                      sort_keys=True)
  recipe_file = os.path.join(directory, RECIPE_FILE)
  if os.path.isfile(recipe_file) and open(recipe_file).read() == recipe:
    return glajax.load_clip(directory)
  model = glajax.CLIP(foundation_config(spec, world_spec.image_size),
                      rngs=nnx.Rngs(seed * 1000 + index))
  text_ids = trim_to_longest(tokenizer(caption_texts()), model.config.text.eos_token_id)
  arrays = caption_arrays(builder, f"pretrain_{index}")

  def data(start_step):
    return pipeline.array_batches(arrays, batch_size=spec.batch_size, seed=seed * 1000 + index,
                                  start_step=start_step)

  model, _ = engine.fit(model, caption_loss_fn(text_ids),
                        engine_config(spec, seed * 1000 + index, progress), data,
                        os.path.join(workdir, "runs", f"pretrain_{index}"))
  glajax.save_clip(model, directory)
  with open(recipe_file, "w") as f:  # written last: its presence marks a complete checkpoint
    f.write(recipe)
  return model

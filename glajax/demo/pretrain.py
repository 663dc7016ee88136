"""Pre-training the demo's small foundation models: contrastive image–caption training on the
world's long-tailed pre-training sets, with the library's CLIP, tokenizer, pipeline and engine
(see ``caption_loss_fn`` for the loss and why its optimum carries the pre-training label prior).

The world has one caption per class, so the captions are tokenised once into a table (trimmed
after the longest caption's EOS) and every example's label is its caption's row.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import tensorflow as tf

from glajax.demo import world
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


def caption_loss_fn(text_ids):
  """loss(model, teacher, batch, rng) = CE(exp(s)·norm(f_img)·norm(f_txt)ᵀ, label): CLIP's
  image→text loss with every distinct caption of the world (``text_ids``) as a candidate.

  Its optimum is z(x, t) = log p(t | x) + c(x): the pre-training conditional, label prior included,
  which is how GLA models a foundation model's zero-shot logits (Zhu et al., NeurIPS 2023, §3).
  In-batch negatives drawn from the caption marginal would instead have the pointwise mutual
  information log p(t | x) / p(t) as optimum, which carries no label prior; the world has only
  one caption per class, so each image can be contrasted with all of them at once.
  """
  text_ids = jnp.asarray(text_ids)

  def loss_fn(model, teacher, batch, rng):
    del teacher, rng
    logits = losses.contrastive_logits(model.encode_image(batch["image"]),
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

  def data(start_step):
    return pipeline.train_batches(caption_dataset(builder, f"pretrain_{index}"),
                                  batch_size=spec.batch_size, seed=seed * 1000 + index,
                                  image_size=world_spec.image_size, flip=False,
                                  start_step=start_step)

  model, _ = engine.fit(model, caption_loss_fn(text_ids),
                        engine_config(spec, seed * 1000 + index, progress), data,
                        os.path.join(workdir, "runs", f"pretrain_{index}"))
  glajax.save_clip(model, directory)
  with open(recipe_file, "w") as f:  # written last: its presence marks a complete checkpoint
    f.write(recipe)
  return model

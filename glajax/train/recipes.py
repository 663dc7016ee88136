"""The fine-tuning recipes of the papers, all on one engine.

Each recipe is a config function (an ``ml_collections.ConfigDict``: the engine's settings, the
optimiser and the recipe's own hyperparameters) and a wiring function that returns a
:class:`Task`: the model to train, its loss, the logits of its evaluated classifier and its export.

=================  ======================================================  ====================
recipe             what is trained                                         paper
=================  ======================================================  ====================
finetune           image tower + linear head from the zero-shot head, CE   WiSE-FT (Wortsman 2022)
linear_probe       linear head on cached features (zero-shot init)         WiSE-FT / LP-FT
lp_ft              linear probe, then finetune from the probed head        Kumar et al. 2022
flyp               whole CLIP, symmetric contrastive loss on prompts       FLYP (Goyal 2023)
carot              flyp + ‖W_vᵀW_v − I‖_F + EMA self-distillation          CaRot (Oh 2024)
backdoor_peft      AdaptFormer adapters + cosine classifier, LA loss, SGD  Chen et al. 2025
prompt_tuning      residuals on prompt token embeddings, encoders frozen   GLA (Zhu 2023)
=================  ======================================================  ====================

Typical use::

  config = recipes.finetune()
  recipes.set_total_steps(config, num_train_examples)
  task = recipes.classifier_task(clip, LinearHead.from_zeroshot(head), config)
  model, state = engine.fit(task.model, task.loss_fn, config, data, workdir,
                            evaluators={"val": (val_batches, task.logits_fn)},
                            eval_model=task.eval_model, export=task.export)
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from glajax.errors import bad_argument
from glajax.models.heads import CLIPClassifier, CosineClassifier, LinearHead
from glajax.train import engine, losses
from glajax.train.prompt_tuning import PromptTunedCLIP, tokenize_prompts, trim_to_longest
from glajax.zeroshot import zeroshot_head


class Task(NamedTuple):
  """What ``engine.fit`` needs from a recipe."""
  model: nnx.Module
  loss_fn: Callable                 # (model, teacher, batch, rng) -> (loss, metrics)
  logits_fn: Callable               # (evaluated model, batch) -> (B, C) logits
  eval_model: Callable | None       # trained model -> evaluated classifier (None: the same)
  export: Callable | None           # (trained model, directory) -> None


def _config(batch_size: int, epochs: int, **optimizer) -> ml_collections.ConfigDict:
  config = engine.default_config()
  config.optimizer.update(optimizer)
  config.batch_size = batch_size
  config.epochs = epochs
  config.model = ml_collections.ConfigDict(dict(dtype="bfloat16", remat=False))
  return config


def set_total_steps(config, num_train_examples: int) -> ml_collections.ConfigDict:
  """total_steps = epochs · ⌈N / batch_size⌉ (in place; returns ``config``)."""
  if num_train_examples <= 0:
    raise bad_argument("num_train_examples", "a positive count", num_train_examples)
  config.total_steps = config.epochs * math.ceil(num_train_examples / config.batch_size)
  return config


# ------------------------------------------------------------------------------------- configs


def finetune() -> ml_collections.ConfigDict:
  """WiSE-FT's end-to-end recipe: AdamW (0.9, 0.999, eps 1e-8), lr 3e-5, wd 0.1, batch 512,
  10 epochs, 500 warmup steps then cosine, grad-norm clip 1.0, optional label smoothing. The text
  tower is unused and frozen (so weight decay leaves it, and ``logit_scale``, as they were)."""
  config = _config(512, 10, name="adamw", learning_rate=3e-5, weight_decay=0.1, b1=0.9, b2=0.999,
                   eps=1e-8, warmup_steps=500, schedule="cosine", grad_clip_norm=1.0,
                   trainable=("^clip/vision_model/", "^clip/visual_projection/", "^head/"))
  config.label_smoothing = 0.0
  return config


def linear_probe() -> ml_collections.ConfigDict:
  """WiSE-FT's linear-classifier variant on cached features: the zero-shot-initialised head alone,
  with the end-to-end recipe's optimiser."""
  config = finetune()
  config.optimizer.trainable = (".*",)
  return config


def lp_ft() -> ml_collections.ConfigDict:
  """LP-FT (Kumar et al. 2022): ``lp`` (linear probe) then ``ft`` (end-to-end from its head)."""
  return ml_collections.ConfigDict(dict(lp=linear_probe(), ft=finetune()))


def flyp() -> ml_collections.ConfigDict:
  """FLYP: the whole CLIP (logit_scale too) on (image, random template(class name)) pairs with
  the symmetric CLIP loss; AdamW lr 1e-5, wd 0.1, batch 512, 10 epochs, 500 warmup, cosine."""
  config = _config(512, 10, name="adamw", learning_rate=1e-5, weight_decay=0.1, warmup_steps=500,
                   schedule="cosine", grad_clip_norm=0.0, trainable=(".*",))
  config.carot = ml_collections.ConfigDict(dict(lambda_oc=0.0, lambda_sd=0.0, lambda_vt=0.0))
  return config


def carot() -> ml_collections.ConfigDict:
  """CaRot: FLYP + λ_OC·‖W_vᵀW_v − I‖_F (0.2) + λ_SD·L_SD (1.5) with an EMA teacher updated every
  500 steps, m from 0.05 to 0.9 over the first 20 % of training; optional λ_VT·‖W_v W_tᵀ‖_F."""
  config = flyp()
  config.carot.update(lambda_oc=0.2, lambda_sd=1.5, lambda_vt=0.0)
  config.teacher.update(enabled=True, every=500, start=0.05, end=0.9, warmup_fraction=0.2)
  return config


def adapter_dim(num_classes: int) -> int:
  """Chen et al.'s AdaptFormer bottleneck 2^⌊log2(C/24)⌋ (at least 1)."""
  return 2 ** max(math.floor(math.log2(num_classes / 24)), 0)


def backdoor_peft(num_classes: int) -> ml_collections.ConfigDict:
  """Chen et al. (2025): AdaptFormer adapters (bottleneck ``adapter_dim(C)``) + cosine classifier
  (scale 25) on the pre-projection CLS feature, logit-adjusted CE (τ = 1); SGD lr 0.01, momentum
  0.9, wd 5e-4, batch 128, 10 epochs, cosine schedule. Adapters and classifier are trained."""
  config = _config(128, 10, name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                   warmup_steps=0, schedule="cosine", grad_clip_norm=0.0,
                   trainable=("/adapter/", "^head/"))
  config.model.adapter_dim = adapter_dim(num_classes)
  config.tau = 1.0
  config.cosine_scale = 25.0
  return config


def prompt_tuning() -> ml_collections.ConfigDict:
  """GLA's few-shot prompt tuning: residuals on the context and class-name token embeddings of
  "a photo of a {}.", both encoders frozen. Optimiser: CoOp's few-shot schedule (SGD lr 2e-3,
  momentum 0.9, wd 5e-4, batch 32, cosine), an assumption where GLA's text gives none."""
  config = _config(32, 50, name="sgd", learning_rate=2e-3, momentum=0.9, weight_decay=5e-4,
                   warmup_steps=0, schedule="cosine", grad_clip_norm=0.0,
                   trainable=("_residual$",))
  config.template = "a photo of a {}."
  return config


# ------------------------------------------------------------------------------------- wiring


def load_model(config, path_or_hub_id):
  """``load_clip`` with the recipe's ``config.model``: compute dtype (params stay float32),
  rematerialisation and, for ``backdoor_peft``, the adapters."""
  from glajax.models.hf import load_clip  # pylint: disable=import-outside-toplevel
  return load_clip(path_or_hub_id, dtype=jnp.dtype(config.model.dtype),
                   remat=config.model.remat, adapter_dim=config.model.get("adapter_dim"))


def _save_npz(path: str, **arrays) -> None:
  """``engine.save_npz`` of ``arrays`` as float32."""
  engine.save_npz(path, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})


def export_classifier(model: CLIPClassifier, directory: str) -> None:
  """``save_clip`` of the CLIP (transformers format) + the head's parameters in ``head.npz``."""
  from glajax.models.hf import save_clip  # pylint: disable=import-outside-toplevel
  save_clip(model.clip, directory)
  _, params = nnx.split(model.head, nnx.Param)
  _save_npz(os.path.join(directory, "head.npz"), **nnx.to_pure_dict(params))


def _export_clip(model, directory: str) -> None:
  from glajax.models.hf import save_clip  # pylint: disable=import-outside-toplevel
  save_clip(model.clip, directory)


def classifier_task(clip, head, config) -> Task:
  """End-to-end fine-tuning (``finetune``, LP-FT's second stage): ``head`` on the normalised
  projected image features, CE with ``config.label_smoothing``."""
  model = CLIPClassifier(clip, head, features="projected")

  def loss_fn(model, teacher, batch, rng):
    del teacher, rng
    logits = model(batch["image"])
    loss = losses.cross_entropy(logits, batch["label"], config.label_smoothing, batch.get("mask"))
    return loss, {"accuracy": _accuracy(logits, batch)}

  return Task(model, loss_fn, engine.image_logits, None, export_classifier)


def _accuracy(logits, batch):
  correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
  mask = batch.get("mask")
  return correct.mean() if mask is None else (correct * mask).sum() / jnp.maximum(mask.sum(), 1)


def linear_probe_task(head: LinearHead, config) -> Task:
  """A linear head on cached features: batches {"features", "label"} (see ``cache_features``)."""

  def loss_fn(model, teacher, batch, rng):
    del teacher, rng
    logits = model(batch["features"])
    loss = losses.cross_entropy(logits, batch["label"], config.label_smoothing, batch.get("mask"))
    return loss, {"accuracy": _accuracy(logits, batch)}

  def save_head(model, directory):
    os.makedirs(directory, exist_ok=True)
    _save_npz(os.path.join(directory, "head.npz"),
              **nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))

  return Task(head, loss_fn, lambda model, batch: model(batch["features"]), None, save_head)


def cache_features(clip, batches, mesh=None):
  """(features, labels): ``encode_image`` of every batch (padding dropped), for linear probes."""
  return engine.evaluate_logits(clip, image_features, batches, mesh)


def image_features(clip, batch):
  """The ``logits_fn`` that caches features: ``clip.encode_image(batch["image"])``."""
  return clip.encode_image(batch["image"])


class ContrastiveCLIP(nnx.Module):
  """A CLIP with its class prompts' token ids (C, T, L), T templates per class (not trained)."""

  def __init__(self, clip, prompt_ids):
    prompt_ids = np.asarray(prompt_ids, np.int32)
    if prompt_ids.ndim != 3:
      raise bad_argument("prompt_ids", "(classes, templates, length) token ids",
                         f"shape {prompt_ids.shape}")
    self.clip = clip
    self.prompt_ids = nnx.Variable(jnp.asarray(prompt_ids))


def _contrastive_terms(model, batch, rng):
  """Image and text features of a batch, each image paired with a random template of its class."""
  ids = model.prompt_ids[...]
  template = jax.random.randint(rng, batch["label"].shape, 0, ids.shape[1])
  text_ids = ids[batch["label"], template]
  return model.clip.encode_image(batch["image"]), model.clip.encode_text(text_ids), text_ids


def contrastive_task(clip, tokenizer, classnames, templates, config) -> Task:
  """FLYP, and CaRot when ``config.carot`` has non-zero weights:

  L = L_CLIP + λ_OC·‖W_vᵀW_v − I‖_F + λ_SD·L_SD(teacher) [+ λ_VT·‖W_v W_tᵀ‖_F],
  each image paired with a random template of its class name. Evaluation rebuilds the zero-shot
  head from the fine-tuned text tower with every template (``glajax.zeroshot_head``).
  """
  weights = config.carot
  classnames, templates = list(classnames), list(templates)
  if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
    raise bad_argument("templates", "a non-empty list of format strings with '{}'",
                       templates[:5])
  prompts = [t.format(c) for c in classnames for t in templates]
  ids = trim_to_longest(tokenizer(prompts), clip.config.text.eos_token_id)
  prompt_ids = ids.reshape(len(classnames), len(templates), -1)

  def loss_fn(model, teacher, batch, rng):
    image, text, text_ids = _contrastive_terms(model, batch, rng)
    scale = model.clip.logit_scale[...]
    clip_loss = losses.clip_contrastive_loss(image, text, scale)
    metrics = {"clip_loss": clip_loss, "logit_scale": scale.astype(jnp.float32)}
    loss = clip_loss
    w_v = model.clip.visual_projection.kernel[...]
    if weights.lambda_oc:
      metrics["orthogonality"] = losses.orthogonality_penalty(w_v)
      loss = loss + weights.lambda_oc * metrics["orthogonality"]
    if weights.lambda_vt:
      metrics["cross_projection"] = losses.projection_cross_penalty(
          w_v, model.clip.text_projection.kernel[...])
      loss = loss + weights.lambda_vt * metrics["cross_projection"]
    if weights.lambda_sd:
      if teacher is None:
        raise bad_argument("config.teacher.enabled", "True for self-distillation (lambda_sd > 0)",
                           False)
      metrics["self_distillation"] = losses.self_distillation_loss(
          image, text, scale, teacher.clip.encode_image(batch["image"]),
          teacher.clip.encode_text(text_ids), teacher.clip.logit_scale[...])
      loss = loss + weights.lambda_sd * metrics["self_distillation"]
    return loss, metrics

  def eval_model(model):
    head = zeroshot_head(model.clip, tokenizer, classnames, templates, show_progress=False)
    return CLIPClassifier(model.clip, LinearHead.from_zeroshot(head))

  return Task(ContrastiveCLIP(clip, prompt_ids), loss_fn, engine.image_logits, eval_model,
              _export_clip)


def backdoor_task(clip, text_features, train_counts, config) -> Task:
  """Chen et al.'s PEFT: ``clip`` built with ``adapter_dim`` adapters, a cosine classifier on the
  pooled CLS feature initialised from (C, P) "a photo of a {}." ``text_features`` through
  pinv(W_v), and CE(z + τ·log π_train, y) with π_train from ``train_counts``."""
  counts = np.asarray(train_counts, np.float64)
  if counts.ndim != 1 or (counts <= 0).any():
    raise bad_argument("train_counts", "a (C,) array of positive class counts", counts)
  log_prior = jnp.asarray(np.log(counts / counts.sum()), jnp.float32)
  head = CosineClassifier.from_text_features(
      text_features, np.asarray(clip.visual_projection.kernel[...]), config.cosine_scale)
  model = CLIPClassifier(clip, head, features="pre_projection")

  def loss_fn(model, teacher, batch, rng):
    del teacher, rng
    logits = model(batch["image"])
    loss = losses.logit_adjusted_loss(logits, batch["label"], log_prior, config.tau)
    return loss, {"accuracy": _accuracy(logits, batch)}

  return Task(model, loss_fn, engine.image_logits, None, export_classifier)


def prompt_tuning_task(clip, tokenizer, classnames, config) -> Task:
  """GLA's prompt tuning: ``PromptTunedCLIP`` on ``config.template`` prompts, CE on its logits.
  Batches hold "image" or cached "features" (the image tower is frozen)."""
  ids, context_index, name_mask = tokenize_prompts(tokenizer, classnames, config.template,
                                                   clip.config.text.eos_token_id)
  model = PromptTunedCLIP(clip, ids, context_index, name_mask)

  def logits_fn(model, batch):
    if "features" in batch:
      return model(image_features=batch["features"])
    return model(batch["image"])

  def loss_fn(model, teacher, batch, rng):
    del teacher, rng
    logits = logits_fn(model, batch)
    loss = losses.cross_entropy(logits, batch["label"], where=batch.get("mask"))
    return loss, {"accuracy": _accuracy(logits, batch)}

  def export(model, directory):
    os.makedirs(directory, exist_ok=True)
    _save_npz(os.path.join(directory, "prompt_residuals.npz"),
              context_residual=model.context_residual[...], name_residual=model.name_residual[...])

  return Task(model, loss_fn, logits_fn, None, export)


RECIPES = {"finetune": finetune, "linear_probe": linear_probe, "lp_ft": lp_ft, "flyp": flyp,
           "carot": carot, "backdoor_peft": backdoor_peft, "prompt_tuning": prompt_tuning}

"""The fine-tuning recipes of the papers, all on one engine.

Each recipe is a config function (an ``ml_collections.ConfigDict``: the engine's settings, the
optimiser and the recipe's own hyperparameters) and a wiring function that returns a
:class:`Task`: the model to train, its loss, the logits of its evaluated classifier and its export.

=================  ======================================================  ====================
recipe             what is trained                                         paper
=================  ======================================================  ====================
finetune           image tower + linear head from the zero-shot head, CE   WiSE-FT (Wortsman 2022)
finetune_sgd       trunk (0.1× lr) + a classifier's own head, CE, SGD      Mai et al. 2024
linear_probe       linear head on cached features (zero-shot init)         WiSE-FT / LP-FT
lp_ft              linear probe, then finetune from the probed head        Kumar et al. 2022
flyp               whole CLIP, symmetric contrastive loss on prompts       FLYP (Goyal 2023)
carot              flyp + ‖W_vᵀW_v − I‖_F + EMA self-distillation          CaRot (Oh 2024)
backdoor_peft      AdaptFormer adapters + cosine classifier, LA loss, SGD  Chen et al. 2025
prompt_tuning      residuals on prompt token embeddings, encoders frozen   GLA (Zhu 2023)
=================  ======================================================  ====================

Every task takes a model of any family with what its recipe needs (``glajax.models.family``):
an image tower for the classifiers, a text tower for the contrastive and prompt recipes. Typical
use::

  config = recipes.finetune()
  recipes.set_total_steps(config, num_train_examples)
  task = recipes.classifier_task(model, LinearHead.from_zeroshot(head, model.logit_bias),
                                 config)
  model, state = engine.fit(task.model, task.loss_fn, config, data, workdir,
                            evaluators={"val": (val_batches, task.logits_fn)},
                            eval_model=task.eval_model, export=task.export)
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from glajax import schema
from glajax.data import transforms
from glajax.errors import ConfigError, GlajaxError, bad_argument
from glajax.models import layers, registry
from glajax.models.family import ExportInfo
from glajax.models.heads import CosineClassifier, ImageClassifier, LinearHead, prefixed_groups
from glajax import evaluate, io
from glajax.train import engine, losses
from glajax.train.prompt_tuning import PromptTunedModel, tokenize_prompts, trim_to_longest
from glajax.schema import Field, check_section, require_keys
from glajax.zeroshot import zeroshot_head


class Task(NamedTuple):
  """What ``engine.fit`` needs from a recipe."""
  model: nnx.Module
  loss_fn: Callable                 # (model, batch, rng[, teacher]) -> (loss, metrics)
  logits_fn: Callable               # (evaluated model, batch) -> (B, C) logits
  eval_model: Callable | None       # trained model -> evaluated classifier (None: the same)
  export: Callable | None           # (trained model, directory[, family.ExportInfo]) -> None
  teacher_update: Callable | None = None  # engine.TeacherUpdate (CaRot's EMA teacher), or None


def _config(batch_size: int, epochs: int, transform: tuple, **optimizer
            ) -> ml_collections.ConfigDict:
  """The engine's config with the recipe's batch, epochs, optimiser and ``transform``: its
  official (``transforms.TrainTransform``, ``transforms.EvalTransform``) as
  ``config.transform.train`` / ``.eval`` dicts (``transforms.of_config`` reads them back)."""
  config = engine.default_config()
  config.optimizer.update(optimizer)
  config.batch_size = batch_size
  config.epochs = epochs
  config.model = ml_collections.ConfigDict(dict(dtype="bfloat16", **layers.RUN_DEFAULTS))
  train, evaluation = transform
  config.transform = ml_collections.ConfigDict(dict(train=dataclasses.asdict(train),
                                                    eval=dataclasses.asdict(evaluation)))
  return config


# The official transforms, in torchvision's terms (each recipe's docstring names the file).
# LIFT / Pre-train-Imbalance ``trainer.py``: ``RandomResizedCrop(resolution)`` (torchvision's
# defaults: scale (0.08, 1), ratio (3/4, 4/3), bilinear) + ``RandomHorizontalFlip()``; test
# ``Resize(resolution * 8 // 7)`` + ``CenterCrop(resolution)`` (bilinear; ``tte: False``).
LIFT_TRANSFORMS = (transforms.TrainTransform(scale=(0.08, 1.0), interpolation="bilinear",
                                             flip=True),
                   transforms.EvalTransform(resize=256, crop=224, interpolation="bilinear"))
# Dassl ``dassl/data/transforms/transforms.py`` (``_build_transform_train`` /
# ``_build_transform_test``) with GLA.FS's ``configs/trainers/GLA/*.yaml`` ``INPUT``
# (``SIZE (224, 224)``, ``INTERPOLATION "bicubic"``, ``TRANSFORMS ["random_resized_crop",
# "random_flip", "normalize"]``): ``RandomResizedCrop(SIZE, interpolation=bicubic)`` (scale 0.08–1)
# + ``RandomHorizontalFlip()``; test ``Resize(max(SIZE), bicubic)`` + ``CenterCrop(SIZE)``.
DASSL_TRANSFORMS = (transforms.TrainTransform(scale=(0.08, 1.0), interpolation="bicubic",
                                              flip=True),
                    transforms.EvalTransform(resize=224, crop=224, interpolation="bicubic"))
# wise-ft ``clip/clip.py`` ``_transform(n_px, is_train)`` (CaRot's ``clip/clip.py`` is the same):
# ``RandomResizedCrop(n_px, scale=(0.9, 1.0), interpolation=BICUBIC)``, no flip; test
# ``Resize(n_px, BICUBIC)`` + ``CenterCrop(n_px)``.
CLIP_TRANSFORMS = (transforms.CLIP_TRAIN, transforms.CLIP_EVAL)


def set_total_steps(config, num_train_examples: int) -> ml_collections.ConfigDict:
  """The step counts from the number N of training examples (in place; returns ``config``).

  ``config.optimizer.steps_per_epoch`` = ⌈N / batch_size⌉ (PyTorch's ``DataLoader`` without
  ``drop_last``, as LIFT and WiSE-FT/CaRot load their training data), or ⌊N / batch_size⌋ when
  ``config.drop_last`` is true and N ≥ batch_size (Dassl's ``build_data_loader``:
  ``drop_last=is_train and len(data_source) >= batch_size``); ``config.total_steps`` = epochs ·
  steps_per_epoch. Per-epoch schedules (``optimizer.schedule="epoch_cosine"``,
  ``optimizer.warmup_epochs``) read ``steps_per_epoch``.
  """
  if (isinstance(num_train_examples, bool) or not isinstance(num_train_examples, numbers.Integral)
      or num_train_examples <= 0):
    raise bad_argument("num_train_examples", "a positive int count", repr(num_train_examples))
  num_train_examples = int(num_train_examples)
  if config.get("drop_last", False) and num_train_examples >= config.batch_size:
    steps_per_epoch = num_train_examples // config.batch_size
  else:
    steps_per_epoch = math.ceil(num_train_examples / config.batch_size)
  config.optimizer.steps_per_epoch = steps_per_epoch
  config.total_steps = config.epochs * steps_per_epoch
  return config


# ------------------------------------------------------------------------------------- configs


def finetune() -> ml_collections.ConfigDict:
  """WiSE-FT's end-to-end recipe (mlfoundations/wise-ft).

  From ``README.md``'s fine-tuning command: ``--epochs=10 --lr=0.00003 --batch-size=512``; from
  ``src/args.py``: ``--wd 0.1``, ``--warmup_length 500``, ``--ls 0`` (label smoothing); from
  ``src/models/finetune.py``: ``torch.optim.AdamW`` (its defaults β = (0.9, 0.999), eps 1e-8),
  ``cosine_lr(optimizer, lr, warmup_length, epochs · num_batches)`` called before every step,
  ``clip_grad_norm_(params, 1.0)``; from ``src/models/utils.py`` ``cosine_lr``: lr·(k + 1)/500
  at 0-based step k < 500, then a per-step cosine to 0 (``warmup="linear"``,
  ``schedule="cosine"``). The text tower is unused and frozen (so weight decay leaves it, and
  ``logit_scale``, as they were). ``finetune.py`` calls ``model.train()`` before every epoch: a
  ResNet's BatchNorm trains its statistics (``batch_stats="train"``)."""
  config = _config(512, 10, CLIP_TRANSFORMS, name="adamw", learning_rate=3e-5, weight_decay=0.1,
                   b1=0.9, b2=0.999, eps=1e-8, warmup_steps=500, warmup="linear",
                   schedule="cosine", grad_clip_norm=1.0,
                   trainable=("<image>", "<head>"))
  config.batch_stats = "train"
  config.label_smoothing = 0.0
  return config


def finetune_sgd(weight_decay: float = 1e-4) -> ml_collections.ConfigDict:
  """Mai et al.'s fine-tuning of a supervised source classifier (OSU-MLB/Fine-Tuning-Is-Fine-If-
  Calibrated), its own head included.

  From ``py/util/cmd.py`` (ImageNet): ``--batch_size 64``, ``--optimizer SGD`` with
  ``{"lr": 1e-3, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": true}`` (Office-Home:
  ``weight_decay`` 5e-4), ``training_config {"epochs": 50, "iterations": 500}`` (Office-Home:
  20 epochs), ``freeze_bn`` and ``freeze_classifier`` false; ``py/util/model.py``
  ``get_parameters``: the backbone at 0.1·lr, the head at lr; ``py/workflow/train.py``:
  ``CosineAnnealingLR(optimizer, epochs · iterations)`` stepped after every iteration (a per-step
  cosine to 0 without warmup: ``schedule="cosine"``, ``warmup_steps=0``), cross-entropy over all
  classes, float32. An official "epoch" is 500 iterations of a shuffled ``DataLoader`` cycled
  forever, not a pass over the data: a config sets ``total_steps`` = epochs · 500. The official
  loop runs ``model.train()`` (``py/workflow/train.py``): BatchNorm normalises with the batch's
  statistics and trains the running ones (``batch_stats="train"``). The data code is not
  released (``py/data`` is not in the repository): the transforms are torchvision's ImageNet
  reference ones, with which the source weights were trained (its
  ``references/classification``: RandomResizedCrop(224) + flip; Resize(256) + CenterCrop(224),
  bilinear), as LIFT's."""
  config = _config(64, 50, LIFT_TRANSFORMS, name="sgd", learning_rate=1e-3, momentum=0.9,
                   nesterov=True, weight_decay=weight_decay, warmup_steps=0, warmup="linear",
                   schedule="cosine", grad_clip_norm=0.0, trainable=("<image>", "<head>"),
                   groups=(dict(name="backbone", pattern="<image>", lr_scale=0.1),))
  config.model.dtype = "float32"
  config.batch_stats = "train"
  config.label_smoothing = 0.0
  return config


def linear_probe() -> ml_collections.ConfigDict:
  """WiSE-FT's linear-classifier variant on cached features: the zero-shot-initialised head alone,
  with the end-to-end recipe's optimiser; the features come from the frozen tower in eval mode
  (wise-ft ``src/datasets/common.py`` ``get_features_helper``: ``image_encoder.eval()``:
  BatchNorm on its running statistics, ``batch_stats="frozen"``)."""
  config = finetune()
  config.optimizer.trainable = (".*",)
  config.batch_stats = "frozen"
  return config


def lp_ft() -> ml_collections.ConfigDict:
  """LP-FT (Kumar et al. 2022): ``lp`` (linear probe, BatchNorm frozen) then ``ft`` (end-to-end
  from its head, BatchNorm statistics trained: each stage's ``batch_stats`` as its recipe's)."""
  return ml_collections.ConfigDict(dict(lp=linear_probe(), ft=finetune()))


def flyp() -> ml_collections.ConfigDict:
  """FLYP: the whole CLIP (logit_scale too) on (image, random template(class name)) pairs with
  the symmetric CLIP loss, as run by MLAI-Yonsei/CaRot: ``example_scripts/flyp.sh`` (``--lr 1e-5
  --wd 0.1 --batch-size 512 --epochs 10``, ViT-B/16), ``src/args.py`` (``--warmup_length 500``,
  ``--min_lr 0``) and ``src/models/utils.py`` ``cosine_lr`` (lr·(k + 1)/500 warmup, then a
  per-step cosine); ``torch.optim.AdamW`` with its defaults over every parameter; no gradient
  clipping; ``src/models/carot_loss.py`` calls ``model.train()`` before every epoch (a ResNet
  tower's BatchNorm trains its statistics, ``batch_stats="train"``; CaRot's EMA teacher keeps
  the loaded ones, in eval mode: ``engine.make_train_step``)."""
  config = _config(512, 10, CLIP_TRANSFORMS, name="adamw", learning_rate=1e-5, weight_decay=0.1,
                   warmup_steps=500, warmup="linear", schedule="cosine", grad_clip_norm=0.0,
                   trainable=(".*",))
  config.batch_stats = "train"
  config.carot = ml_collections.ConfigDict(dict(
      lambda_oc=0.0, lambda_sd=0.0, lambda_vt=0.0,
      teacher=dict(every=500, start=0.05, end=0.9, warmup_fraction=0.2)))
  return config


def carot() -> ml_collections.ConfigDict:
  """CaRot (MLAI-Yonsei/CaRot): FLYP + λ_OC·‖W_vᵀW_v − I‖_F + λ_VT·‖W_v W_tᵀ‖_F + λ_SD·L_SD.

  From ``example_scripts/carot.sh``: ``--distil_coef 1.5`` (λ_SD), ``--l_orth_wv 0.2`` (λ_OC),
  ``--cross_fnorm 0.05`` (λ_VT), ``--lr 1e-5 --wd 0.1 --batch-size 512 --epochs 10``; from
  ``src/args.py``: ``--ema_up_freq 500``, ``--m_sche_src 0.05``, ``--m_sche_tar 0.9``,
  ``--m_warm_up 0.2`` (the EMA teacher, ``losses.carot_teacher_update``: updated after the
  optimiser update of every 0-based step k with k mod 500 = 0, m from 0.05 to 0.9 over the first
  20 % of training), ``--warmup_length 500``; the loss terms and schedule from
  ``src/models/carot_loss.py`` (no gradient clipping; ``model.train()`` before every epoch: a
  ResNet tower's BatchNorm trains its statistics, ``batch_stats="train"`` as :func:`flyp`'s)."""
  config = flyp()
  config.carot.update(lambda_oc=0.2, lambda_sd=1.5, lambda_vt=0.05)
  return config


def adapter_dim(num_classes: int, num_layers: int) -> int:
  """LIFT's AdaptFormer bottleneck 2^max(0, ⌊log2(C / (2·L))⌋) for L transformer blocks
  (shijxcs/LIFT ``models/peft_vit.py``, ``ViT_Tuner``: ``2 ** max(0, int(math.log2(num_classes /
  (n_layers * 2))))``): C/24 for ViT-B (12 blocks), C/48 for ViT-L (24 blocks)."""
  for name, value in (("num_classes", num_classes), ("num_layers", num_layers)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise bad_argument(name, "a positive int", repr(value))
  return 2 ** max(0, math.floor(math.log2(num_classes / (2 * num_layers))))


def backdoor_peft(num_classes: int, num_layers: int = 12) -> ml_collections.ConfigDict:
  """Chen et al. (2025) on LIFT's code (shijxcs/LIFT), for a ViT of ``num_layers`` blocks (12:
  the paper's ViT-B/16 backbones; 24 for ViT-L/14).

  * AdaptFormer in every block (``models/peft_modules.py`` ``AdaptFormer``, applied in
    ``models/peft_vit.py``): h + mlp(ln_2(h)) + s·up(relu(down(LN_a(h)))), LN_a its own
    LayerNorm, s a learnable scalar initialised to 1 (``model.adapter_scale="learnable"``),
    bottleneck ``adapter_dim(C, num_layers)``;
  * ``CosineClassifier`` (``models/classifiers.py``) with ``utils/config.py``'s ``scale = 25`` on
    the pre-projection CLS feature, initialised as in ``trainer.py`` ``init_head_text_feat``
    (``configs/model/clip_vit_b16.yaml``: ``init_head: "text_feat"``, prompt "a photo of a {}.");
  * ``loss_type: "LA"`` (``utils/losses.py`` ``LogitAdjustedLoss``, τ = 1);
  * ``utils/config.py`` / ``configs/model/clip_vit_b16.yaml``: ``num_epochs 10``,
    ``batch_size 128``, ``lr 0.01``, ``weight_decay 5e-4``, ``momentum 0.9``;
  * ``trainer.py``: ``torch.optim.SGD`` over the tuner and the head,
    ``CosineAnnealingLR(optim, num_epochs)`` stepped once per epoch (``schedule="epoch_cosine"``,
    no warmup), a shuffled ``DataLoader`` without ``drop_last`` (⌈N/128⌉ steps an epoch),
    and ``self.tuner.train()`` alone: the backbone stays in the eval mode it was loaded in
    (``batch_stats="frozen"``: BatchNorm on its running statistics);
  * precision (``trainer.py``): fp16 autocast with a ``GradScaler`` in training, float32 for the
    head's text-feature initialisation and for evaluation. glajax computes in float32 throughout
    (``model.dtype="float32"``): evaluation and head initialisation as the official code, training
    more precise than fp16 (which in JAX would need loss scaling too); ``"bfloat16"`` trades
    that for speed.
  """
  config = _config(128, 10, LIFT_TRANSFORMS, name="sgd", learning_rate=0.01, momentum=0.9,
                   weight_decay=5e-4, warmup_steps=0, warmup="linear", schedule="epoch_cosine",
                   steps_per_epoch=0, grad_clip_norm=0.0, trainable=("<adapters>", "<head>"))
  config.model.adapter_dim = adapter_dim(num_classes, num_layers)
  config.model.adapter_scale = "learnable"
  config.model.dtype = "float32"
  config.batch_stats = "frozen"
  config.tau = 1.0
  config.cosine_scale = 25.0
  return config


def prompt_tuning() -> ml_collections.ConfigDict:
  """GLA's few-shot prompt tuning: residuals on the context and class-name token embeddings of
  ``config.template`` prompts, both encoders frozen.

  Optimiser from BeierZhu/GLA ``GLA.FS.public.zip``: ``configs/trainers/GLA/vit_b16_ep50.yaml``
  (``OPTIM.NAME "sgd"``, ``LR 0.002``, ``MAX_EPOCH 50``, ``LR_SCHEDULER "cosine"``,
  ``WARMUP_EPOCH 1``, ``WARMUP_TYPE "constant"``, ``WARMUP_CONS_LR 1e-5``,
  ``DATALOADER.TRAIN_X.BATCH_SIZE 32``) on the bundled ``Dassl.ProGrad.pytorch.zip``:
  ``dassl/config/defaults.py`` (``MOMENTUM 0.9``, ``WEIGHT_DECAY 5e-4``, no dampening or
  Nesterov, ``WARMUP_RECOUNT True``), ``dassl/optim/lr_scheduler.py`` (one epoch at a constant
  1e-5, then ``CosineAnnealingLR(T_max=50)`` from 0: ``warmup="constant"``,
  ``warmup_epochs=1``, ``schedule="epoch_cosine"``), ``dassl/data/data_manager.py``
  (``drop_last`` when N ≥ batch: ``drop_last=True``) and ``trainers/gla.py`` (the scheduler
  stepped after the last batch of each epoch); ``set_model_mode("train")`` switches only the
  registered prompt learner to train mode, so the CLIP loaded in eval mode keeps its BatchNorm
  statistics (``batch_stats="frozen"``: the image features may be cached). The recipe the
  published few-shot table ran (``scripts/gla.sh``) is :func:`prompt_tuning_for_shots` of this;
  with fewer shots than one batch, :func:`scale_for_small_set`. Transforms:
  ``DASSL_TRANSFORMS``."""
  config = _config(32, 50, DASSL_TRANSFORMS, name="sgd", learning_rate=2e-3, momentum=0.9,
                   weight_decay=5e-4, warmup_steps=0, warmup_epochs=1, warmup="constant",
                   warmup_lr=1e-5, schedule="epoch_cosine", steps_per_epoch=0,
                   grad_clip_norm=0.0, trainable=("_residual$",))
  config.drop_last = True
  config.batch_stats = "frozen"
  config.template = "a photo of a {}."
  return config


FEWSHOT_RECIPES = ("vit_b16_ep50", "rn50_ep50")  # GLA.FS configs: prompt_tuning, ..._for_shots
FINAL_MODELS = ("last_step", "best_val")  # Dassl's TEST.FINAL_MODEL (engine.BestSelection)
# GLA.FS ``configs/trainers/GLA/rn50_ep50_shot{k}.yaml`` (run by ``scripts/gla.sh`` for the
# published RN50 table): k -> (``DATALOADER.TRAIN_X.BATCH_SIZE``, ``OPTIM.LR``); each also has
# ``MAX_EPOCH 50``, ``TEST.FINAL_MODEL "best_val"`` and ``vit_b16_ep50.yaml``'s other values.
PROMPT_TUNING_PER_SHOT = {1: (32, 2e-5), 2: (64, 4e-5), 4: (128, 1e-4), 8: (256, 2e-4),
                          16: (512, 4e-4)}


def prompt_tuning_for_shots(config, shots: int) -> ml_collections.ConfigDict:
  """``config`` (:func:`prompt_tuning`) with ``rn50_ep50_shot{shots}.yaml``'s batch size 32·k,
  learning rate (``PROMPT_TUNING_PER_SHOT``) and 50 epochs, in place; returns ``config``."""
  if shots not in PROMPT_TUNING_PER_SHOT:
    raise bad_argument("gla.shots", "1, 2, 4, 8 or 16 (GLA.FS's rn50_ep50_shot{k} configs)",
                       repr(shots))
  config.batch_size, config.optimizer.learning_rate = PROMPT_TUNING_PER_SHOT[shots]
  config.epochs = 50
  return config


def scale_for_small_set(config, num_train: int, devices: int = 1) -> ml_collections.ConfigDict:
  """GLA.FS ``trainers/gla.py`` ``build_model``: when the N = C·k training shots are fewer than
  one batch B (EuroSAT at 1 and 2 shots), ``OPTIM.LR × B/N``; Dassl's loader then has no
  ``drop_last`` and yields one batch of all N examples per epoch (batch size N). In place;
  returns ``config``; unchanged when N ≥ B.

  A batch is split evenly over ``devices``: when N is not a multiple of them (N ≥ devices), the
  batch is the largest multiple below N and each epoch leaves N mod ``devices`` shots out, others
  each epoch (the one departure from Dassl, on several devices only)."""
  if isinstance(num_train, bool) or not isinstance(num_train, numbers.Integral) or num_train < 1:
    raise bad_argument("num_train", "a positive int count", repr(num_train))
  if num_train < config.batch_size:
    config.optimizer.learning_rate = config.optimizer.learning_rate * (
        config.batch_size / num_train)
    whole = num_train - num_train % devices if num_train >= devices else num_train
    config.batch_size = int(whole)
  return config


# ------------------------------------------------------------------------------------- wiring


def load_model(config, path_or_hub_id):
  """The model of any family (``glajax.models.registry.load_model``) with the recipe's
  ``config.model``: compute dtype (params stay float32) and, where set, rematerialisation, the
  attention kernel, the blocks per scan iteration (``unroll``), the activation and, for
  ``backdoor_peft``, the adapters."""
  model = config.model
  options = dict(dtype=jnp.dtype(model.dtype))
  for key, default in {**layers.RUN_DEFAULTS, "adapter_dim": None, "activation": None}.items():
    if model.get(key, default) != default:
      options[key] = model[key]
  if options.get("adapter_dim"):
    options["adapter_scale"] = model.get("adapter_scale", "learnable")
  return registry.load_model(path_or_hub_id, **options)


def _save_npz(path: str, **arrays) -> None:
  """``engine.save_npz`` of ``arrays`` as float32."""
  io.save_npz(path, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})


def export_classifier(model: ImageClassifier, directory: str, info: ExportInfo | None = None
                      ) -> None:
  """The family's export of the backbone (``registry.save_model``; a CLIP ViT in transformers
  format, a CLIP ResNet in open_clip's) + the head's parameters in ``head.npz``, in one atomic
  write.

  With ``info`` (class names, tokenizer, image size) the export is also what the ecosystem's
  users take: for a CLIP ViT the tokenizer files and ``preprocessor_config.json``
  (``CLIPProcessor.from_pretrained``) and the classifier with ``id2label`` for
  ``pipeline("image-classification", model=directory, trust_remote_code=True)``
  (``glajax.models.clip.export`` says why transformers' own ``CLIPForImageClassification``
  cannot hold it); for a supervised ResNet, ``ResNetForImageClassification`` with the head as
  its classifier."""
  head = nnx.to_pure_dict(nnx.split(model.head, nnx.Param)[1])
  files = {"head.npz": lambda path: _save_npz(path, **head)}
  classifier = None if info is None else model.as_classifier()
  registry.save_model(model.backbone, directory, info=info, classifier=classifier,
                      extra_files=files)


def _export_backbone(model, directory: str, info: ExportInfo | None = None) -> None:
  """The family's export of the backbone, with the processor files when ``info`` is given."""
  registry.save_model(model.backbone, directory, info=info)


def classifier_task(backbone, head, config) -> Task:
  """End-to-end fine-tuning (``finetune``, LP-FT's second stage): ``head`` on the projected
  image features (normalised or not, as the head says: ``LinearHead.normalize``), CE with
  ``config.label_smoothing``."""
  model = ImageClassifier(backbone, head, features="projected")

  def loss_fn(model, batch, rng):
    del rng
    logits = model(batch["image"])
    loss = losses.cross_entropy(logits, batch["label"], config.label_smoothing, batch.get("mask"))
    return loss, {"accuracy": _accuracy(logits, batch)}

  return Task(model, loss_fn, evaluate.image_logits, None, export_classifier)


def _accuracy(logits, batch):
  correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
  mask = batch.get("mask")
  return correct.mean() if mask is None else (correct * mask).sum() / jnp.maximum(mask.sum(), 1)


def linear_probe_task(head: LinearHead, config) -> Task:
  """A linear head on cached features: batches {"features", "label"} (see ``cache_features``)."""

  def loss_fn(model, batch, rng):
    del rng
    logits = model(batch["features"])
    loss = losses.cross_entropy(logits, batch["label"], config.label_smoothing, batch.get("mask"))
    return loss, {"accuracy": _accuracy(logits, batch)}

  def save_head(model, directory, info=None):
    del info  # the head alone, on cached features
    os.makedirs(directory, exist_ok=True)
    _save_npz(os.path.join(directory, "head.npz"),
              **nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))

  return Task(head, loss_fn, lambda model, batch: model(batch["features"]), None, save_head)


def cache_features(backbone, batches, mesh=None):
  """(features, labels): ``encode_image`` of every batch (padding dropped), for linear probes."""
  return evaluate.evaluate_logits(backbone, image_features, batches, mesh)


def image_features(backbone, batch):
  """The ``logits_fn`` that caches features: ``backbone.encode_image(batch["image"])``."""
  return backbone.encode_image(batch["image"])


def _needs_text(backbone, recipe: str) -> None:
  if not registry.spec_of(backbone).has_text:
    raise bad_argument("model.checkpoints", f"a model with a text tower for the {recipe} recipe",
                       f"a {registry.spec_of(backbone).family} model (image tower only)")


class ContrastiveModel(nnx.Module):
  """A family's model with its class prompts' token ids (C, T, L), T templates per class (not
  trained)."""

  def __init__(self, backbone, prompt_ids):
    prompt_ids = np.asarray(prompt_ids, np.int32)
    if prompt_ids.ndim != 3:
      raise bad_argument("prompt_ids", "(classes, templates, length) token ids",
                         f"shape {prompt_ids.shape}")
    self.backbone = backbone
    self.prompt_ids = nnx.Variable(jnp.asarray(prompt_ids))

  def param_groups(self) -> dict[str, str]:
    return prefixed_groups(self.backbone)


def _contrastive_terms(model, batch, rng):
  """Image and text features of a batch, each image paired with template ``batch["template"]``
  of its class when the batch has them (a stream of (image, template) pairs, as FLYP/CaRot's
  CSV), else with one drawn at random."""
  ids = model.prompt_ids[...]
  template = batch.get("template")
  if template is None:
    template = jax.random.randint(rng, batch["label"].shape, 0, ids.shape[1])
  text_ids = ids[batch["label"], template]
  return (model.backbone.encode_image(batch["image"]), model.backbone.encode_text(text_ids),
          text_ids)


def prompt_ids(backbone, tokenizer, prompts) -> np.ndarray:
  """Token ids of ``prompts``, cut after the longest pooled EOS where the text tower pools at
  the first EOS (CLIP: the tokens after it change nothing), else at their full length."""
  ids = np.asarray(tokenizer(prompts), np.int32)
  eos = registry.spec_of(backbone).eos_token_id
  return ids if eos is None else trim_to_longest(ids, eos)


def _contrastive_loss(loss: str, model, image, text):
  """The pre-training loss of ``model.backbone`` (its ``spec.loss``) on a batch, with its
  metrics: CLIP's symmetric softmax loss, or SigLIP's sigmoid loss with ``logit_bias``."""
  backbone = model.backbone
  scale = backbone.logit_scale[...]
  metrics = {"logit_scale": scale.astype(jnp.float32)}
  if loss == "sigmoid":
    bias = backbone.logit_bias[...]
    metrics.update(sigmoid_loss=losses.sigmoid_loss(image, text, scale, bias),
                   logit_bias=bias.astype(jnp.float32))
    return metrics["sigmoid_loss"], metrics
  metrics["clip_loss"] = losses.clip_contrastive_loss(image, text, scale)
  return metrics["clip_loss"], metrics


def _self_distillation(loss: str, model, teacher, image, text, batch, text_ids):
  """CaRot's L_SD against the EMA teacher in the form of the model's loss (``losses``:
  ``self_distillation_loss`` for softmax, ``sigmoid_self_distillation_loss`` for sigmoid)."""
  student, teacher = model.backbone, teacher.backbone
  teacher_terms = (teacher.encode_image(batch["image"]), teacher.encode_text(text_ids))
  if loss == "sigmoid":
    return losses.sigmoid_self_distillation_loss(
        image, text, student.logit_scale[...], student.logit_bias[...], *teacher_terms,
        teacher.logit_scale[...], teacher.logit_bias[...])
  return losses.self_distillation_loss(image, text, student.logit_scale[...], *teacher_terms,
                                       teacher.logit_scale[...])


def contrastive_task(backbone, tokenizer, classnames, templates, config) -> Task:
  """FLYP, and CaRot when ``config.carot`` has non-zero weights, with the model's own
  pre-training loss (``spec.loss``: CLIP's softmax, SigLIP's sigmoid with ``logit_bias``
  trained):

  L = L_contrastive + λ_OC·‖W_vᵀW_v − I‖_F + λ_SD·L_SD(teacher) [+ λ_VT·‖W_v W_tᵀ‖_F],
  each image paired with a random template of its class name (or ``batch["template"]``). W_v
  is the family's ``image_projection_kernel`` (SigLIP: its MAP head's output projection, as
  CaRot's code takes the attention pool's ``c_proj`` of ResNet towers). Evaluation rebuilds the zero-shot head from
  the fine-tuned text tower with every template (``glajax.zeroshot_head``), with the model's
  logit bias.

  The official data (CaRot ``datacreation_scripts/imagenet_csv_creator.py``) is a CSV of every
  (image, template) pair, read by a shuffled loader for epochs · ⌈N/B⌉ steps
  (``src/models/carot_loss.py``): B pairs drawn without replacement from the N·T. glajax's epochs
  visit each image once with a random template: every pair has the same chance; an image recurs
  exactly once per epoch instead of a hypergeometric number of times.
  (benchmarks/results/contrastive_sampling.md measures the difference at demo scale.)
  """
  _needs_text(backbone, "contrastive")
  weights = config.carot
  loss_name = registry.spec_of(backbone).loss
  classnames, templates = list(classnames), list(templates)
  if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
    raise bad_argument("templates", "a non-empty list of format strings with '{}'",
                       templates[:5])
  prompts = [t.format(c) for c in classnames for t in templates]
  ids = prompt_ids(backbone, tokenizer, prompts).reshape(len(classnames), len(templates), -1)

  def loss_fn(model, batch, rng, teacher=None):
    image, text, text_ids = _contrastive_terms(model, batch, rng)
    loss, metrics = _contrastive_loss(loss_name, model, image, text)
    w_v = model.backbone.image_projection_kernel()
    if weights.lambda_oc:
      metrics["orthogonality"] = losses.orthogonality_penalty(w_v)
      loss = loss + weights.lambda_oc * metrics["orthogonality"]
    if weights.lambda_vt:
      metrics["cross_projection"] = losses.projection_cross_penalty(
          w_v, model.backbone.text_projection_kernel())
      loss = loss + weights.lambda_vt * metrics["cross_projection"]
    if weights.lambda_sd:
      metrics["self_distillation"] = _self_distillation(loss_name, model, teacher, image, text,
                                                        batch, text_ids)
      loss = loss + weights.lambda_sd * metrics["self_distillation"]
    return loss, metrics

  def eval_model(model):
    head = zeroshot_head(model.backbone, tokenizer, classnames, templates, show_progress=False)
    return ImageClassifier(model.backbone,
                           LinearHead.from_zeroshot(head, model.backbone.logit_bias))

  def teacher_update(teacher, params, step):  # read at trace time: total_steps is set by then
    return losses.carot_teacher_update(teacher, params, step, total_steps=config.total_steps,
                                       **weights.teacher)

  return Task(ContrastiveModel(backbone, ids), loss_fn, evaluate.image_logits, eval_model,
              _export_backbone, teacher_update if weights.lambda_sd else None)


def backdoor_task(backbone, text_features, train_counts, config) -> Task:
  """Chen et al.'s PEFT: ``backbone`` built with ``adapter_dim`` adapters, a cosine classifier on
  the pooled image feature initialised from (C, P) "a photo of a {}." ``text_features`` as LIFT's
  ``init_head_text_feat`` (w_c = normalise(normalise(t_c) @ W_vᵀ)), and CE(z + τ·log π_train, y)
  with log π_train = log(n_c/Σn + 1e-9) from ``train_counts`` (``losses.la_log_prior``)."""
  _needs_text(backbone, "backdoor_peft")   # text features and the visual projection
  counts = np.asarray(train_counts, np.float64)
  if counts.ndim != 1 or (counts <= 0).any():
    raise bad_argument("train_counts", "a (C,) array of positive class counts", counts)
  log_prior = losses.la_log_prior(counts)
  head = CosineClassifier.from_text_features(
      text_features, np.asarray(backbone.image_projection_kernel()), config.cosine_scale)
  model = ImageClassifier(backbone, head, features="pre_projection")

  def loss_fn(model, batch, rng):
    del rng
    logits = model(batch["image"])
    loss = losses.logit_adjusted_loss(logits, batch["label"], log_prior, config.tau)
    return loss, {"accuracy": _accuracy(logits, batch)}

  return Task(model, loss_fn, evaluate.image_logits, None, export_classifier)


def prompt_tuning_task(backbone, tokenizer, classnames, config) -> Task:
  """GLA's prompt tuning: ``PromptTunedModel`` on ``config.template`` prompts, CE on its logits.
  Batches hold "image" or cached "features" (the image tower is frozen)."""
  _needs_text(backbone, "prompt_tuning")
  eos = registry.spec_of(backbone).eos_token_id
  if eos is None:
    raise bad_argument("model.checkpoints", "a text tower that pools at its EOS token (CLIP) for "
                       "prompt tuning", f"a {registry.spec_of(backbone).family} model")
  ids, context_index, name_mask = tokenize_prompts(tokenizer, classnames, config.template, eos)
  model = PromptTunedModel(backbone, ids, context_index, name_mask)

  def logits_fn(model, batch):
    if "features" in batch:
      return model(image_features=batch["features"])
    return model(batch["image"])

  def loss_fn(model, batch, rng):
    del rng
    logits = logits_fn(model, batch)
    loss = losses.cross_entropy(logits, batch["label"], where=batch.get("mask"))
    return loss, {"accuracy": _accuracy(logits, batch)}

  def export(model, directory, info=None):
    del info  # the residuals alone (the model is the checkpoint's)
    os.makedirs(directory, exist_ok=True)
    _save_npz(os.path.join(directory, "prompt_residuals.npz"),
              context_residual=model.context_residual[...], name_residual=model.name_residual[...])

  return Task(model, loss_fn, logits_fn, None, export)


RECIPES = {"finetune": finetune, "finetune_sgd": finetune_sgd, "linear_probe": linear_probe,
           "lp_ft": lp_ft, "flyp": flyp, "carot": carot, "backdoor_peft": backdoor_peft,
           "prompt_tuning": prompt_tuning}


# ------------------------------------------------------------------------------- config keys

# The keys every recipe's config has beyond the engine's (``_config``), as ``glajax.schema``
# declares them; then each recipe's own keys (what makes a section that recipe's).
COMMON_FIELDS = {
    "recipe": Field("choice", choices=tuple(RECIPES)), "batch_size": Field("int", 1),
    "epochs": Field("int", 1), "drop_last": Field("bool"),
    "model.dtype": Field("choice", choices=("float32", "bfloat16", "float16")),
    **{f"model.{k}": field for k, (_, field) in layers.RUN_OPTIONS.items()},
    "model.adapter_dim": Field("int", 0, optional=True), "model.adapter_scale": Field("any"),
    "model.activation": Field("choice", choices=tuple(layers.ACTIVATIONS), optional=True),
    "transform": Field("any"),
}
_CAROT = {"carot.lambda_oc": Field("float", 0), "carot.lambda_sd": Field("float", 0),
          "carot.lambda_vt": Field("float", 0), "carot.teacher.every": Field("int", 1),
          "carot.teacher.start": Field("float", 0, 1), "carot.teacher.end": Field("float", 0, 1),
          "carot.teacher.warmup_fraction": Field("float", 0, 1)}
_SMOOTHING = {"label_smoothing": Field("float", 0, 0.999)}
RECIPE_FIELDS = {
    "finetune": _SMOOTHING, "finetune_sgd": _SMOOTHING, "linear_probe": _SMOOTHING,
    "lp_ft": {}, "flyp": _CAROT,
    "carot": _CAROT, "backdoor_peft": {"tau": Field("float", 0),
                                       "cosine_scale": Field("positive", 0)},
    "prompt_tuning": {"template": Field("str")},
}


def check_config(section, prefix: str = "train") -> None:
  """Checks a recipe's config section: ``recipe`` names a recipe whose own keys the section has
  (a section of another recipe is refused, naming ``<prefix>.recipe``), and every engine,
  common and recipe key's type and range, each error naming its key; the transforms too."""
  name = section.get("recipe")
  if name not in RECIPES:
    raise bad_argument(f"{prefix}.recipe", f"one of {', '.join(RECIPES)}", repr(name),
                       ConfigError)
  own = RECIPE_FIELDS.get(name, {})
  require_keys(section, own, f"{prefix}.recipe", f"the {name} recipe (recipe={name!r})")
  for fields in (engine.FIELDS, COMMON_FIELDS, own):
    check_section(section, fields, prefix)
  if "transform" in section:
    try:
      transforms.of_config(section)
    except GlajaxError as e:
      raise ConfigError(str(e)) from None


def unfingerprinted(prefix: str = "train") -> list[str]:
  """The keys of a recipe section that do not change results (progress, logging, placement)."""
  return [*schema.unfingerprinted(engine.FIELDS, prefix),
          *schema.unfingerprinted(COMMON_FIELDS, prefix)]

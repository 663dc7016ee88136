"""The demo's experiment configs: every paper's protocol on the procedural world, each an ordinary
``glajax run`` config of its kind, run by the same runner.

=============  ============  ==================================================================
part           kind          what it shows on the world
=============  ============  ==================================================================
gla            gla           the estimated prior follows the true pre-training prior; debiasing;
                             the GLA ensemble against prompt tuning on one shot per class
wise_ft        wise_ft       fine-tuning (ID gain, shifts), the α sweep, temperature scaling
                             (T fitted on the validation split)
backdoor       backdoor      logit-adjusted loss against CE on the long tail; Σ_m z_m over two
                             foundation models
absent_class   absent_class  ALG and PCV γ after fine-tuning on half of the classes with Mai et
                             al.'s optimiser (``finetune_sgd``: SGD, the head at 10× the
                             backbone's learning rate)
flyp, carot    contrastive   CaRot against FLYP, ECE under shift
compose        compose       fine-tuning and CaRot, then WiSE-FT α, temperature and GLA, each
                             fitted on training-side data
=============  ============  ==================================================================

The scale (``full``, ``quick``, ``tiny``) sets the world's size and the step counts: a demo's
models are small and its learning rates larger than the papers'.
"""
from __future__ import annotations

import copy
import dataclasses

import ml_collections

from glajax.data import transforms, world
from glajax.demo import pretrain as pretrain_lib
from glajax.experiments import config as C
from glajax.train import recipes

OOD_SPLITS = tuple(f"test_{d}" for d in world.DOMAINS[1:])


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much of everything a run does (``full``, ``quick`` and the test's ``tiny``)."""
  world_config: str
  pretrain: pretrain_lib.PretrainSpec
  num_foundation: int = 2
  batch_size: int = 128
  finetune_steps: int = 150
  finetune_lr: float = 1e-3
  absent_lr: float = 0.05            # finetune_sgd's head; its backbone at 0.1·absent_lr
  gla_shots: int = 1                 # GLA's few-shot setting: prompt tuning on k shots per class
  gla_val_shots: int = 4
  prompt_steps: int = 50             # GLA.FS's MAX_EPOCH 50, one batch of all shots per epoch
  prompt_lr: float = 0.02
  contrastive_steps: int = 150
  contrastive_lr: float = 5e-4
  longtail_steps: int = 150
  longtail_lr: float = 0.05
  wise_alphas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
  pcv_seeds: int = 2
  eval_batch: int = 500


SCALES = {
    "full": Scale("default", pretrain_lib.PretrainSpec(steps=300)),
    "quick": Scale("quick", pretrain_lib.PretrainSpec(steps=250, batch_size=128),
                   finetune_steps=80, contrastive_steps=80, longtail_steps=80,
                   wise_alphas=(0.0, 0.25, 0.5, 0.75, 1.0), pcv_seeds=1, eval_batch=600),
    "tiny": Scale("tiny", pretrain_lib.PretrainSpec(width=32, steps=20, batch_size=64),
                  batch_size=64, finetune_steps=10, contrastive_steps=10, longtail_steps=10,
                  gla_val_shots=1, prompt_steps=10,
                  wise_alphas=(0.0, 0.5, 1.0), pcv_seeds=1, eval_batch=100),
}


# The demo world's 32-px tiles are not the papers' photographs: every part keeps one transform,
# the one its effects were measured with (benchmarks/results/demo_effects.md), whatever its recipe
# declares: RandomResizedCrop(32, scale 0.9–1, bicubic) + flip; Resize(32, bicubic) + CenterCrop.
DEMO_TRANSFORMS = dict(
    train=dataclasses.asdict(transforms.TrainTransform(scale=(0.9, 1.0), interpolation="bicubic",
                                                       flip=True)),
    eval=dataclasses.asdict(transforms.CLIP_EVAL))


def _base(kind: str, scale: Scale, foundations, seed: int, progress: bool, recipe: str,
          steps: int, lr: float, validation: bool = False,
          **recipe_arguments) -> ml_collections.ConfigDict:
  """The part's config; ``validation``: ``data.validation`` is the world's validation photos."""
  name = world.dataset_name(scale.world_config)
  config = C.base(kind)
  config.seed, config.progress = seed, progress
  config.model.checkpoints = tuple(foundations[:1])
  config.data.update(train=f"{name}@train", test=f"{name}@test_photo",
                     shifts=tuple(f"{name}@{s}" for s in OOD_SPLITS), image_size=32,
                     eval_batch_size=scale.eval_batch)
  if validation:
    config.data.validation = f"{name}@validation"
  config.train = C.recipe(recipe, **recipe_arguments)
  config.train.transform = ml_collections.ConfigDict(DEMO_TRANSFORMS)
  config.train.update(batch_size=scale.batch_size, total_steps=steps, checkpoint_every=0,
                      log_every=max(1, steps // 5), tensorboard=False)
  config.train.model.dtype = "float32"
  config.train.model.unroll = scale.pretrain.layers   # as pre-trained: the blocks inline
  config.train.optimizer.learning_rate = lr
  if config.train.optimizer.get("warmup_steps"):
    config.train.optimizer.warmup_steps = max(1, steps // 10)
  config.config_spec = f"demo part {kind} ({recipe})"
  return config


def configs(scale: Scale, foundations, seed: int = 0, progress: bool = True
            ) -> dict[str, ml_collections.ConfigDict]:
  """part name -> the experiment config of that part, on the pre-trained ``foundations``."""
  common = dict(scale=scale, foundations=foundations, seed=seed, progress=progress)
  finetune = dict(recipe="finetune", steps=scale.finetune_steps, lr=scale.finetune_lr)
  parts = {}
  # GLA's few-shot claim (GLA.FS): prompt tuning on k shots against its GLA ensemble; the
  # prior from every training photo (unlabelled: training-side data, not the shots alone).
  gla = _base("gla", **common, recipe="prompt_tuning", steps=scale.prompt_steps,
              lr=scale.prompt_lr, validation=True)
  gla.train.template = world.TEMPLATES[0]
  gla.gla = dict(shots=scale.gla_shots, val_shots=scale.gla_val_shots, long_tail=False,
                 match_confidence=False, prior_data=gla.data.train)
  parts["gla"] = gla
  parts["wise_ft"] = _base("wise_ft", **common, **finetune, validation=True)
  parts["wise_ft"].wise_ft = dict(alphas=tuple(scale.wise_alphas), export_alpha=0.5,
                                  ece_bins=15, linear=False)
  backdoor = _base("backdoor", **common, recipe="backdoor_peft", steps=scale.longtail_steps,
                   lr=scale.longtail_lr, num_classes=world.NUM_CLASSES)
  backdoor.model.checkpoints = tuple(foundations)
  backdoor.data.update(train=backdoor.data.train.replace("@train", "@train_lt"), shifts=())
  backdoor.train.model.adapter_dim = recipes.adapter_dim(world.NUM_CLASSES, scale.pretrain.layers)
  backdoor.backdoor = dict(imbalance_ratio=0, template=world.TEMPLATES[0], compare_ce=True)
  parts["backdoor"] = backdoor
  absent = _base("absent_class", **common, recipe="finetune_sgd", steps=scale.finetune_steps,
                 lr=scale.absent_lr)
  absent.data.shifts = ()
  absent.absent_class = dict(num_seen=world.NUM_CLASSES // 2, split_seed=seed, test_fraction=0.0,
                             pcv_seeds=tuple(1000 + k for k in range(scale.pcv_seeds)),
                             pcv_holdout=0.2)
  parts["absent_class"] = absent
  for recipe in ("flyp", "carot"):
    part = _base("contrastive", **common, recipe=recipe, steps=scale.contrastive_steps,
                 lr=scale.contrastive_lr)
    part.train.carot.teacher.every = max(1, scale.contrastive_steps // 10)
    part.contrastive = dict(ece_bins=10, ece_per_batch=0)
    parts[recipe] = part
  parts["compose"] = _compose(parts, scale)
  return parts


# The compose part's recipes: their fine-tuning runs are the wise_ft and carot parts' (the same
# configs, so reused from the cache), its α grid every other α of wise_ft's (those logits too);
# α, T and the prior are fitted on the validation split and the training rows.
COMPOSE_RECIPES = ("finetune", "carot")


def _compose_alphas(alphas) -> tuple[float, ...]:
  return tuple(alphas) if len(alphas) <= 5 else tuple(alphas[::2])


def _compose(parts: dict, scale: Scale) -> ml_collections.ConfigDict:
  config = C.base("compose")
  base = parts["wise_ft"]
  for key in ("seed", "progress", "model", "data", "config_spec"):
    config[key] = copy.deepcopy(base[key])
  config.config_spec = "demo part compose (finetune, carot)"
  config.recipes = {"finetune": copy.deepcopy(base.train),
                    "carot": copy.deepcopy(parts["carot"].train)}
  config.compose = dict(recipes=COMPOSE_RECIPES, stages=("wise_ft", "temperature", "gla"),
                        alphas=_compose_alphas(scale.wise_alphas),
                        num_seen=0, ece_bins=15, oracle=False)
  return config

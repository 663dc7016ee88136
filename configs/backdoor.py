r"""Backdoor adjustment (Chen et al., ICML 2025): AdaptFormer adapters + cosine classifier trained
with the logit-adjusted loss on three ViT-B/16 foundation models (OpenAI CLIP, LAION OpenCLIP
laion2b_s34b_b88k, MetaCLIP metaclip_400m: ``C.BACKBONES``), predictions summed (P(c) = 1/M).
Datasets (the arg): imagenet_lt, places_lt, inaturalist2018, cifar100_lt (imbalance ratio 10, 50
or 100 as ``backdoor.imbalance_ratio``).

``train.model.activation = "quick_gelu"``: the official code (JiahaoChen1/Pre-train-Imbalance
``trainer.py``) rebuilds all three models with OpenAI's ``clip.build_model``, whose blocks use
QuickGELU, so the LAION model (trained with GELU) ran with QuickGELU when the paper's numbers
were made. ``train.model.activation=None`` keeps each checkpoint's own activation.

  glajax run configs/backdoor.py:places_lt,data.manual_dir=~/data/places_lt --workdir ~/runs/bd
  glajax run configs/backdoor.py:cifar100_lt,backdoor.imbalance_ratio=50 --workdir ~/runs/c50
  glajax run configs/backdoor.py:runlocal --workdir /tmp/backdoor
"""
from glajax.data import registry
from glajax.experiments import config as C
from glajax.train import recipes

DATASETS = ("imagenet_lt", "places_lt", "inaturalist2018", "cifar100_lt")
IMBALANCE_RATIOS = (10, 50, 100)


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", *DATASETS))
  dataset = next((a for a in DATASETS if a in args), "imagenet_lt")
  name = "cifar100" if dataset == "cifar100_lt" else dataset
  config = C.base("backdoor")
  config.model.checkpoints = C.BACKBONES
  config.data.update(train=C.train_spec(name), test=C.test_spec(name), shifts=())
  config.train = C.recipe("backdoor_peft", num_classes=registry.get(name).num_classes)
  config.train.model.activation = "quick_gelu"   # clip.build_model's, for every backbone
  # CIFAR-100-LT: IR100 by default; every ratio grouped by IR100's counts (trainer.py).
  cifar = dataset == "cifar100_lt"
  config.backdoor = dict(imbalance_ratio=100 if cifar else 0, group_imbalance_ratio=100 if cifar
                         else 0, template="a photo of a {}.", compare_ce=False)
  config.published.table = "backdoor"
  if "runlocal" in args:
    C.runlocal(config, train="train_lt", shifts=(), backbones=2)
    config.train.model.adapter_dim = recipes.adapter_dim(100, 12)
    config.backdoor.update(imbalance_ratio=0, group_imbalance_ratio=0)
  return config

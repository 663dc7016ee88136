r"""Absent-class calibration (Mai et al., NeurIPS 2024): fine-tune on a subset of the classes, then
γ on the absent classes' logits and AUSUC. ALG takes γ from the fine-tuning data; PCV fine-tunes
once more per ``absent_class.pcv_seeds`` on half of the seen classes, with
``absent_class.pcv_holdout`` of the seen classes' training data held out to choose γ on; the
oracle γ (best on test) is for reference. Datasets (the arg): imagenet_r (100 seen / 100 absent),
imagenet_sketch (500 / 500), office_home (a folder: pass ``data.manual_dir``; domain ``art``
unless ``clipart``, ``product`` or ``real_world`` is given). A dataset's one labelled split is
divided per class (seeded) into fine-tuning pool and test set (``absent_class.test_fraction``).
The authors (OSU-MLB) released no data code: images go through the transforms of the recipe this
runs, WiSE-FT's ``finetune`` (RandomResizedCrop 0.9–1 bicubic, no flip; Resize 224 + CenterCrop).

The source model is the paper's where glajax has it: for ImageNet-R and ImageNet-Sketch the
ImageNet-supervised ResNet-50 the official code fine-tunes (``py/util/model.py``: tllib's
``resnet50``, i.e. torchvision 0.11's ``model_urls['resnet50']``, ``resnet50-0676ba61.pth``,
whose copy in timm's format is ``timm/resnet50.tv_in1k``), its ImageNet head restricted to the
dataset's classes, fine-tuned whole with the official optimiser (``finetune_sgd``). Office-Home's
source model is a ResNet-50 fine-tuned on another domain (the authors' ``source.pth``), which
glajax does not train: Office-Home runs CLIP ViT-B/16 with its zero-shot head, as does the
``clip`` arg everywhere (WiSE-FT's ``finetune`` recipe).

  glajax run configs/absent_class.py:imagenet_r --workdir ~/runs/absent_r
  glajax run configs/absent_class.py:imagenet_r,clip --workdir ~/runs/absent_r_clip
  glajax run configs/absent_class.py:office_home,clipart,data.manual_dir=~/data --workdir ...
  glajax run configs/absent_class.py:runlocal --workdir /tmp/absent          # tiny ResNet
  glajax run configs/absent_class.py:runlocal,clip --workdir /tmp/absent_clip
"""
from glajax.experiments import config as C

# dataset -> (its one labelled split, seen classes, fraction of each class held out for test).
# Office-Home follows Mai et al.'s dataset description (30 of 65 classes seen, a 7:3 split of
# every class); for the ImageNet variants the test fraction (0.2) is ours.
DATASETS = {"imagenet_r": ("test", 100, 0.2), "imagenet_sketch": ("test", 500, 0.2),
            "office_home": ("train", 30, 0.3)}
DOMAINS = ("art", "clipart", "product", "real_world")
RESNET50 = "timm/resnet50.tv_in1k"   # torchvision's IMAGENET1K_V1 weights, timm's hub format
CLIP = "openai/clip-vit-base-patch16"
# py/util/cmd.py: ImageNet 50 "epochs" of 500 iterations (Office-Home: 20, weight decay 5e-4)
ROUNDS, ITERATIONS = 50, 500


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", "clip", *DATASETS, *DOMAINS))
  dataset = next((a for a in DATASETS if a in args), "imagenet_r")
  split, num_seen, test_fraction = DATASETS[dataset]
  clip = "clip" in args or dataset == "office_home"
  if dataset == "office_home":
    dataset = f"office_home_{next((d for d in DOMAINS if d in args), 'art')}"
  config = C.base("absent_class")
  config.model.checkpoints = (CLIP if clip else RESNET50,)
  config.data.update(train=f"{dataset}@{split}", test=f"{dataset}@{split}", shifts=())
  config.train = C.recipe("finetune" if clip else "finetune_sgd")
  if not clip:
    config.train.total_steps = ROUNDS * ITERATIONS
  config.absent_class = dict(num_seen=num_seen, split_seed=0, test_fraction=test_fraction,
                             pcv_seeds=(0, 1, 2), pcv_holdout=0.2)
  config.published.table = "absent_class"
  if "runlocal" in args:
    C.runlocal(config, shifts=())  # the tiny world has its own test split
    if not clip:
      config.model.checkpoints = ("tiny-resnet:0",)
      # 8 steps leave a random ResNet's running statistics half-way (0.9⁸ of the initial ones)
      # to its features', so eval mode would not be the model trained: the smoke run keeps them.
      config.train.batch_stats = "frozen"
    config.absent_class.update(num_seen=50, test_fraction=0.0, pcv_seeds=(0,), pcv_holdout=0.5)
  return config

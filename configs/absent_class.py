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

  glajax run configs/absent_class.py:imagenet_r --workdir ~/runs/absent_r
  glajax run configs/absent_class.py:office_home,clipart,data.manual_dir=~/data --workdir ...
  glajax run configs/absent_class.py:runlocal --workdir /tmp/absent
"""
from glajax.experiments import config as C

# dataset -> (its one labelled split, seen classes, fraction of each class held out for test).
# Office-Home follows Mai et al.'s dataset description (30 of 65 classes seen, a 7:3 split of
# every class); for the ImageNet variants the test fraction (0.2) is ours.
DATASETS = {"imagenet_r": ("test", 100, 0.2), "imagenet_sketch": ("test", 500, 0.2),
            "office_home": ("train", 30, 0.3)}
DOMAINS = ("art", "clipart", "product", "real_world")


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", *DATASETS, *DOMAINS))
  dataset = next((a for a in DATASETS if a in args), "imagenet_r")
  split, num_seen, test_fraction = DATASETS[dataset]
  if dataset == "office_home":
    dataset = f"office_home_{next((d for d in DOMAINS if d in args), 'art')}"
  config = C.base("absent_class")
  config.data.update(train=f"{dataset}@{split}", test=f"{dataset}@{split}", shifts=())
  config.train = C.recipe("finetune")
  config.absent_class = dict(num_seen=num_seen, split_seed=0, test_fraction=test_fraction,
                             pcv_seeds=(0, 1, 2), pcv_holdout=0.2)
  config.published.table = "absent_class"
  if "runlocal" in args:
    C.runlocal(config, shifts=())  # the tiny world has its own test split
    config.absent_class.update(num_seen=50, test_fraction=0.0, pcv_seeds=(0,), pcv_holdout=0.5)
  return config

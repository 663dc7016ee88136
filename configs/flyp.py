r"""FLYP on ImageNet (ViT-B/16): contrastive fine-tuning on class prompts (Goyal et al., CVPR 2023);
accuracy and ECE on ImageNet and its five shifts.

  glajax run configs/flyp.py --workdir ~/runs/flyp
  glajax run configs/flyp.py:runlocal --workdir /tmp/flyp
"""
from glajax.experiments import config as C
from glajax.train import recipes


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal",))
  config = C.base("contrastive")
  config.data.update(train="imagenet2012", eval="imagenet2012", shifts=C.IMAGENET_SHIFTS)
  config.train = recipes.flyp()
  config.train.total_steps = -1
  config.contrastive = dict(method="flyp", ece_bins=15)
  config.published = dict(
      source="Goyal et al., CVPR 2023, ViT-B/16 ImageNet accuracy, entered from memory of the "
      "paper's Table 1 and not checked against it here (no copy of the paper was reachable); "
      "verify before citing",
      rows={"zero-shot": {"ID": 0.683}, "flyp": {"ID": 0.826}})
  if "runlocal" in args:
    C.runlocal(config)
    config.train.teacher.every = 2
  return config

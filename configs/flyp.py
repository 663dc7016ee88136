r"""FLYP on ImageNet (ViT-B/16): contrastive fine-tuning on class prompts (Goyal et al., CVPR 2023);
accuracy and ECE on ImageNet and its five shifts.

  glajax run configs/flyp.py --workdir ~/runs/flyp
  glajax run configs/flyp.py:runlocal --workdir /tmp/flyp
"""
from glajax.experiments import config as C


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal",))
  config = C.base("contrastive")
  config.data.update(train="imagenet2012@train", test="imagenet2012@validation",
                     shifts=C.IMAGENET_SHIFTS)
  config.train = C.recipe("flyp")
  config.contrastive = dict(ece_bins=15, ece_per_batch=0)
  # FLYP's own paper was not readable; CaRot's comparison table quotes its numbers.
  config.published = dict(table="carot/vit_b16_imagenet", columns=C.IMAGENET_COLUMNS,
                          rows=(("zero-shot", "zero-shot"), ("FLYP", "FLYP")))
  if "runlocal" in args:
    C.runlocal(config)
  return config

r"""CaRot on ImageNet (ViT-B/16): contrastive fine-tuning on class prompts with the orthogonality
constraint and EMA self-distillation (Oh et al., NeurIPS 2024); accuracy and ECE on ImageNet and
its five shifts, ECE also as CaRot reports it (10 bins, weighted mean over batches of 512).

  glajax run configs/carot.py --workdir ~/runs/carot
  glajax run configs/carot.py:runlocal --workdir /tmp/carot
"""
from glajax.experiments import config as C


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal",))
  config = C.base("contrastive")
  config.data.update(train="imagenet2012@train", test="imagenet2012@validation",
                     shifts=C.IMAGENET_SHIFTS)
  config.train = C.recipe("carot")
  config.contrastive = dict(ece_bins=10, ece_per_batch=512)
  config.published = dict(table="carot/vit_b16_imagenet", columns=C.IMAGENET_COLUMNS,
                          rows=(("zero-shot", "zero-shot"), ("CaRot", "CaRot")))
  if "runlocal" in args:
    C.runlocal(config)
    config.train.carot.teacher.every = 2
    config.contrastive.ece_per_batch = 16
  return config

r"""CaRot on ImageNet (ViT-B/16): contrastive fine-tuning on class prompts with the orthogonality
constraint and EMA self-distillation (Oh et al., NeurIPS 2024);
accuracy and ECE on ImageNet and its five shifts.

  glajax run configs/carot.py --workdir ~/runs/carot
  glajax run configs/carot.py:runlocal --workdir /tmp/carot
"""
from glajax.experiments import config as C
from glajax.train import recipes


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal",))
  config = C.base("contrastive")
  config.data.update(train="imagenet2012", eval="imagenet2012", shifts=C.IMAGENET_SHIFTS)
  config.train = recipes.carot()
  config.train.total_steps = -1
  config.contrastive = dict(method="carot", ece_bins=10)
  if "runlocal" in args:
    C.runlocal(config)
    config.train.teacher.every = 2
  return config

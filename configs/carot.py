r"""CaRot on ImageNet (ViT-B/16; ``rn50``: OpenAI's RN50): contrastive fine-tuning on class
prompts with the orthogonality constraint and EMA self-distillation (Oh et al., NeurIPS 2024);
accuracy and ECE on ImageNet and its five shifts, ECE also as CaRot reports it (10 bins,
weighted mean over batches of 512).

With ``rn50`` the constraint is on the attention pool's ``c_proj`` (CaRot's ``carot_loss.py``
uses ``visual.attnpool.c_proj.weight.T`` as W_v for ResNets) and BatchNorm keeps the
checkpoint's running statistics (glajax does not yet update them in training; CaRot's
``model.train()`` does). No published RN50 numbers are printed beside it.

  glajax run configs/carot.py --workdir ~/runs/carot
  glajax run configs/carot.py:rn50 --workdir ~/runs/carot_rn50
  glajax run configs/carot.py:runlocal --workdir /tmp/carot
"""
from glajax.experiments import config as C


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", "rn50"))
  rn50 = "rn50" in args
  config = C.base("contrastive")
  if rn50:
    config.model.checkpoints = (C.OPENAI_RN50,)
  config.data.update(train="imagenet2012@train", test="imagenet2012@validation",
                     shifts=C.IMAGENET_SHIFTS)
  config.train = C.recipe("carot")
  config.contrastive = dict(ece_bins=10, ece_per_batch=512)
  if not rn50:
    config.published = dict(table="carot/vit_b16_imagenet", columns=C.IMAGENET_COLUMNS,
                            rows=(("zero-shot", "zero-shot"), ("CaRot", "CaRot")))
  if "runlocal" in args:
    C.runlocal(config, tiny=C.TINY + "-rn" if rn50 else C.TINY)
    config.train.carot.teacher.every = 2
    config.contrastive.ece_per_batch = 16
  return config

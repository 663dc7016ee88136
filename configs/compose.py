r"""The methods together: FLYP, CaRot and WiSE-FT's fine-tuning of CLIP ViT-B/16 on ImageNet, each
followed by WiSE-FT's α, temperature scaling and the GLA ensemble, every choice fitted on
training-side data (α and T on 1 % of ImageNet's training split held out from fine-tuning, the
prior on the fine-tuning rows), evaluated on ImageNet and its five shifts with 95 % intervals.

  glajax run configs/compose.py --workdir ~/runs/compose
  glajax run configs/compose.py:runlocal --workdir /tmp/compose
  glajax run configs/compose.py:absent,... --workdir ...   # classes held out: γ joins the chain

With ``data.train`` unchanged, the fine-tuning runs and logits are those of the wise_ft, flyp
and carot configs given the same ``data.train`` (the caches are shared by content).
"""
import numpy as np

from glajax.experiments import config as C

RECIPES = ("finetune", "flyp", "carot")


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", "absent"))
  config = C.base("compose")
  config.data.update(train="imagenet2012@train[:99%]", validation="imagenet2012@train[99%:]",
                     test="imagenet2012@validation", shifts=C.IMAGENET_SHIFTS)
  config.recipes = {name: C.recipe(name) for name in RECIPES}
  config.compose = dict(recipes=RECIPES, stages=("wise_ft", "temperature", "gla"),
                        alphas=tuple(float(a) for a in np.round(np.linspace(0, 1, 11), 2)),
                        num_seen=0, ece_bins=15, oracle=False)
  if "absent" in args:   # half of the classes held out of fine-tuning; ALG γ on validation
    config.compose.update(num_seen=500, stages=("wise_ft", "temperature", "gla", "gamma"))
  if "runlocal" in args:
    C.runlocal(config, sections=tuple(f"recipes.{name}" for name in RECIPES))
    config.data.validation = f"{C.TINY_WORLD}@validation"
    config.compose.alphas = (0.0, 0.5, 1.0)
    for name in ("flyp", "carot"):
      config.recipes[name].carot.teacher.every = 2
    if "absent" in args:
      config.compose.num_seen = 50
  return config

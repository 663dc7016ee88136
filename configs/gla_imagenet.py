r"""GLA (Zhu et al., NeurIPS 2023) on ImageNet, many-shot: the zero-shot prior estimated on
labelled ImageNet training images, then the GLA ensemble with an end-to-end fine-tuned model
(WiSE-FT's recipe); evaluated on ImageNet (head/medium/tail by the estimated prior) and shifts.

  glajax run configs/gla_imagenet.py --workdir ~/runs/gla_imagenet
  glajax run configs/gla_imagenet.py:runlocal --workdir /tmp/gla_imagenet
"""
from glajax.experiments import config as C
from glajax.train import recipes


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal",))
  config = C.base("gla")
  config.data.update(train="imagenet2012", eval="imagenet2012", shifts=C.IMAGENET_SHIFTS)
  config.train = recipes.finetune()
  config.train.total_steps = -1
  config.gla = dict(finetune="finetune", shots=0, long_tail=False, match_confidence=True,
                    prior_data="imagenet2012@train[:10%]")
  if "runlocal" in args:
    C.runlocal(config)
    config.gla.prior_data = f"{C.TINY_WORLD}@train"
  return config

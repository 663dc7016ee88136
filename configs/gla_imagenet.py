r"""GLA (Zhu et al., NeurIPS 2023) on ImageNet, many-shot: the zero-shot prior estimated on
labelled ImageNet training images, then the GLA ensemble with an end-to-end fine-tuned model
(WiSE-FT's recipe); evaluated on ImageNet (head/medium/tail by the estimated prior) and shifts.

  glajax run configs/gla_imagenet.py --workdir ~/runs/gla_imagenet
  glajax run configs/gla_imagenet.py:runlocal --workdir /tmp/gla_imagenet
"""
from glajax.experiments import config as C


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal",))
  config = C.base("gla")
  config.data.update(train="imagenet2012@train", test="imagenet2012@validation",
                     shifts=C.IMAGENET_SHIFTS)
  config.train = C.recipe("finetune")
  config.gla = dict(shots=0, val_shots=0, long_tail=False, match_confidence=True,
                    prior_data="training")
  config.published.table = "gla"  # headline claims only: no table was readable
  if "runlocal" in args:
    C.runlocal(config)
  return config

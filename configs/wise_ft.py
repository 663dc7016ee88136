r"""WiSE-FT (Wortsman et al., CVPR 2022): ViT-B/16 fine-tuned on ImageNet, evaluated on ImageNet and
its five shifts (V2, R, Sketch, ObjectNet, A) along the weight-space α sweep.

  glajax run configs/wise_ft.py --workdir ~/runs/wise_ft            # end-to-end
  glajax run configs/wise_ft.py:linear --workdir ~/runs/wise_ft_lc  # linear classifier
  glajax run configs/wise_ft.py:runlocal --workdir /tmp/wise_ft     # tiny, on CPU

Manually downloaded sets not yet prepared in TFDS's data_dir need their folders, e.g.
``wise_ft:data.manual_dirs.objectnet=~/objectnet-1.0,data.manual_dirs.imagenet2012=~/imagenet``.
"""
import numpy as np

from glajax.experiments import config as C
from glajax.train import recipes


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", "linear"))
  config = C.base("wise_ft")
  config.data.update(train="imagenet2012", eval="imagenet2012", shifts=C.IMAGENET_SHIFTS)
  # Linear classifier: the head (from the zero-shot head) trained on the frozen encoder's
  # cached features; end to end: the whole CLIP and the head.
  config.train = recipes.linear_probe() if "linear" in args else recipes.finetune()
  config.train.total_steps = -1  # epochs · ⌈N / batch⌉
  config.wise_ft = dict(alphas=tuple(float(a) for a in np.round(np.linspace(0, 1, 11), 2)),
                        export_alpha=0.5, ece_bins=15, linear="linear" in args)
  if "linear" not in args:
    config.published = dict(
        source="Wortsman et al., CVPR 2022, ViT-B/16 end-to-end ImageNet accuracy, entered from "
        "memory of the paper's tables and not checked against them here (no copy of the paper "
        "was reachable); verify before citing",
        rows={"zero-shot (α=0)": {"ID": 0.683}, "fine-tuned (α=1)": {"ID": 0.813}})
  if "runlocal" in args:
    C.runlocal(config)
    config.wise_ft.alphas = (0.0, 0.5, 1.0)
  return config

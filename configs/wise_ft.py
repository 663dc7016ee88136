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


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", "linear"))
  linear = "linear" in args
  config = C.base("wise_ft")
  config.data.update(train="imagenet2012@train", test="imagenet2012@validation",
                     shifts=C.IMAGENET_SHIFTS)
  # Linear classifier: the head (from the zero-shot head) trained on the frozen encoder's
  # cached features; end to end: the whole CLIP and the head.
  config.train = C.recipe("linear_probe" if linear else "finetune")
  config.wise_ft = dict(alphas=tuple(float(a) for a in np.round(np.linspace(0, 1, 11), 2)),
                        export_alpha=0.5, ece_bins=15, linear=linear)
  kind = "linear classifier" if linear else "end-to-end"
  config.published = dict(table="wise_ft/vit_b16_table5", columns=C.IMAGENET_COLUMNS, rows=(
      ("zero-shot (α=0)", "zero-shot (alpha=0)"),
      ("WiSE-FT α=0.5", f"WiSE-FT {kind} alpha=0.5"),
      ("fine-tuned (α=1)", f"fine-tuned {kind} (alpha=1)")))
  if "runlocal" in args:
    C.runlocal(config)
    config.wise_ft.alphas = (0.0, 0.5, 1.0)
  return config

"""The supervised ResNet family (He et al., 2016): torchvision's ResNet-18/34/50/101/152 with
their ImageNet ``fc`` head, the backbone of Mai et al.'s absent-class calibration (NeurIPS 2024),
in the checkpoint formats of ``checkpoint.FORMATS``.

  modeling.py           configs and modules (``ResNet``, ``ResNetConfig``, ``layers.BatchNorm``)
  params_torchvision.py the torchvision/timm table: state-dict files and timm hub folders
  params_hf.py          the transformers (``ResNetForImageClassification``) table
  checkpoint.py         load_resnet over every format, save_resnet (transformers format)
  export.py             the family's export, a fine-tuned head as its classifier
"""
from glajax.models import family
from glajax.models.resnet import checkpoint, export, modeling
from glajax.models.resnet.checkpoint import load_resnet, save_resnet
from glajax.models.resnet.modeling import ResNet, ResNetConfig, init_resnet


def _tiny(image_size: int, seed: int) -> ResNet:
  return init_resnet(ResNetConfig.tiny(image_size=image_size), seed=seed)


FAMILY = family.Family(
    name="resnet",
    types=(ResNet,),
    formats=tuple(family.Format(name, fmt.detect, load_resnet, fmt.hub_patterns)
                  for name, fmt in checkpoint.FORMATS.items()),
    save=export.save,
    tiny={"resnet": _tiny},
    tokenizer=None,
    normalization=(modeling.IMAGENET_MEAN, modeling.IMAGENET_STD),
)

__all__ = ["FAMILY", "ResNet", "ResNetConfig", "init_resnet", "load_resnet", "save_resnet"]

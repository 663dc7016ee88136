"""The CLIP family (Radford et al., 2021): ViT image towers (OpenAI, LAION/OpenCLIP, MetaCLIP,
DataComp), OpenAI's ModifiedResNets (RN50, RN101, RN50x4/x16/x64) and a causal text tower, in
the checkpoint formats of ``checkpoint.FORMATS``.

  modeling.py          configs and modules (``CLIP``, ``CLIPConfig``, ``ModifiedResNet``)
  params_hf.py         the transformers format (ViT)
  params_open_clip.py  open_clip's format (ViT and ResNet)
  params_openai.py     OpenAI's TorchScript .pt (ViT and ResNet; needs torch)
  checkpoint.py        load_clip / save_clip over every format, LIFT's adapters file
  tokenizer.py         OpenAI's BPE tokenizer (offline) or the checkpoint's own
  export.py            what an export needs beyond the weights (processor, classifier)
"""
from glajax.models import family, layers
from glajax.models.clip import checkpoint, export, modeling, tokenizer
from glajax.models.clip.checkpoint import load_clip, save_clip
from glajax.models.clip.modeling import CLIP, CLIPConfig, init_clip


def _tiny(image_size: int, seed: int) -> CLIP:
  return init_clip(CLIPConfig.tiny(image_size=image_size), seed=seed)


def _tiny_resnet(image_size: int, seed: int) -> CLIP:
  return init_clip(CLIPConfig.tiny(resnet=True, image_size=image_size), seed=seed)


FAMILY = family.Family(
    name="clip",
    types=(CLIP,),
    formats=tuple(family.Format(name, module.detect, load_clip, tuple(module.HUB_PATTERNS))
                  for name, module in checkpoint.FORMATS.items()),
    save=export.save,
    tiny={"": _tiny, "rn": _tiny_resnet},
    tokenizer=tokenizer.load_tokenizer,
    load_options=("dtype", "param_dtype", "image_size", "seed", "adapter_dim", "adapter_scale",
                  *layers.RUN_OPTIONS, "activation"),
    normalization=(modeling.MEAN, modeling.STD),
)

__all__ = ["CLIP", "CLIPConfig", "FAMILY", "init_clip", "load_clip", "save_clip"]

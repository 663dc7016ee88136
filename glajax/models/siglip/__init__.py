"""The SigLIP family (Zhai et al., 2023) and SigLIP 2 at fixed resolution (Tschannen et al.,
2025): a ViT with an attention-pooling head, a bidirectional text tower pooled at its last
position, a logit scale and bias, trained with the pairwise sigmoid loss.

  modeling.py    configs and modules (``SigLIP``, ``SiglipConfig``)
  params_hf.py   the transformers-format table
  checkpoint.py  load_siglip / save_siglip
  tokenizer.py   the checkpoint's own tokenizer (SentencePiece or Gemma), the tiny byte one
  export.py      the family's export with the processor files
"""
from glajax.models import family, layers
from glajax.models.siglip import checkpoint, export, modeling, params_hf, tokenizer
from glajax.models.siglip.checkpoint import load_siglip, save_siglip
from glajax.models.siglip.modeling import SigLIP, SiglipConfig, init_siglip


def _tiny(image_size: int, seed: int) -> SigLIP:
  return init_siglip(SiglipConfig.tiny(vision=dict(image_size=image_size)), seed=seed)


FAMILY = family.Family(
    name="siglip",
    types=(SigLIP,),
    formats=(family.Format("transformers", params_hf.detect, load_siglip, params_hf.HUB_PATTERNS),),
    save=export.save,
    tiny={"siglip": _tiny},
    tokenizer=tokenizer.load_tokenizer,
    load_options=("dtype", "param_dtype", "image_size", "seed", *layers.RUN_OPTIONS),
    normalization=(modeling.MEAN, modeling.STD),
)

__all__ = ["FAMILY", "SigLIP", "SiglipConfig", "init_siglip", "load_siglip", "save_siglip"]

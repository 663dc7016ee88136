"""transformers-format SigLIP / SigLIP 2 (fixed resolution) checkpoints (``config.json`` with
``model_type: "siglip"`` + ``model.safetensors``, sharded or not, BF16 included, or
``pytorch_model.bin``) <-> glajax ``SigLIP``.

One table (``checkpoints.Table``): transformers key template, glajax path template, transform.
Linear ``weight[out, in]`` <-> ``kernel[in, out]`` (the MAP head's ``in_proj_weight`` (3W, W)
too: q, k, v stacked on the output axis); Conv OIHW <-> HWIO; ``logit_scale`` and
``logit_bias`` are (1,) tensors there and scalars here; the rest as is.
"""
from __future__ import annotations

import re

import numpy as np

from glajax.errors import CheckpointError, ConfigError
from glajax.models import checkpoints
from glajax.models.siglip.modeling import SiglipConfig

TABLE = checkpoints.Table(
    slots={**checkpoints.HF_TOWER_SLOTS, "fc": r"fc[12]"},
    rows=(  # (transformers key, glajax path, transform)
        *checkpoints.HF_TOWER_ROWS,
        ("vision_model.embeddings.patch_embedding.weight", "vision_model.patch_embedding.kernel",
         "conv"),
        ("vision_model.embeddings.patch_embedding.bias", "vision_model.patch_embedding.bias",
         "same"),
        ("text_model.head.weight", "text_model.head.kernel", "linear"),
        ("text_model.head.bias", "text_model.head.bias", "same"),
        ("vision_model.head.probe", "vision_model.head.probe", "same"),
        ("vision_model.head.attention.in_proj_weight", "vision_model.head.in_proj.kernel",
         "linear"),
        ("vision_model.head.attention.in_proj_bias", "vision_model.head.in_proj.bias", "same"),
        ("vision_model.head.attention.out_proj.weight", "vision_model.head.out_proj.kernel",
         "linear"),
        ("vision_model.head.attention.out_proj.bias", "vision_model.head.out_proj.bias", "same"),
        ("vision_model.head.layernorm.weight", "vision_model.head.layernorm.scale", "same"),
        ("vision_model.head.layernorm.bias", "vision_model.head.layernorm.bias", "same"),
        ("vision_model.head.mlp.{fc}.weight", "vision_model.head.mlp.{fc}.kernel", "linear"),
        ("vision_model.head.mlp.{fc}.bias", "vision_model.head.mlp.{fc}.bias", "same"),
        ("logit_scale", "logit_scale", "scalar"),
        ("logit_bias", "logit_bias", "scalar"),
    ),
    skipped=re.compile(r".*position_ids$"),   # buffers, not parameters
    transforms={**checkpoints.TRANSFORMS,
                "scalar": (lambda w: w.reshape(()) if w.size == 1 else w,
                           lambda w: np.reshape(w, (1,)))},
)
DESCRIPTION = "transformers (config.json with model_type 'siglip' + model.safetensors or .bin)"
# config, weights, tokenizer (tokenizer.json, SentencePiece's spiece.model / tokenizer.model)
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model")
MODEL_TYPES = ("siglip", "siglip2")   # "siglip2" (NaFlex) is detected to be refused by name
# What a transformers SigLIP checkpoint directory holds: replaced by an export with
# overwrite=True.
CHECKPOINT_FILES = (r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json")


def detect(directory: str) -> bool:
  """Whether ``directory``'s ``config.json`` says ``model_type`` "siglip" (SigLIP, SigLIP 2 at
  fixed resolution) or "siglip2" (NaFlex, which ``read`` refuses, naming it)."""
  try:
    config = checkpoints.read_json(directory, "config.json")
  except CheckpointError:
    return False
  return config.get("model_type") in MODEL_TYPES


def read(directory: str) -> tuple[SiglipConfig, dict]:
  """(config, tensors) of a transformers SigLIP directory: its ``config.json`` as a
  ``SiglipConfig`` (refused before any weight is read when it is not one) and every tensor of
  its weights under transformers' names."""
  config = checkpoints.read_json(directory, "config.json")
  try:
    siglip_config = SiglipConfig.from_hf(config)
  except ConfigError as e:
    raise CheckpointError(f"checkpoint {directory} is not a SigLIP checkpoint glajax reads: "
                          f"{e}") from None
  return siglip_config, checkpoints.read_tensors(directory)

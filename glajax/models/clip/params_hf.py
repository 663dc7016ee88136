"""transformers-format CLIP checkpoints (``config.json`` with ``model_type: "clip"`` +
``model.safetensors``, sharded or not, or ``pytorch_model.bin``) <-> glajax ``CLIP``.

One table: each row pairs a transformers key template with a glajax parameter path template
and names the transform between them (Linear ``weight[out, in]`` <-> ``kernel[in, out]``; Conv
OIHW <-> HWIO; the rest as is).
"""
from __future__ import annotations

import os
import re

from glajax.errors import CheckpointError, ConfigError
from glajax.models import checkpoints
from glajax.models.clip.modeling import CLIPConfig

TABLE = checkpoints.Table(
    slots={
        "tower": r"vision|text",
        "i": r"\d+",
        "linear": r"self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]",
        "ln": r"layer_norm[12]",
        "embedding": r"token_embedding|position_embedding",
        "final_ln": r"post_layernorm|final_layer_norm",
        "projection": r"visual_projection|text_projection",
    },
    rows=(  # (transformers key, glajax path, transform)
        ("{tower}_model.encoder.layers.{i}.{linear}.weight",
         "{tower}_model.layers.{i}.{linear}.kernel", "linear"),
        ("{tower}_model.encoder.layers.{i}.{linear}.bias",
         "{tower}_model.layers.{i}.{linear}.bias", "same"),
        ("{tower}_model.encoder.layers.{i}.{ln}.weight", "{tower}_model.layers.{i}.{ln}.scale",
         "same"),
        ("{tower}_model.encoder.layers.{i}.{ln}.bias", "{tower}_model.layers.{i}.{ln}.bias",
         "same"),
        ("vision_model.embeddings.class_embedding", "vision_model.class_embedding", "same"),
        ("vision_model.embeddings.patch_embedding.weight", "vision_model.patch_embedding.kernel",
         "conv"),
        ("{tower}_model.embeddings.{embedding}.weight", "{tower}_model.{embedding}.embedding",
         "same"),
        ("vision_model.pre_layrnorm.weight", "vision_model.pre_layernorm.scale", "same"),
        ("vision_model.pre_layrnorm.bias", "vision_model.pre_layernorm.bias", "same"),
        ("{tower}_model.{final_ln}.weight", "{tower}_model.{final_ln}.scale", "same"),
        ("{tower}_model.{final_ln}.bias", "{tower}_model.{final_ln}.bias", "same"),
        ("{projection}.weight", "{projection}.kernel", "linear"),
        ("logit_scale", "logit_scale", "same"),
    ),
    # buffers, not parameters; an exported classifier's head (load_clip reads the CLIP)
    skipped=re.compile(r".*position_ids$|^classifier\.(weight|bias)$"),
)
DESCRIPTION = "transformers (config.json with model_type 'clip' + model.safetensors or .bin)"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]  # config, weights, tokenizer
# What a transformers CLIP checkpoint directory holds: replaced by an export with overwrite=True.
CHECKPOINT_FILES = (r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json")


def detect(directory: str) -> bool:
  """Whether ``directory`` holds a transformers CLIP: its ``config.json`` says ``model_type``
  "clip" (or has both tower configs, as old ones do)."""
  try:
    config = checkpoints.read_json(directory, "config.json")
  except CheckpointError:
    return False
  return config.get("model_type") == "clip" or ("vision_config" in config
                                                 and "text_config" in config)


def read(directory: str) -> tuple[CLIPConfig, dict]:
  """(config, tensors) of a transformers CLIP directory: its ``config.json`` as a
  ``CLIPConfig`` and every tensor of its weights under transformers' names."""
  config = checkpoints.read_json(directory, "config.json")
  try:
    clip_config = CLIPConfig.from_hf(config)
  except ConfigError as e:
    raise CheckpointError(f"checkpoint {directory} is not a CLIP checkpoint: {e}") from None
  return clip_config, checkpoints.read_tensors(directory)


def hub_directory(path_or_hub_id) -> str:
  """The local directory of a transformers checkpoint: as is, or its hub snapshot (with its
  PyTorch weights when the repo has no safetensors)."""
  directory = checkpoints.resolve_checkpoint(path_or_hub_id, allow_patterns=HUB_PATTERNS)
  if not checkpoints.has_weights(directory) and not os.path.isdir(path_or_hub_id):
    directory = checkpoints.resolve_checkpoint(
        path_or_hub_id, allow_patterns=[*HUB_PATTERNS, "pytorch_model*.bin"])
  return directory

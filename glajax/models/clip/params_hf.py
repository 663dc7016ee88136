"""transformers-format CLIP checkpoints (``config.json`` with ``model_type: "clip"`` +
``model.safetensors``, sharded or not, or ``pytorch_model.bin``) <-> glajax ``CLIP``.

One table: each row pairs a transformers key template with a glajax parameter path template
and names the transform between them (Linear ``weight[out, in]`` <-> ``kernel[in, out]``; Conv
OIHW <-> HWIO; the rest as is).
"""
from __future__ import annotations

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
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS = checkpoints.HF_WEIGHTS
HUB_PATTERNS = ["*.json", "model*.safetensors", "*.txt"]  # configs, weights, tokenizer
HUB_FALLBACK = ["pytorch_model*.bin"]                      # when the repo has no safetensors
# What a transformers CLIP checkpoint directory holds: replaced by an export with overwrite=True.
CHECKPOINT_FILES = (r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json")


def table(config: CLIPConfig) -> checkpoints.Table:
  """The table (one for every transformers CLIP)."""
  del config
  return TABLE


def detect(directory: str) -> bool:
  """Whether ``directory`` holds a transformers CLIP: its ``config.json`` says ``model_type``
  "clip" (or, as old ones, says none and has both tower configs; SigLIP's has both too)."""
  try:
    config = checkpoints.read_json(directory, "config.json")
  except CheckpointError:
    return False
  return config.get("model_type", "clip") == "clip" and ("vision_config" in config
                                                         and "text_config" in config
                                                         or "model_type" in config)


def read(directory: str) -> tuple[CLIPConfig, dict]:
  """(config, tensors) of a transformers CLIP directory: its ``config.json`` as a
  ``CLIPConfig`` and every tensor of its weights under transformers' names."""
  config = checkpoints.read_json(directory, "config.json")
  try:
    clip_config = CLIPConfig.from_hf(config)
  except ConfigError as e:
    raise CheckpointError(f"checkpoint {directory} is not a CLIP checkpoint: {e}") from None
  return clip_config, checkpoints.read_tensors(directory)


def config_json(config: CLIPConfig) -> dict:
  """``config.json`` (``CLIPConfig.to_hf``)."""
  return config.to_hf()


def export(params: dict, config: CLIPConfig) -> dict:
  """glajax parameters -> transformers' tensors."""
  del config
  return TABLE.export(params)

"""open_clip-format CLIP checkpoints (``open_clip_config.json`` + ``open_clip_model.safetensors``
or ``open_clip_pytorch_model.bin``, as ``laion/CLIP-*`` and ``timm/*clip*`` publish them) <->
glajax ``CLIP``, ViT and ModifiedResNet image towers. OpenAI's ``.pt`` files hold the same tensor
names (``params_openai``).

Names and layouts (open_clip 3.3.0 ``model.py``, ``transformer.py``, ``modified_resnet.py``;
openai/CLIP ``clip/model.py``): Linear ``weight[out, in]``, Conv OIHW, ``visual.proj`` and
``text_projection`` as ``x @ W`` (glajax's kernel layout), torch ``nn.MultiheadAttention``'s fused
``in_proj_weight`` = [W_q; W_k; W_v] (3d, d) and ``in_proj_bias``, split on reading into the
three entries ``in_proj_weight[q]``, ``[k]``, ``[v]`` that the table maps (and fused back on
export), BatchNorm ``weight, bias, running_mean, running_var`` (+ ``num_batches_tracked``, a
counter: skipped on reading, written as 0).

The config (``model_cfg``): ``embed_dim``; ``vision_cfg`` with ``layers`` an int (ViT) or four
block counts (ModifiedResNet), ``width``, ``head_width`` (heads = width / head_width; a ResNet
pools with 32·width / head_width heads), ``patch_size``, ``image_size``, ``mlp_ratio``;
``text_cfg`` (``context_length``, ``vocab_size``, ``width``, ``heads``, ``layers``, ``mlp_ratio``,
``pool_type``); ``quick_gelu`` (open_clip's ``-quickgelu`` models: QuickGELU in both towers, else
``nn.GELU``). Anything open_clip builds beyond that (timm towers, transformers text encoders,
attentional pooling, layer scale, ...) is refused, naming it.

Text pooling: open_clip's ``argmax`` pools at the largest token id, which CLIP's tokenizer makes
<|endoftext|> = vocab_size − 1; glajax pools at the first ``eos_token_id`` = vocab_size − 1, the
same token for every tokenized text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from glajax.errors import CheckpointError, InputError, bad_argument
from glajax.models import checkpoints, layers
from glajax.models.clip.modeling import (MEAN, STD, CLIPConfig, CLIPResNetConfig, CLIPTextConfig,
                                         CLIPVisionConfig, square_size)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
WEIGHTS = ((None, WEIGHTS_FILE), (None, "open_clip_pytorch_model.bin"))
DESCRIPTION = ("open_clip (open_clip_config.json + open_clip_model.safetensors or "
               "open_clip_pytorch_model.bin)")
HUB_PATTERNS = ["*.json", WEIGHTS_FILE, "*.txt"]  # configs, weights, tokenizer files
HUB_FALLBACK = ["open_clip_pytorch_model.bin"]    # when the repo has no safetensors
# What an open_clip checkpoint directory holds: replaced by an export with overwrite=True.
CHECKPOINT_FILES = (r"open_clip_config\.json|open_clip_model\.safetensors"
                    r"|open_clip_pytorch_model\.bin")
QKV = ("q", "k", "v")

# One transformer block, open_clip -> glajax (both towers).
_BLOCK = (
    ("ln_{n}.weight", "layer_norm{n}.scale", "same"),
    ("ln_{n}.bias", "layer_norm{n}.bias", "same"),
    ("attn.in_proj_weight[{qkv}]", "self_attn.{qkv}_proj.kernel", "linear"),
    ("attn.in_proj_bias[{qkv}]", "self_attn.{qkv}_proj.bias", "same"),
    ("attn.out_proj.weight", "self_attn.out_proj.kernel", "linear"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias", "same"),
    ("mlp.c_fc.weight", "mlp.fc1.kernel", "linear"),
    ("mlp.c_fc.bias", "mlp.fc1.bias", "same"),
    ("mlp.c_proj.weight", "mlp.fc2.kernel", "linear"),
    ("mlp.c_proj.bias", "mlp.fc2.bias", "same"),
)
# torch BatchNorm -> layers.BatchNorm
_BATCH_NORM = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
               ("running_var", "var"))


def _blocks(theirs: str, ours: str):
  return tuple((f"{theirs}.resblocks.{{i}}.{a}", f"{ours}.layers.{{i}}.{b}", t)
               for a, b, t in _BLOCK)


_TEXT_ROWS = (
    *_blocks("transformer", "text_model"),
    ("token_embedding.weight", "text_model.token_embedding.embedding", "same"),
    ("positional_embedding", "text_model.position_embedding.embedding", "same"),
    ("ln_final.weight", "text_model.final_layer_norm.scale", "same"),
    ("ln_final.bias", "text_model.final_layer_norm.bias", "same"),
    ("text_projection", "text_projection.kernel", "same"),
    ("logit_scale", "logit_scale", "same"),
)
_SLOTS = {"i": r"\d+", "n": r"[12]", "qkv": r"q|k|v", "ln": r"ln_pre|ln_post",
          "conv": r"conv[123]|layer[1-4]\.\d+\.conv[123]",
          "bn": r"bn[123]|layer[1-4]\.\d+\.bn[123]",
          "block": r"layer[1-4]\.\d+", "proj": r"q_proj|k_proj|v_proj|c_proj"}
# buffers, not parameters: BatchNorm's counter, the text tower's causal mask (in TorchScript
# archives) and the three scalars OpenAI's archives hold
_SKIPPED = re.compile(r".*\.num_batches_tracked$|^(attn_mask|input_resolution|context_length"
                      r"|vocab_size)$")

VIT_TABLE = checkpoints.Table(slots=_SLOTS, skipped=_SKIPPED, rows=(
    *_blocks("visual.transformer", "vision_model"),
    ("visual.class_embedding", "vision_model.class_embedding", "same"),
    ("visual.positional_embedding", "vision_model.position_embedding.embedding", "same"),
    ("visual.conv1.weight", "vision_model.patch_embedding.kernel", "conv"),
    ("visual.ln_pre.weight", "vision_model.pre_layernorm.scale", "same"),
    ("visual.ln_pre.bias", "vision_model.pre_layernorm.bias", "same"),
    ("visual.ln_post.weight", "vision_model.post_layernorm.scale", "same"),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", "same"),
    ("visual.proj", "visual_projection.kernel", "same"),
    *_TEXT_ROWS,
))
RESNET_TABLE = checkpoints.Table(slots=_SLOTS, skipped=_SKIPPED, rows=(
    ("visual.{conv}.weight", "vision_model.{conv}.kernel", "conv"),
    *((f"visual.{{bn}}.{a}", f"vision_model.{{bn}}.{b}", "same") for a, b in _BATCH_NORM),
    ("visual.{block}.downsample.0.weight", "vision_model.{block}.downsample.conv.kernel", "conv"),
    *((f"visual.{{block}}.downsample.1.{a}", f"vision_model.{{block}}.downsample.bn.{b}", "same")
      for a, b in _BATCH_NORM),
    ("visual.attnpool.positional_embedding", "vision_model.attnpool.positional_embedding",
     "same"),
    ("visual.attnpool.{proj}.weight", "vision_model.attnpool.{proj}.kernel", "linear"),
    ("visual.attnpool.{proj}.bias", "vision_model.attnpool.{proj}.bias", "same"),
    *_TEXT_ROWS,
))


def table(config: CLIPConfig) -> checkpoints.Table:
  """The table of ``config``'s image tower."""
  return RESNET_TABLE if config.resnet else VIT_TABLE


def split_fused(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``...in_proj_weight`` (3d, d) / ``...in_proj_bias`` (3d,) -> ``...in_proj_weight[q]`` etc.
  (one third each); a first axis that is not a multiple of 3 is left whole, for the table to
  report."""
  out = {}
  for key, value in tensors.items():
    if re.search(r"\.in_proj_(weight|bias)$", key) and value.shape and value.shape[0] % 3 == 0:
      out.update({f"{key}[{part}]": chunk for part, chunk in zip(QKV, np.split(value, 3))})
    else:
      out[key] = value
  return out


def _fuse(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of :func:`split_fused`."""
  out = {k: v for k, v in tensors.items() if not k.endswith(("[q]", "[k]", "[v]"))}
  for key in tensors:
    if key.endswith("[q]"):
      base = key[:-3]
      out[base] = np.concatenate([tensors[f"{base}[{p}]"] for p in QKV])
  return out


def detect(path: str) -> bool:
  """Whether ``path`` is a directory holding ``open_clip_config.json`` or open_clip's weights
  (:func:`read` says which config is missing)."""
  return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in (
      CONFIG_FILE, *(single for _, single in WEIGHTS)))


def read(directory: str) -> tuple[CLIPConfig, dict]:
  """(config, tensors) of an open_clip directory: its ``open_clip_config.json`` as a
  ``CLIPConfig`` (``config_from_open_clip``) and every tensor, fused attention split."""
  source = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(source):
    raise bad_argument("checkpoint", f"{CONFIG_FILE} beside open_clip's weights (its model_cfg: "
                       "open_clip's model_configs/<model name>.json, written as {\"model_cfg\": "
                       "...})", f"none in {directory} (files: {sorted(os.listdir(directory))})",
                       CheckpointError)
  raw = checkpoints.read_json(directory, CONFIG_FILE)
  _check_preprocess(raw.get("preprocess_cfg") or {}, source)
  config = config_from_open_clip(raw.get("model_cfg", raw), source)
  return config, split_fused(checkpoints.read_tensors(directory, WEIGHTS))


def _check_preprocess(preprocess: dict, source: str) -> None:
  """glajax's CLIP normalises with OpenAI's mean and std (every open_clip CLIP it reads uses
  them); a checkpoint trained with others is refused rather than fed wrongly normalised pixels."""
  for name, ours in (("mean", MEAN), ("std", STD)):
    theirs = preprocess.get(name)
    if theirs is not None and not np.allclose(theirs, ours, rtol=0, atol=1e-6):
      raise bad_argument("checkpoint", f"preprocess_cfg.{name} {list(ours)} (OpenAI's, the CLIP "
                         "family's normalisation)", f"{theirs} in {source}", CheckpointError)


# Keys of open_clip's CLIPVisionCfg / CLIPTextCfg / CLIP(...) that glajax reads ...
_VISION_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
              "pool_type", "eos_id"}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
# ... those that change nothing glajax computes (training-time or output-format options; the
# pad and BOS ids, which a causal tower pooling at its EOS never reads) ...
_NEUTRAL = {"pad_id", "bos_id", "patch_dropout", "output_tokens", "attn_pooler_queries",
            "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj",
            "timm_proj_bias", "timm_drop", "timm_drop_path", "timm_model_kwargs",
            "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "hf_model_config",
            "tokenizer_mode", "tiktoken_name", "output_dict", "cast_dtype"}
# ... and what open_clip builds that glajax's CLIP does not: the value must be open_clip's default.
_UNSUPPORTED = {
    "timm_model_name": (None, "a timm image tower"),
    "hf_model_name": (None, "a transformers text encoder"),
    "hf_tokenizer_name": (None, "a transformers tokenizer, not CLIP's BPE"),
    "tokenizer_kwargs": (None, "tokenizer options"),
    "tokenizer_type": ("", "another tokenizer"),
    "text_arch": ("clip", "another text transformer"),
    "variable_text": (False, "variable-length text"),
    "custom_text": (False, "a custom text tower"),
    "multimodal_cfg": (None, "CoCa's multimodal decoder"),
    "init_logit_bias": (None, "a sigmoid-loss logit bias (SigLIP)"),
    "nonscalar_logit_scale": (False, "a logit scale of shape (1,)"),
    "ls_init_value": (None, "layer scale"),
    "attentional_pool": (False, "CoCa's attentional pooler"),
    "no_ln_pre": (False, "no LayerNorm before the blocks"),
    "pos_embed_type": ("learnable", "fixed position embeddings"),
    "final_ln_after_pool": (False, "LayerNorm after pooling"),
    "pool_type": ("tok", "pooling other than the class token"),
    "image_seq_len": (None, "an image sequence length"),
    "act_kwargs": (None, "activation options"),
    "norm_kwargs": (None, "LayerNorm options"),
    "block_type": (None, "custom attention blocks"),
    "qk_norm": (False, "q/k LayerNorm"),
    "scaled_cosine_attn": (False, "scaled cosine attention"),
    "scale_heads": (False, "per-head attention scales"),
    "scale_attn_inner": (False, "an inner attention LayerNorm"),
    "scale_attn": (False, "a post-attention LayerNorm"),
    "scale_fc": (False, "an MLP LayerNorm"),
    "embed_cls": (False, "a text CLS embedding"),
    "no_causal_mask": (False, "bidirectional text attention"),
    "proj_bias": (False, "a text projection bias"),
    "proj_type": ("linear", "another text projection"),
}


def _problems(section: str, cfg: dict, known: set) -> list[str]:
  problems = []
  for key, value in cfg.items():
    if key in known or key in _NEUTRAL:
      continue
    if key in _UNSUPPORTED:
      default, what = _UNSUPPORTED[key]
      if value != default and not (key == "block_type" and value == "default"):
        problems.append(f"{section}{key}={value!r} ({what})")
    else:
      problems.append(f"{section}{key}={value!r} (a key open_clip's CLIP does not have)")
  return problems


def config_from_open_clip(model_cfg: dict, source: str = "the config") -> CLIPConfig:
  """An open_clip ``model_cfg`` (``open_clip_config.json``'s, or a ``model_configs/*.json``) as
  a ``CLIPConfig``, or one CheckpointError listing everything glajax's CLIP does not build."""
  if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict) or (
      not isinstance(model_cfg.get("text_cfg"), dict)) or "embed_dim" not in model_cfg:
    raise bad_argument("checkpoint", "an open_clip model_cfg with embed_dim, vision_cfg and "
                       "text_cfg", f"{str(model_cfg)[:300]} in {source}", CheckpointError)
  vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
  problems = (_problems("", model_cfg, _TOP_KEYS) + _problems("vision_cfg.", vision, _VISION_KEYS)
              + _problems("text_cfg.", text, _TEXT_KEYS))
  pool = text.get("pool_type", "argmax")
  if pool not in ("argmax", "eos"):
    problems.append(f"text_cfg.pool_type={pool!r} (pooling other than at the end-of-text token)")
  if problems:
    raise bad_argument(
        "checkpoint", "an open_clip CLIP with a ViT or ModifiedResNet image tower and CLIP's text "
        "transformer (load other open_clip models with open_clip itself, or with the glajax "
        "family of their architecture)", f"{source}, an open_clip model with "
        f"{len(problems)} features glajax's CLIP does not build:\n  " + "\n  ".join(problems),
        CheckpointError)
  act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
  try:
    vision_config = _vision(vision, act)
    text_config = _text(text, act)
    return CLIPConfig(vision=vision_config, text=text_config,
                      projection_dim=model_cfg["embed_dim"])
  except Exception as e:  # ConfigError, and TypeError/ValueError of malformed values
    raise bad_argument("checkpoint", "a valid open_clip model_cfg", f"{source}: {e}",
                       CheckpointError) from None


def _vision(cfg: dict, act: str) -> CLIPVisionConfig | CLIPResNetConfig:
  layers, width = cfg.get("layers", 12), cfg.get("width", 768)
  head_width = cfg.get("head_width", 64)
  size = square_size(cfg.get("image_size", 224), "vision_cfg.image_size")
  if isinstance(layers, (list, tuple)):
    return CLIPResNetConfig(image_size=size, layers=tuple(layers), width=width,
                            num_attention_heads=width * 32 // head_width)
  if width % head_width:
    raise ValueError(f"vision_cfg.width {width} is not a multiple of head_width {head_width}")
  return CLIPVisionConfig(image_size=size, patch_size=square_size(cfg.get("patch_size", 16),
                                                                 "vision_cfg.patch_size"),
                          hidden_size=width,
                          intermediate_size=int(width * cfg.get("mlp_ratio", 4.0)),
                          num_hidden_layers=layers, num_attention_heads=width // head_width,
                          hidden_act=act)


def _text(cfg: dict, act: str) -> CLIPTextConfig:
  vocab, width = cfg.get("vocab_size", 49408), cfg.get("width", 512)
  eos = cfg["eos_id"] if cfg.get("pool_type", "argmax") == "eos" else vocab - 1
  return CLIPTextConfig(vocab_size=vocab, max_position_embeddings=cfg.get("context_length", 77),
                        hidden_size=width, intermediate_size=int(width * cfg.get("mlp_ratio", 4.0)),
                        num_hidden_layers=cfg.get("layers", 12),
                        num_attention_heads=cfg.get("heads", 8), hidden_act=act,
                        bos_token_id=max(vocab - 2, 0), eos_token_id=eos)


# ---------------------------------------------------------------------------------------------
# Writing


def model_cfg(config: CLIPConfig) -> dict:
  """``config`` as open_clip's ``model_cfg``; refuses what open_clip's config cannot say (each
  tower's own activation, an MLP width that is not int(width · ratio), other pooling)."""
  text, vision = config.text, config.vision
  acts = {text.hidden_act} | (set() if config.resnet else {vision.hidden_act})
  if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
    raise bad_argument("model", "one activation for both towers, 'quick_gelu' or 'gelu' "
                       "(open_clip's quick_gelu flag)", sorted(acts), InputError)
  text_cfg = {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
              "width": text.hidden_size, "heads": text.num_attention_heads,
              "layers": text.num_hidden_layers,
              "mlp_ratio": text.intermediate_size / text.hidden_size}
  if text.eos_token_id not in (2, text.vocab_size - 1):  # 2: transformers' legacy argmax
    text_cfg.update(pool_type="eos", eos_id=text.eos_token_id)
  if config.resnet:
    vision_cfg = {"image_size": vision.image_size, "layers": list(vision.layers),
                  "width": vision.width, "patch_size": None,
                  "head_width": vision.embed_dim // vision.num_attention_heads}
  else:
    vision_cfg = {"image_size": vision.image_size, "layers": vision.num_hidden_layers,
                  "width": vision.hidden_size, "patch_size": vision.patch_size,
                  "head_width": vision.hidden_size // vision.num_attention_heads,
                  "mlp_ratio": vision.intermediate_size / vision.hidden_size}
  out = {"embed_dim": config.projection_dim, "quick_gelu": acts == {"quick_gelu"},
         "vision_cfg": vision_cfg, "text_cfg": text_cfg}
  if _architecture(config_from_open_clip(out)) != _architecture(config):
    raise bad_argument("model", "a CLIP that open_clip's config can describe", f"{config} (as "
                       f"open_clip's config: {json.dumps(out)})", InputError)
  return out


def _architecture(config: CLIPConfig) -> CLIPConfig:
  """``config`` without what is not part of the architecture (run-time options, adapters,
  the initial logit scale, the BOS and pad ids, which nothing computes with); a legacy EOS id 2
  (pooling at the largest id, as open_clip's argmax) as vocab_size − 1."""
  vision = layers.without_run_options(config.vision)
  if not config.resnet:
    vision = dataclasses.replace(vision, adapter_dim=0, adapter_scale="learnable")
  eos = config.text.vocab_size - 1 if config.text.eos_token_id == 2 else config.text.eos_token_id
  text = dataclasses.replace(layers.without_run_options(config.text), bos_token_id=0,
                             pad_token_id=0, eos_token_id=eos)
  return dataclasses.replace(config, vision=vision, text=text, logit_scale_init_value=0.0)


def config_json(config: CLIPConfig) -> dict:
  """``open_clip_config.json``: ``model_cfg`` and OpenAI's preprocessing (bicubic resize of the
  short side, center crop, CLIP's mean and std)."""
  return {"model_cfg": model_cfg(config),
          "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                             "resize_mode": "shortest"}}


def export(params: dict[str, np.ndarray], config: CLIPConfig) -> dict[str, np.ndarray]:
  """glajax parameters and batch statistics -> open_clip's tensors (attention fused, every
  BatchNorm's ``num_batches_tracked`` 0, which ``load_state_dict`` requires)."""
  tensors = _fuse(table(config).export(params))
  for key in [k for k in tensors if k.endswith(".running_mean")]:
    tensors[key[:-len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return tensors

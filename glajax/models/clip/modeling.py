"""Flax NNX CLIP (Radford et al., 2021): ViT image tower, causal text tower, projections.

The module tree mirrors transformers' ``CLIPModel`` so that the transformers conversion
(``params_hf``) is a short table. Images are NHWC float32, normalised with CLIP's mean and std.

  logits_per_image = exp(logit_scale) * normalise(encode_image(x)) @ normalise(encode_text(t))^T
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glajax.errors import ConfigError, bad_argument
from glajax.models.family import ModelSpec
from glajax.models.layers import (ADAPTER_SCALE_LEARNABLE, Block, check_adapter_scale,
                                  check_images, check_sizes, check_token_ids, check_tower,
                                  l2_normalise, normal, positive_size, resize_position_embedding,
                                  run_blocks)

MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's normalisation (clip/clip.py)
STD = (0.26862954, 0.26130258, 0.27577711)

@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The ViT image tower. ``adapter_dim > 0`` adds an AdaptFormer adapter to every block;
  ``adapter_scale`` is ``"learnable"`` (LIFT's scalar, initialised to 1) or a fixed float.
  ``remat`` rematerialises each block in the backward pass; ``attention`` picks the kernel
  (``attend``: ``"auto"``, ``"xla"`` or ``"cudnn"``). Neither changes the function computed."""
  image_size: int = 224
  patch_size: int = 32
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  adapter_dim: int = 0
  adapter_scale: float | str = ADAPTER_SCALE_LEARNABLE
  remat: bool = False
  attention: str = "auto"

  def __post_init__(self):
    check_adapter_scale(self.adapter_scale)
    check_sizes(self, "vision", ("image_size", "patch_size"))
    check_tower(self, "vision")
    if self.image_size % self.patch_size:
      raise bad_argument("vision.image_size", f"a multiple of patch_size {self.patch_size}",
                         self.image_size, ConfigError)
    if self.adapter_dim < 0:
      raise bad_argument("vision.adapter_dim", "an int >= 0", self.adapter_dim, ConfigError)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The causal text tower. ``eos_token_id == 2`` marks legacy configs (pool at argmax id);
  ``remat`` and ``attention`` as in ``CLIPVisionConfig``."""
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  remat: bool = False
  attention: str = "auto"

  def __post_init__(self):
    check_sizes(self, "text", ("vocab_size", "max_position_embeddings"))
    check_tower(self, "text")



_VISION_HF_KEYS = ("image_size", "patch_size", "hidden_size", "intermediate_size",
                   "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps")
_TEXT_HF_KEYS = ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps",
                 "bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers, the shared embedding width and the initial log-scale."""
  vision: CLIPVisionConfig = CLIPVisionConfig()
  text: CLIPTextConfig = CLIPTextConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  def __post_init__(self):
    positive_size("projection_dim", self.projection_dim)

  @classmethod
  def from_hf(cls, config: dict[str, Any] | str | os.PathLike) -> CLIPConfig:
    """From a transformers CLIP ``config.json`` (a dict, the file, its directory, or a
    ``transformers.CLIPConfig``).

    Keys a file leaves out take transformers' defaults, as ``CLIPConfig.from_pretrained`` does.
    """
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if not isinstance(config, dict):
      path = os.path.join(config, "config.json") if os.path.isdir(config) else os.fspath(config)
      try:
        with open(path) as f:
          config = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise bad_argument("config", "a readable CLIP config.json", f"{path} ({e})",
                           ConfigError) from None
    if config.get("model_type") != "clip" and not ("vision_config" in config
                                                    and "text_config" in config):
      raise bad_argument("config", "a CLIP config (model_type 'clip')",
                         f"model_type {config.get('model_type')!r}", ConfigError)
    vision = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
    text = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
    image_size = vision.get("image_size", 224)
    patch_size = vision.get("patch_size", 32)
    vision = {k: vision[k] for k in _VISION_HF_KEYS if k in vision}
    vision["image_size"], vision["patch_size"] = _square(image_size, "image_size"), _square(
        patch_size, "patch_size")
    text = {k: text[k] for k in _TEXT_HF_KEYS if k in text and text[k] is not None}
    if isinstance(text.get("eos_token_id"), (list, tuple)):
      text["eos_token_id"] = text["eos_token_id"][0]
    return cls(vision=CLIPVisionConfig(**vision), text=CLIPTextConfig(**text),
               projection_dim=config.get("projection_dim", 512),
               logit_scale_init_value=config.get("logit_scale_init_value", 2.6592))

  def to_hf(self) -> dict[str, Any]:
    """A transformers ``config.json`` dict (``model_type: "clip"``); adapters are not in it."""
    vision = {k: getattr(self.vision, k) for k in _VISION_HF_KEYS}
    text = {k: getattr(self.text, k) for k in _TEXT_HF_KEYS}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": self.projection_dim,
        "logit_scale_init_value": self.logit_scale_init_value,
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {**text, "model_type": "clip_text_model",
                        "projection_dim": self.projection_dim},
        "vision_config": {**vision, "model_type": "clip_vision_model", "num_channels": 3,
                          "projection_dim": self.projection_dim},
    }

  @classmethod
  def vit_b32(cls) -> CLIPConfig:
    """OpenAI CLIP ViT-B/32."""
    return cls()

  @classmethod
  def vit_b16(cls) -> CLIPConfig:
    """OpenAI CLIP ViT-B/16."""
    return cls(vision=CLIPVisionConfig(patch_size=16))

  @classmethod
  def vit_l14(cls) -> CLIPConfig:
    """OpenAI CLIP ViT-L/14 (224 px)."""
    return cls(vision=CLIPVisionConfig(patch_size=14, hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16),
               text=CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                   num_attention_heads=12),
               projection_dim=768)

  @classmethod
  def vit_l14_336(cls) -> CLIPConfig:
    """OpenAI CLIP ViT-L/14 at 336 px."""
    cfg = cls.vit_l14()
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=336))

  @classmethod
  def tiny(cls, **overrides) -> CLIPConfig:
    """A few-k-parameter CLIP (plus the 49408 x 32 token table) for tests and demos.

    ``overrides`` name a field of ``CLIPConfig`` (``projection_dim=8``), a field of one tower with
    its prefix (``vision_image_size=30``, ``text_vocab_size=100``) or, when only one tower has it,
    without (``image_size=30``, ``adapter_dim=4``, ``vocab_size=100``).
    """
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    top = dict(projection_dim=16)
    vision_fields = {f.name for f in dataclasses.fields(CLIPVisionConfig)}
    text_fields = {f.name for f in dataclasses.fields(CLIPTextConfig)}
    for key, value in overrides.items():
      if key in ("projection_dim", "logit_scale_init_value"):
        top[key] = value
      elif key.startswith("vision_") and key[7:] in vision_fields:
        vision[key[7:]] = value
      elif key.startswith("text_") and key[5:] in text_fields:
        text[key[5:]] = value
      elif key in vision_fields and key not in text_fields:
        vision[key] = value
      elif key in text_fields and key not in vision_fields:
        text[key] = value
      else:
        raise bad_argument(f"tiny({key}=...)", "a CLIPConfig field, vision_<field> or text_<field>",
                           key, ConfigError)
    return cls(vision=CLIPVisionConfig(**vision), text=CLIPTextConfig(**text), **top)


def _square(size, name: str) -> int:
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise bad_argument(f"vision_config.{name}", "a square size", size, ConfigError)
    size = size[0]
  return int(size)


class VisionTransformer(nnx.Module):
  """CLIP's ViT: patch conv, class token, position embeddings, pre-LN, blocks, post-LN on CLS."""

  def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    width = cfg.hidden_size
    self.class_embedding = nnx.Param(normal(width**-0.5)(rngs.params(), (width,), param_dtype))
    self.patch_embedding = nnx.Conv(3, width, kernel_size=(cfg.patch_size, cfg.patch_size),
                                    strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                                    use_bias=False, kernel_init=normal(0.02), dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(cfg.grid_size**2 + 1, width, embedding_init=normal(0.02),
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = lambda: nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.pre_layernorm = norm()
    self.layers = nnx.List([Block(cfg, causal=False, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = norm()

  def embed(self, images):
    """(B, H, W, 3) -> (B, 1 + grid^2, width): [CLS; patches] + position embeddings."""
    check_images(images, self.config.image_size)
    patches = self.patch_embedding(images.astype(self.dtype))
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype),
                           (patches.shape[0], 1, patches.shape[-1]))
    tokens = jnp.concatenate([cls, patches], axis=1)
    return tokens + self.position_embedding.embedding[...].astype(tokens.dtype)

  def __call__(self, images):
    """(B, H, W, 3) -> (B, width): post-LN CLS feature (HF's ``pooler_output``)."""
    h = self.pre_layernorm(self.embed(images))
    h = run_blocks(self.layers, h, self.config.remat)
    return self.post_layernorm(h[:, 0])


class TextTransformer(nnx.Module):
  """CLIP's causal text transformer; the feature is the final-LN state at the first EOS token."""

  def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    width = cfg.hidden_size
    embed = lambda n: nnx.Embed(n, width, embedding_init=normal(0.02), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = embed(cfg.vocab_size)
    self.position_embedding = embed(cfg.max_position_embeddings)
    self.layers = nnx.List([Block(cfg, causal=True, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.final_layer_norm = nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids, inputs_embeds=None):
    """(B, L) ids [, (B, L, width) embeddings replacing the lookup] -> (B, width)."""
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise bad_argument("input_ids", "a (batch, length) integer array",
                         f"shape {input_ids.shape} dtype {input_ids.dtype}")
    batch, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise bad_argument("input_ids", f"length <= {cfg.max_position_embeddings}", length)
    check_token_ids("input_ids", input_ids, cfg.vocab_size)
    if inputs_embeds is None:
      inputs_embeds = self.token_embedding(input_ids)
    elif inputs_embeds.shape != (batch, length, cfg.hidden_size):
      raise bad_argument("inputs_embeds", f"shape {(batch, length, cfg.hidden_size)}",
                         inputs_embeds.shape)
    positions = self.position_embedding.embedding[:length]
    h = inputs_embeds + positions.astype(inputs_embeds.dtype)
    h = self.final_layer_norm(run_blocks(self.layers, h, cfg.remat))
    return h[jnp.arange(batch), eos_positions(input_ids, cfg.eos_token_id)]


class CLIP(nnx.Module):
  """CLIP with transformers' parameter layout; random init as transformers' ``_init_weights``.
  Implements the family interface (``glajax.models.family``)."""

  logit_bias = None  # CLIP's logits have no bias (SigLIP's do)

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.vision_model = VisionTransformer(config.vision, dtype=dtype, param_dtype=param_dtype,
                                          rngs=rngs)
    self.text_model = TextTransformer(config.text, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
    projection = lambda width: nnx.Linear(width, config.projection_dim, use_bias=False,
                                          kernel_init=normal(width**-0.5), dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
    self.visual_projection = projection(config.vision.hidden_size)
    self.text_projection = projection(config.text.hidden_size)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

  @property
  def spec(self) -> ModelSpec:
    text = self.config.text
    return ModelSpec("clip", self.config.vision.image_size, MEAN, STD, has_text=True,
                     loss="softmax", context_length=text.max_position_embeddings,
                     vocab_size=text.vocab_size, eos_token_id=text.eos_token_id)

  @staticmethod
  def param_groups() -> dict[str, str]:
    """The parameter groups recipes name: image tower with its projection, text tower with its
    projection, the logit scale, LIFT's adapters."""
    return {"image": r"^(vision_model|visual_projection)/", "text": r"^(text_model|text_projection)/",
            "scale": r"^logit_scale$", "adapters": r"/adapter/"}

  def image_features(self, images):
    """(B, H, W, 3) -> (B, vision width): pooled post-LN CLS feature, before the projection."""
    return self.vision_model(images).astype(jnp.float32)

  def image_projection_kernel(self):
    """The (vision width, D) kernel W_v of the visual projection."""
    return self.visual_projection.kernel[...]

  def text_projection_kernel(self):
    """The (text width, D) kernel W_t of the text projection."""
    return self.text_projection.kernel[...]

  def encode_image(self, images):
    """(B, H, W, 3) CLIP-normalised -> (B, D) projected image embeddings, not normalised."""
    return self.visual_projection(self.vision_model(images)).astype(jnp.float32)

  def embed_tokens(self, input_ids):
    """(B, L) ids -> (B, L, width) token embeddings (before position embeddings)."""
    return self.text_model.token_embedding(input_ids)

  def encode_text(self, input_ids, inputs_embeds=None):
    """(B, L) int ids -> (B, D) projected text embeddings, not normalised.

    ``inputs_embeds`` (B, L, width), if given, replaces the token lookup (prompt tuning); the
    ids still decide where the EOS feature is pooled.
    """
    return self.text_projection(self.text_model(input_ids, inputs_embeds)).astype(jnp.float32)

  def __call__(self, images, input_ids):
    """logits_per_image (B_img, B_txt) = exp(logit_scale) * cos(image_i, text_j)."""
    image = l2_normalise(self.encode_image(images))
    text = l2_normalise(self.encode_text(input_ids))
    return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * image @ text.T


def eos_positions(input_ids, eos_token_id: int):
  """Where the text tower pools: the first ``eos_token_id`` of each row (legacy configs with
  eos_token_id == 2: the largest id, as transformers does). NumPy in, NumPy out."""
  xp = np if isinstance(input_ids, np.ndarray) else jnp
  if eos_token_id == 2:
    return xp.argmax(input_ids, axis=-1)
  return xp.argmax(input_ids == eos_token_id, axis=-1)


def interpolate_position_embedding(model: CLIP, image_size: int) -> CLIP:
  """Sets ``model`` (in place, and returns it) to take ``image_size`` px images.

  The patch position embeddings are resized bicubically (``resize_position_embedding``).
  """
  vision = model.config.vision
  if (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
      or image_size < 1 or image_size % vision.patch_size):
    raise bad_argument("image_size", f"a positive multiple of the patch size {vision.patch_size}",
                       repr(image_size))
  new_vision = dataclasses.replace(vision, image_size=image_size)
  table = model.vision_model.position_embedding.embedding
  table.set_value(resize_position_embedding(table[...], new_vision.grid_size))
  model.vision_model.position_embedding.num_embeddings = new_vision.grid_size**2 + 1
  model.vision_model.config = new_vision
  model.config = dataclasses.replace(model.config, vision=new_vision)
  return model


def init_clip(config: CLIPConfig, *, seed: int = 0, dtype=jnp.float32,
              param_dtype=jnp.float32) -> CLIP:
  """A randomly initialised ``CLIP(config, rngs=nnx.Rngs(seed))`` (the same weights, to float
  rounding), its initialisers compiled as one unoptimised XLA program that runs once: about 3 s
  instead of the eager constructor's ~7 s of compiling ~100 small kernels on 2 CPU cores."""
  build = lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  init = jax.jit(lambda: nnx.state(build())).lower().compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return nnx.merge(graphdef, init())

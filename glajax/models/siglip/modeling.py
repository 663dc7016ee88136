"""Flax NNX SigLIP and SigLIP 2 at fixed resolution (Zhai et al., 2023; Tschannen et al., 2025).

The module tree mirrors transformers' ``SiglipModel`` (``models/siglip/modeling_siglip.py``) so
that the transformers conversion (``params_hf``) is a short table; big_vision's
``models/proj/image_text/two_towers.py`` and ``models/vit.py`` (``MAPHead``) are the originals.
Images are NHWC float32 normalised with mean = std = 0.5 (pixels in [-1, 1]).

  image tower: patch conv (with bias) + learned position embeddings (no CLS), pre-LN blocks,
               post-LN, attention-pooling head (MAP):
               y = W_o · MHA(probe, tokens) + b_o,  f_img = y + MLP(LN(y))
  text tower:  token + position embeddings, bidirectional pre-LN blocks, final LN, the state at
               the last position (prompts are padded to the fixed length 64), f_txt = head(·)
  logits_per_image = exp(t) · normalise(f_img) · normalise(f_txt)ᵀ + b

What the family interface calls the "projection" (``glajax.models.family``): SigLIP has no
linear map after its pooling, the MAP head's output is the embedding. ``image_features`` is the
MAP attention's pooled value mixture before its output projection W_o, and
``image_projection_kernel`` is W_o: the analogue of CLIP ResNets' attention pool, for which
CaRot's official code (MLAI-Yonsei/CaRot ``src/models/carot_loss.py``) names
``visual.attnpool.c_proj`` as the W_v it constrains. ``encode_image`` adds the head's residual
MLP, so LIFT-style heads on ``image_features`` see a feature one linear map (plus that MLP) away
from the embedding. The text head (text width -> D) is ``text_projection_kernel``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from glajax.errors import ConfigError, bad_argument
from glajax.models import checkpoints
from glajax.models.family import ModelSpec
from glajax.models.layers import (MLP, Blocks, attend, check_images, check_sizes, check_tower,
                                  embed_text, init_compiled, l2_normalise,
                                  resize_vision_positions, square_size)

MEAN = (0.5, 0.5, 0.5)   # big_vision's value_range(-1, 1); transformers' SiglipImageProcessor
STD = (0.5, 0.5, 0.5)
CONTEXT_LENGTH = 64      # the text length SigLIP and SigLIP 2 were trained with
# big_vision's SigLIP initialisation (configs/proj/image_text/SigLIP_demo.ipynb):
# temperature_init = 10, bias_init = -10.
LOGIT_SCALE_INIT = math.log(10.0)
LOGIT_BIAS_INIT = -10.0
TOKENIZERS = (None, "bytes")   # None: the checkpoint's own files; "bytes": glajax's tiny one
BYTE_VOCAB_SIZE = 3 + 256      # "bytes" (``tokenizer.byte_tokenizer``): <pad>, </s>, <unk>, bytes


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  """The ViT image tower with its attention-pooling head. ``remat`` rematerialises each block in
  the backward pass; ``attention`` picks the blocks' kernel (``layers.attend``); ``unroll`` is
  the blocks run per scan iteration (``layers.Blocks``). None changes the function computed."""
  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  remat: str = "none"
  attention: str = "auto"
  unroll: int = 1

  def __post_init__(self):
    check_sizes(self, "vision", ("image_size", "patch_size"))
    check_tower(self, "vision")
    if self.image_size < self.patch_size:
      raise bad_argument("vision.image_size", f"at least patch_size {self.patch_size}",
                         self.image_size, ConfigError)

  @property
  def grid_size(self) -> int:
    """Patches per side: ⌊image_size / patch_size⌋ (So400m/14 at 384 px: 27, the last 6 pixels
    unused, as the strided convolution of transformers and big_vision leaves them)."""
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
  """The bidirectional text tower; ``projection_size`` is its head's output width (the
  embedding width D, equal to the image tower's width). The token ids are the tokenizer's and
  change nothing in the model (it pools at the last position)."""
  vocab_size: int = 32000
  max_position_embeddings: int = CONTEXT_LENGTH
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  projection_size: int = 768
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407
  remat: str = "none"
  attention: str = "auto"
  unroll: int = 1

  def __post_init__(self):
    check_sizes(self, "text", ("vocab_size", "max_position_embeddings", "projection_size"))
    check_tower(self, "text")


_VISION_HF_KEYS = ("image_size", "patch_size", "hidden_size", "intermediate_size",
                   "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps")
_TEXT_HF_KEYS = ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "projection_size", "hidden_act",
                 "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")
TOKENIZER_KEY = "glajax_tokenizer"   # config.json entry naming a tokenizer glajax builds


def _defaults(cls) -> dict:
  """The field defaults of a tower config: transformers' (``configuration_siglip.py``), which a
  checkpoint's ``config.json`` leaves out."""
  return {f.name: f.default for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """Both towers, the initial log-scale t and bias b, and ``tokenizer``: None (the checkpoint's
  own tokenizer files) or ``"bytes"`` (glajax's byte-level tokenizer of the tiny models, written
  with every export)."""
  vision: SiglipVisionConfig = SiglipVisionConfig()
  text: SiglipTextConfig = SiglipTextConfig()
  logit_scale_init_value: float = LOGIT_SCALE_INIT
  logit_bias_init_value: float = LOGIT_BIAS_INIT
  tokenizer: str | None = None

  def __post_init__(self):
    if self.text.projection_size != self.vision.hidden_size:
      raise bad_argument("text.projection_size", f"the image tower's width "
                         f"{self.vision.hidden_size} (both embeddings share one space)",
                         self.text.projection_size, ConfigError)
    if self.tokenizer not in TOKENIZERS:
      raise bad_argument("tokenizer", f"one of {TOKENIZERS}", repr(self.tokenizer), ConfigError)

  @classmethod
  def from_hf(cls, config: dict[str, Any] | str | os.PathLike) -> SiglipConfig:
    """From a transformers SigLIP ``config.json`` (a dict, the file, its directory, or a
    ``transformers.SiglipConfig``); keys it leaves out take transformers' defaults.

    SigLIP 2 at fixed resolution (e.g. ``google/siglip2-base-patch16-224``) is published as
    ``model_type "siglip"`` too. Refused, naming what was found: another model type (CLIP,
    SigLIP 2 NaFlex's ``"siglip2"``, a vision tower alone), no attention-pooling head, a
    non-square or non-RGB input.
    """
    config = checkpoints.config_dict(config, "SigLIP")
    model_type = config.get("model_type")
    if model_type == "siglip2":
      raise bad_argument("config", "a fixed-resolution SigLIP / SigLIP 2 config (model_type "
                         "'siglip', e.g. google/siglip2-base-patch16-224)",
                         "model_type 'siglip2': a SigLIP 2 NaFlex checkpoint (variable "
                         "resolution and aspect ratio), which glajax does not implement",
                         ConfigError)
    if model_type != "siglip":
      raise bad_argument("config", "a SigLIP config (model_type 'siglip') with both towers",
                         f"model_type {model_type!r}", ConfigError)
    vision = {**_defaults(SiglipVisionConfig), **(config.get("vision_config") or {})}
    text = {**_defaults(SiglipTextConfig), **(config.get("text_config") or {})}
    if not vision.get("vision_use_head", True):
      raise bad_argument("config", "vision_config.vision_use_head true (the attention-pooling "
                         "head gives the image embedding)", "vision_use_head false", ConfigError)
    if vision.get("num_channels", 3) != 3:
      raise bad_argument("vision_config.num_channels", "3 (RGB)", vision["num_channels"],
                         ConfigError)
    if text.get("projection_size") is None:   # transformers: the text width
      text["projection_size"] = text["hidden_size"]
    if isinstance(text.get("eos_token_id"), (list, tuple)):
      text["eos_token_id"] = text["eos_token_id"][0]
    vision = {k: vision[k] for k in _VISION_HF_KEYS}
    vision["image_size"] = square_size(vision["image_size"], "image_size")
    vision["patch_size"] = square_size(vision["patch_size"], "patch_size")
    return cls(vision=SiglipVisionConfig(**vision),
               text=SiglipTextConfig(**{k: text[k] for k in _TEXT_HF_KEYS}),
               tokenizer=config.get(TOKENIZER_KEY))

  def to_hf(self) -> dict[str, Any]:
    """A transformers ``config.json`` dict (``model_type: "siglip"``) that ``SiglipModel``
    loads; ``glajax_tokenizer`` when glajax builds the tokenizer."""
    out = {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {**{k: getattr(self.text, k) for k in _TEXT_HF_KEYS},
                        "model_type": "siglip_text_model"},
        "vision_config": {**{k: getattr(self.vision, k) for k in _VISION_HF_KEYS},
                          "model_type": "siglip_vision_model", "num_channels": 3,
                          "vision_use_head": True},
    }
    if self.tokenizer is not None:
      out[TOKENIZER_KEY] = self.tokenizer
    return out

  @classmethod
  def base_p16_224(cls, vocab_size: int = 32000) -> SiglipConfig:
    """SigLIP B/16 at 224 px (``google/siglip-base-patch16-224``'s config.json: text width 768,
    MLP 3072, 12 heads, vocabulary 32000, patch 16; the rest transformers' defaults).
    ``vocab_size=256000``: SigLIP 2 B/16 (``google/siglip2-base-patch16-224``, Gemma's
    tokenizer)."""
    return cls(text=SiglipTextConfig(vocab_size=vocab_size))

  @classmethod
  def so400m_p14_384(cls) -> SiglipConfig:
    """SigLIP So400m/14 at 384 px (``google/siglip-so400m-patch14-384``'s config.json; big_vision
    ``models/vit.py`` variant "So400m": width 1152, depth 27, MLP 4304, 16 heads)."""
    tower = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                 num_attention_heads=16)
    return cls(vision=SiglipVisionConfig(image_size=384, patch_size=14, **tower),
               text=SiglipTextConfig(projection_size=1152, **tower))

  @classmethod
  def tiny(cls, vision: dict | None = None, text: dict | None = None, **top) -> SiglipConfig:
    """A few-k-parameter SigLIP for tests and runlocal runs: 32 px, patch 8, width 32, 2 blocks
    of 4 heads per tower, 64 tokens of glajax's byte-level tokenizer (``BYTE_VOCAB_SIZE`` ids,
    pad 0, EOS 1). ``vision`` / ``text`` override fields of one tower, ``top`` of the config."""
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)
    vision = {**dict(image_size=32, patch_size=8), **tower, **(vision or {})}
    text = {**dict(vocab_size=BYTE_VOCAB_SIZE, projection_size=vision["hidden_size"],
                   pad_token_id=0, bos_token_id=None, eos_token_id=1), **tower, **(text or {})}
    return cls(vision=SiglipVisionConfig(**vision), text=SiglipTextConfig(**text),
               **{"tokenizer": "bytes", **top})


def _norm(cfg, dtype, param_dtype, rngs):
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def _xavier():
  return jax.nn.initializers.xavier_uniform()


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision ``models/vit.py`` ``MAPHead``; transformers
  ``SiglipMultiheadAttentionPoolingHead``): a learned probe attends over the tokens,
  y = W_o · MHA(probe, x) + b_o, then y + MLP(LN(y)).

  ``in_proj`` holds torch ``MultiheadAttention``'s q/k/v as one (W, 3W) kernel, as its
  ``in_proj_weight`` does. The one-query attention runs on XLA (``attend``'s cuDNN path pads
  queries and keys alike)."""

  def __init__(self, cfg: SiglipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    width = cfg.hidden_size
    self.probe = nnx.Param(_xavier()(rngs.params(), (1, 1, width), param_dtype))
    self.in_proj = nnx.Linear(width, 3 * width, kernel_init=_xavier(), dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.out_proj = nnx.Linear(width, width, kernel_init=_xavier(), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.layernorm = _norm(cfg, dtype, param_dtype, rngs)
    self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = cfg.num_attention_heads

  def pool(self, x):
    """(B, L, W) tokens -> (B, W): the probe's attention over them, heads concatenated, before
    the output projection W_o."""
    batch, length, width = x.shape
    dtype = self.in_proj.dtype or x.dtype
    kernel, bias = self.in_proj.kernel[...].astype(dtype), self.in_proj.bias[...].astype(dtype)
    heads = lambda y, n: y.reshape(batch, n, self.num_heads, width // self.num_heads)
    q = self.probe[...].astype(dtype) @ kernel[:, :width] + bias[:width]
    k, v = jnp.split(jnp.dot(x.astype(dtype), kernel[:, width:]) + bias[width:], 2, axis=-1)
    out = attend(heads(jnp.broadcast_to(q, (batch, 1, width)), 1), heads(k, length),
                 heads(v, length), causal=False, implementation="xla")
    return out.reshape(batch, width)

  def finish(self, pooled):
    """(B, W) pooled -> (B, W) embedding: y = W_o · pooled + b_o, y + MLP(LN(y))."""
    y = self.out_proj(pooled)
    return y + self.mlp(self.layernorm(y))

  def __call__(self, x):
    return self.finish(self.pool(x))


class VisionTransformer(nnx.Module):
  """SigLIP's ViT: patch conv with bias, position embeddings (no class token), blocks,
  post-LN, MAP head."""

  def __init__(self, cfg: SiglipVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    width = cfg.hidden_size
    self.patch_embedding = nnx.Conv(3, width, kernel_size=(cfg.patch_size, cfg.patch_size),
                                    strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                                    kernel_init=jax.nn.initializers.lecun_normal(), dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(cfg.grid_size**2, width,
                                        embedding_init=jax.nn.initializers.normal(width**-0.5),
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = Blocks(cfg, causal=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_layernorm = _norm(cfg, dtype, param_dtype, rngs)
    self.head = MAPHead(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def embed(self, images):
    """(B, H, W, 3) -> (B, grid^2, width): patches + position embeddings."""
    check_images(images, self.config.image_size)
    patches = self.patch_embedding(images.astype(self.dtype))
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    return patches + self.position_embedding.embedding[...].astype(patches.dtype)

  def tokens(self, images):
    """(B, H, W, 3) -> (B, grid^2, width): the post-LN tokens (HF's ``last_hidden_state``)."""
    return self.post_layernorm(self.layers(self.embed(images)))

  def __call__(self, images):
    """(B, H, W, 3) -> (B, width): the MAP head's embedding (HF's ``pooler_output``)."""
    return self.head(self.tokens(images))


class TextTransformer(nnx.Module):
  """SigLIP's bidirectional text transformer: the final-LN state at the last position, through
  ``head`` (text width -> D)."""

  def __init__(self, cfg: SiglipTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    width = cfg.hidden_size
    embed = lambda n: nnx.Embed(n, width, embedding_init=jax.nn.initializers.normal(width**-0.5),
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = embed(cfg.vocab_size)
    self.position_embedding = embed(cfg.max_position_embeddings)
    self.layers = Blocks(cfg, causal=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.final_layer_norm = _norm(cfg, dtype, param_dtype, rngs)
    self.head = nnx.Linear(width, cfg.projection_size,
                           kernel_init=jax.nn.initializers.lecun_normal(), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids, inputs_embeds=None):
    """(B, L) ids [, (B, L, width) embeddings replacing the lookup] -> (B, width): the final-LN
    state at position L - 1, before ``head``."""
    h = embed_text(self, input_ids, inputs_embeds)
    h = self.final_layer_norm(self.layers(h))
    return h[:, -1]


class SigLIP(nnx.Module):
  """SigLIP with transformers' parameter layout; implements the family interface
  (``glajax.models.family``; the module docstring says what its "projection" is)."""

  def __init__(self, config: SiglipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.vision_model = VisionTransformer(config.vision, dtype=dtype, param_dtype=param_dtype,
                                          rngs=rngs)
    self.text_model = TextTransformer(config.text, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))
    self.logit_bias = nnx.Param(jnp.asarray(config.logit_bias_init_value, param_dtype))

  @property
  def spec(self) -> ModelSpec:
    text = self.config.text
    return ModelSpec("siglip", self.config.vision.image_size, MEAN, STD, has_text=True,
                     loss="sigmoid", context_length=text.max_position_embeddings,
                     vocab_size=text.vocab_size, eos_token_id=None)

  @staticmethod
  def param_groups() -> dict[str, str]:
    """The parameter groups recipes name: the image tower with its MAP head, the text tower
    with its head, and ``scale``: the logit scale t and bias b."""
    return {"image": r"^vision_model/", "text": r"^text_model/",
            "scale": r"^logit_(scale|bias)$"}

  def image_features(self, images):
    """(B, H, W, 3) -> (B, width): the MAP attention's pooled feature before W_o."""
    vision = self.vision_model
    return vision.head.pool(vision.tokens(images)).astype(jnp.float32)

  def image_projection_kernel(self):
    """The (width, D) kernel W_o of the MAP head's output projection (CaRot's W_v)."""
    return self.vision_model.head.out_proj.kernel[...]

  def text_projection_kernel(self):
    """The (text width, D) kernel of the text tower's head."""
    return self.text_model.head.kernel[...]

  def encode_image(self, images):
    """(B, H, W, 3) normalised to [-1, 1] -> (B, D) image embeddings, not normalised."""
    return self.vision_model(images).astype(jnp.float32)

  def embed_tokens(self, input_ids):
    """(B, L) ids -> (B, L, width) token embeddings (before position embeddings)."""
    return self.text_model.token_embedding(input_ids)

  def encode_text(self, input_ids, inputs_embeds=None):
    """(B, L) int ids padded to the context length -> (B, D) text embeddings, not normalised;
    ``inputs_embeds`` (B, L, width), if given, replaces the token lookup."""
    return self.text_model.head(self.text_model(input_ids, inputs_embeds)).astype(jnp.float32)

  def __call__(self, images, input_ids):
    """logits_per_image (B_img, B_txt) = exp(t) · cos(image_i, text_j) + b; σ of them are
    SigLIP's pairwise match probabilities."""
    image = l2_normalise(self.encode_image(images))
    text = l2_normalise(self.encode_text(input_ids))
    scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))
    return scale * image @ text.T + self.logit_bias[...].astype(jnp.float32)


def interpolate_position_embedding(model: SigLIP, image_size: int) -> SigLIP:
  """Sets ``model`` (in place, and returns it) to take ``image_size`` px images: its position
  embeddings resized bicubically, no class token (``layers.resize_vision_positions``)."""
  return resize_vision_positions(model, image_size, prefix=0)


def init_siglip(config: SiglipConfig, *, seed: int = 0, dtype=jnp.float32,
                param_dtype=jnp.float32) -> SigLIP:
  """A randomly initialised ``SigLIP(config, rngs=nnx.Rngs(seed))`` (``layers.init_compiled``)."""
  return init_compiled(lambda: SigLIP(config, dtype=dtype, param_dtype=param_dtype,
                                      rngs=nnx.Rngs(seed)))

"""Flax NNX CLIP (Radford et al., 2021): a ViT or ModifiedResNet image tower, the causal text
tower, projections.

The ViT tree mirrors transformers' ``CLIPModel`` (``params_hf`` is a short table); the ResNet
tree mirrors OpenAI's ``clip/model.py`` ``ModifiedResNet`` (``params_open_clip``). Images are
NHWC float32, normalised with CLIP's mean and std.

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
from glajax.models.layers import (ADAPTER_SCALE_LEARNABLE, BatchNorm, Blocks, attend,
                                  check_adapter_scale, check_images, check_remat, check_sizes,
                                  check_token_ids, check_tower, l2_normalise, normal,
                                  positive_size, resize_position_embedding, run_blocks)

MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's normalisation (clip/clip.py)
STD = (0.26862954, 0.26130258, 0.27577711)

@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The ViT image tower. ``adapter_dim > 0`` adds an AdaptFormer adapter to every block;
  ``adapter_scale`` is ``"learnable"`` (LIFT's scalar, initialised to 1) or a fixed float.
  ``remat`` rematerialises each block in the backward pass (``layers.REMAT_POLICIES``: "none",
  "block", "dots"); ``attention`` picks the kernel
  (``attend``: ``"auto"``, ``"xla"`` or ``"cudnn"``); ``unroll`` is the blocks run per scan
  iteration (``layers.Blocks``; the depth or more: no loop). None changes the function computed."""
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
  remat: str = "none"
  attention: str = "auto"
  unroll: int = 1

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
  ``remat``, ``attention`` and ``unroll`` as in ``CLIPVisionConfig``."""
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
  remat: str = "none"
  attention: str = "auto"
  unroll: int = 1

  def __post_init__(self):
    check_sizes(self, "text", ("vocab_size", "max_position_embeddings"))
    check_tower(self, "text")


@dataclasses.dataclass(frozen=True)
class CLIPResNetConfig:
  """OpenAI's ModifiedResNet image tower (openai/CLIP ``clip/model.py``; open_clip
  ``modified_resnet.py``): a 3-convolution stem, four stages of ``layers`` Bottleneck blocks
  (widths ``width``·(1, 2, 4, 8), ×4 at each block's output), attention pooling over the final
  grid with ``num_attention_heads`` heads (OpenAI's ``build_model``: width·32/64) and a linear
  map to the embedding.

  The stem halves the image, a 2×2 average pool and the three strided stages halve it again each
  (flooring), so an even ``image_size`` >= 32 leaves an ``image_size // 32`` grid, the attention
  pool's position table. BatchNorm (eps ``batch_norm_eps``, ``layers.BatchNorm``) uses its
  running statistics unless the model is in train mode; ``remat`` rematerialises each block in
  the backward pass (``layers.REMAT_POLICIES``; the function is the same).
  """
  image_size: int = 224
  layers: tuple[int, int, int, int] = (3, 4, 6, 3)
  width: int = 64
  num_attention_heads: int = 32
  batch_norm_eps: float = 1e-5
  remat: str = "none"

  def __post_init__(self):
    if not isinstance(self.layers, (tuple, list)) or len(self.layers) != 4:
      raise bad_argument("vision.layers", "four block counts (one per stage)", repr(self.layers),
                         ConfigError)
    object.__setattr__(self, "layers", tuple(self.layers))
    for i, count in enumerate(self.layers):
      positive_size(f"vision.layers[{i}]", count)
    for field in ("image_size", "width", "num_attention_heads"):
      positive_size(f"vision.{field}", getattr(self, field))
    check_remat("vision.remat", self.remat)
    if self.image_size < 32 or self.image_size % 2:
      raise bad_argument("vision.image_size", "an even size >= 32 (the ResNet's stride is 32)",
                         self.image_size, ConfigError)
    if self.width % 2:
      raise bad_argument("vision.width", "an even width (the stem's first convolutions have "
                         "width / 2 channels)", self.width, ConfigError)
    if self.embed_dim % self.num_attention_heads:
      raise bad_argument("vision.num_attention_heads", f"a divisor of the pooled width "
                         f"{self.embed_dim} (= 32·width)", self.num_attention_heads, ConfigError)

  @property
  def embed_dim(self) -> int:
    """The width of the final feature map, 32·width (attention pooling's width)."""
    return self.width * 32

  @property
  def grid_size(self) -> int:
    return self.image_size // 32



_VISION_HF_KEYS = ("image_size", "patch_size", "hidden_size", "intermediate_size",
                   "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps")
_TEXT_HF_KEYS = ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps",
                 "bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers (a ViT or a ModifiedResNet image tower), the shared embedding width and the
  initial log-scale."""
  vision: CLIPVisionConfig | CLIPResNetConfig = CLIPVisionConfig()
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
    if config.get("model_type", "clip") != "clip" or not (
        "model_type" in config or ("vision_config" in config and "text_config" in config)):
      raise bad_argument("config", "a CLIP config (model_type 'clip')",
                         f"model_type {config.get('model_type')!r}", ConfigError)
    vision = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
    text = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
    image_size = vision.get("image_size", 224)
    patch_size = vision.get("patch_size", 32)
    vision = {k: vision[k] for k in _VISION_HF_KEYS if k in vision}
    vision["image_size"] = square_size(image_size, "vision_config.image_size")
    vision["patch_size"] = square_size(patch_size, "vision_config.patch_size")
    text = {k: text[k] for k in _TEXT_HF_KEYS if k in text and text[k] is not None}
    if isinstance(text.get("eos_token_id"), (list, tuple)):
      text["eos_token_id"] = text["eos_token_id"][0]
    return cls(vision=CLIPVisionConfig(**vision), text=CLIPTextConfig(**text),
               projection_dim=config.get("projection_dim", 512),
               logit_scale_init_value=config.get("logit_scale_init_value", 2.6592))

  @property
  def resnet(self) -> bool:
    """Whether the image tower is a ModifiedResNet."""
    return isinstance(self.vision, CLIPResNetConfig)

  def to_hf(self) -> dict[str, Any]:
    """A transformers ``config.json`` dict (``model_type: "clip"``); adapters are not in it."""
    if self.resnet:
      raise bad_argument("config", "a ViT CLIP (transformers has no ResNet CLIP; glajax writes "
                         "ResNet CLIPs in open_clip's format)", "a ModifiedResNet image tower",
                         ConfigError)
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
  def rn50(cls) -> CLIPConfig:
    """OpenAI CLIP RN50 (open_clip ``model_configs/RN50.json``)."""
    return cls(vision=CLIPResNetConfig(), projection_dim=1024)

  @classmethod
  def rn101(cls) -> CLIPConfig:
    """OpenAI CLIP RN101."""
    return cls(vision=CLIPResNetConfig(layers=(3, 4, 23, 3)))

  @classmethod
  def rn50x4(cls) -> CLIPConfig:
    """OpenAI CLIP RN50x4 (288 px)."""
    return cls._scaled_resnet(288, (4, 6, 10, 6), 80, text_width=640, text_heads=10)

  @classmethod
  def rn50x16(cls) -> CLIPConfig:
    """OpenAI CLIP RN50x16 (384 px)."""
    return cls._scaled_resnet(384, (6, 8, 18, 8), 96, text_width=768, text_heads=12)

  @classmethod
  def rn50x64(cls) -> CLIPConfig:
    """OpenAI CLIP RN50x64 (448 px)."""
    return cls._scaled_resnet(448, (3, 15, 36, 10), 128, text_width=1024, text_heads=16)

  @classmethod
  def _scaled_resnet(cls, image_size, layers, width, *, text_width, text_heads) -> CLIPConfig:
    """OpenAI's scaled ResNets: attention-pool heads width·32/64, text width = embedding width."""
    return cls(vision=CLIPResNetConfig(image_size=image_size, layers=layers, width=width,
                                       num_attention_heads=width // 2),
               text=CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width,
                                   num_attention_heads=text_heads),
               projection_dim=text_width)

  @classmethod
  def tiny(cls, resnet: bool = False, **overrides) -> CLIPConfig:
    """A few-k-parameter CLIP (plus the 49408 x 32 token table) for tests and demos; with
    ``resnet`` a ModifiedResNet image tower (one block per stage, width 8, 4 pooling heads).

    ``overrides`` name a field of ``CLIPConfig`` (``projection_dim=8``), a field of one tower with
    its prefix (``vision_image_size=30``, ``text_vocab_size=100``) or, when only one tower has it,
    without (``image_size=30``, ``adapter_dim=4``, ``vocab_size=100``).
    """
    vision_class = CLIPResNetConfig if resnet else CLIPVisionConfig
    vision = (dict(image_size=32, layers=(1, 1, 1, 1), width=8, num_attention_heads=4) if resnet
              else dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4))
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    top = dict(projection_dim=16)
    vision_fields = {f.name for f in dataclasses.fields(vision_class)}
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
    return cls(vision=vision_class(**vision), text=CLIPTextConfig(**text), **top)


def square_size(size, name: str) -> int:
  """An image or patch size given as an int or an [h, w] pair (a config's ``name``), as an int;
  a non-square pair raises."""
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise bad_argument(name, "a square size", size, ConfigError)
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
    self.layers = Blocks(cfg, causal=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
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
    h = self.layers(self.pre_layernorm(self.embed(images)))
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
    self.layers = Blocks(cfg, causal=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
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
    h = self.final_layer_norm(self.layers(h))
    return h[jnp.arange(batch), eos_positions(input_ids, cfg.eos_token_id)]


def _conv(cin: int, cout: int, size: int, *, stride: int = 1, dtype, param_dtype, rngs):
  """A bias-free ``size``×``size`` convolution padded by size // 2 (torch's
  ``Conv2d(padding=k // 2)``), He-normal initialised."""
  pad = size // 2
  return nnx.Conv(cin, cout, kernel_size=(size, size), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _batch_norm(features: int, eps: float, *, zero: bool = False, dtype, param_dtype, rngs):
  """torch ``BatchNorm2d`` (``layers.BatchNorm``): running statistics (``nnx.BatchStat``) in
  eval mode, the default; ``.train()`` switches to batch statistics and updates the running
  ones as torch does. ``zero``: scale initialised to 0 (OpenAI's bn3)."""
  return BatchNorm(features, epsilon=eps,
                   scale_init=jax.nn.initializers.zeros if zero else jax.nn.initializers.ones,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _avg_pool(x, size: int):
  """torch ``AvgPool2d(size)`` on NHWC: non-overlapping windows, the remainder dropped."""
  return nnx.avg_pool(x, (size, size), strides=(size, size), padding="VALID") if size > 1 else x


class Downsample(nnx.Module):
  """A Bottleneck's shortcut: ``AvgPool2d(stride)``, 1×1 convolution, BatchNorm."""

  def __init__(self, cin: int, cout: int, stride: int, eps: float, *, dtype, param_dtype, rngs):
    self.stride = stride
    self.conv = _conv(cin, cout, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.bn = _batch_norm(cout, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(_avg_pool(x, self.stride)))


class Bottleneck(nnx.Module):
  """OpenAI's anti-aliased Bottleneck (``clip/model.py``): every convolution has stride 1 and a
  strided block average-pools after its 3×3 convolution (and before its shortcut's 1×1):

    y = relu(bn3(conv3(pool_s(relu(bn2(conv2(relu(bn1(conv1(x))))))))) + shortcut(x))
  """

  def __init__(self, cin: int, planes: int, stride: int, eps: float, *, dtype, param_dtype,
               rngs):
    options = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stride = stride
    self.conv1, self.bn1 = _conv(cin, planes, 1, **options), _batch_norm(planes, eps, **options)
    self.conv2, self.bn2 = _conv(planes, planes, 3, **options), _batch_norm(planes, eps, **options)
    self.conv3 = _conv(planes, 4 * planes, 1, **options)
    self.bn3 = _batch_norm(4 * planes, eps, zero=True, **options)
    self.downsample = (Downsample(cin, 4 * planes, stride, eps, **options)
                       if stride > 1 or cin != 4 * planes else None)

  def __call__(self, x):
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = _avg_pool(jax.nn.relu(self.bn2(self.conv2(out))), self.stride)
    out = self.bn3(self.conv3(out))
    return jax.nn.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nnx.Module):
  """OpenAI's attention pooling (``clip/model.py`` ``AttentionPool2d``): the mean of the grid's
  tokens is prepended, position embeddings added, and that mean token alone queries all
  tokens (multi-head, 1/√d_head scaling); ``c_proj`` maps the result to the embedding.

    h = [mean(x); x] + P,   pool(x) = MHA(q = W_q h_0 + b_q, k = W_k h + b_k, v = W_v h + b_v)
  """

  def __init__(self, grid: int, width: int, heads: int, output_dim: int, *, dtype, param_dtype,
               rngs):
    self.positional_embedding = nnx.Param(
        normal(width**-0.5)(rngs.params(), (grid * grid + 1, width), param_dtype))
    linear = lambda out: nnx.Linear(width, out, kernel_init=normal(width**-0.5),
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = linear(width), linear(width), linear(width)
    self.c_proj = linear(output_dim)
    self.num_heads = heads

  def pool(self, x):
    """(B, H, W, C) -> (B, C): the attention output, before ``c_proj``."""
    batch, height, width, channels = x.shape
    tokens = x.reshape(batch, height * width, channels)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    tokens = tokens + self.positional_embedding[...].astype(tokens.dtype)
    heads = lambda y: y.reshape(batch, y.shape[1], self.num_heads, channels // self.num_heads)
    out = attend(heads(self.q_proj(tokens[:, :1])), heads(self.k_proj(tokens)),
                 heads(self.v_proj(tokens)), causal=False, implementation="xla")
    return out.reshape(batch, channels)

  def __call__(self, x):
    return self.c_proj(self.pool(x))


class ModifiedResNet(nnx.Module):
  """OpenAI's ModifiedResNet (``clip/model.py``): a 3-convolution stem (a stride-2 3×3 and two
  3×3, each with BatchNorm and ReLU) and a 2×2 average pool, four stages of ``Bottleneck``s (the
  first of stages 2-4 strided), ``AttentionPool2d`` to ``output_dim``."""

  def __init__(self, cfg: CLIPResNetConfig, output_dim: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    options = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width, eps = cfg.width, cfg.batch_norm_eps
    self.conv1 = _conv(3, width // 2, 3, stride=2, **options)
    self.bn1 = _batch_norm(width // 2, eps, **options)
    self.conv2, self.bn2 = _conv(width // 2, width // 2, 3, **options), _batch_norm(
        width // 2, eps, **options)
    self.conv3, self.bn3 = _conv(width // 2, width, 3, **options), _batch_norm(width, eps,
                                                                                **options)
    cin = width
    stages = []
    for stage, blocks in enumerate(cfg.layers):
      planes = width * 2**stage
      stride = 1 if stage == 0 else 2
      stages.append(nnx.List([Bottleneck(cin if b == 0 else 4 * planes, planes,
                                         stride if b == 0 else 1, eps, **options)
                              for b in range(blocks)]))
      cin = 4 * planes
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.attnpool = AttentionPool2d(cfg.grid_size, cfg.embed_dim, cfg.num_attention_heads,
                                    output_dim, **options)

  def stem(self, images):
    """(B, H, W, 3) -> (B, H/4, W/4, width)."""
    x = jax.nn.relu(self.bn1(self.conv1(images.astype(self.dtype))))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    x = jax.nn.relu(self.bn3(self.conv3(x)))
    return _avg_pool(x, 2)

  def trunk(self, images):
    """(B, H, W, 3) -> (B, H // 32, W // 32, 32·width): the stem and the four stages."""
    check_images(images, self.config.image_size)
    x = self.stem(images)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = run_blocks(stage, x, self.config.remat)
    return x

  def features(self, images):
    """(B, H, W, 3) -> (B, 32·width): attention-pooled, before ``c_proj``."""
    return self.attnpool.pool(self.trunk(images))

  def __call__(self, images):
    """(B, H, W, 3) -> (B, output_dim): OpenAI's ``visual(images)``."""
    return self.attnpool(self.trunk(images))


class CLIP(nnx.Module):
  """CLIP: with a ViT, transformers' parameter layout and random init (``_init_weights``); with a
  ModifiedResNet, OpenAI's (``vision_model`` holds its attention pool's ``c_proj``, the visual
  projection, so there is no ``visual_projection``). Implements the family interface
  (``glajax.models.family``).

  A ResNet's BatchNorm uses its running statistics (eval mode, the default; ``model.train()``
  switches to batch statistics and updates the running ones, as the training engine does with
  ``train.batch_stats="train"``)."""

  logit_bias = None  # CLIP's logits have no bias (SigLIP's do)

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    options = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    projection = lambda width: nnx.Linear(width, config.projection_dim, use_bias=False,
                                          kernel_init=normal(width**-0.5), **options)
    self.vision_model = (ModifiedResNet(config.vision, config.projection_dim, **options)
                         if config.resnet else VisionTransformer(config.vision, **options))
    self.text_model = TextTransformer(config.text, **options)
    self.visual_projection = None if config.resnet else projection(config.vision.hidden_size)
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
    """(B, H, W, 3) -> (B, W): the pooled feature before the projection: a ViT's post-LN CLS
    token; a ResNet's attention-pool output before ``c_proj`` (W = 32·width)."""
    if self.config.resnet:
      return self.vision_model.features(images).astype(jnp.float32)
    return self.vision_model(images).astype(jnp.float32)

  def image_projection_kernel(self):
    """The (W, D) kernel W_v of the visual projection: a ViT's ``visual_projection`` (OpenAI's
    ``visual.proj``); a ResNet's attention-pool ``c_proj`` kernel (``c_proj.weight.T``, the W_v
    of CaRot's ``carot_loss.py`` for ResNets; ``c_proj`` also adds a bias)."""
    if self.config.resnet:
      return self.vision_model.attnpool.c_proj.kernel[...]
    return self.visual_projection.kernel[...]

  def text_projection_kernel(self):
    """The (text width, D) kernel W_t of the text projection."""
    return self.text_projection.kernel[...]

  def encode_image(self, images):
    """(B, H, W, 3) CLIP-normalised -> (B, D) projected image embeddings, not normalised."""
    if self.config.resnet:
      return self.vision_model(images).astype(jnp.float32)
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

  The position embeddings of the grid (a ViT's patches, a ResNet's attention pool) are resized
  bicubically (``resize_position_embedding``); the class / mean token's row is kept.
  """
  vision, resnet = model.config.vision, model.config.resnet
  integral = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
  if resnet and not (integral and image_size >= 32 and image_size % 2 == 0):
    raise bad_argument("image_size", "an even size >= 32 (the ResNet's stride is 32)",
                       repr(image_size))
  if not resnet and not (integral and image_size >= 1 and image_size % vision.patch_size == 0):
    raise bad_argument("image_size", f"a positive multiple of the patch size {vision.patch_size}",
                       repr(image_size))
  new_vision = dataclasses.replace(vision, image_size=image_size)
  if resnet:
    table = model.vision_model.attnpool.positional_embedding
    table.set_value(resize_position_embedding(table[...], new_vision.grid_size))
  else:
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

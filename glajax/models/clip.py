"""Flax NNX CLIP (Radford et al., 2021): ViT image tower, causal text tower, projections.

The module tree mirrors transformers' ``CLIPModel`` so that the Hugging Face conversion
(``glajax.models.hf``) is a short table. Images are NHWC float32, CLIP-normalised.

  logits_per_image = exp(logit_scale) * normalise(encode_image(x)) @ normalise(encode_text(t))^T
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glajax.errors import ConfigError, bad_argument
from glajax.methods import _checks

ADAPTER_SCALE_LEARNABLE = "learnable"   # LIFT's ``adaptformer_scale = "learnable"``

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _check_adapter_scale(scale) -> None:
  if scale != ADAPTER_SCALE_LEARNABLE and (isinstance(scale, bool)
                                           or not isinstance(scale, numbers.Real)):
    raise bad_argument("vision.adapter_scale", f"{ADAPTER_SCALE_LEARNABLE!r} or a float",
                       repr(scale), ConfigError)


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
    _check_adapter_scale(self.adapter_scale)
    _check_sizes(self, "vision", ("image_size", "patch_size"))
    _check_tower(self, "vision")
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
    _check_sizes(self, "text", ("vocab_size", "max_position_embeddings"))
    _check_tower(self, "text")


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def _check_attention(cfg, name: str) -> None:
  if cfg.attention not in ATTENTION_IMPLEMENTATIONS:
    raise bad_argument(f"{name}.attention", f"one of {ATTENTION_IMPLEMENTATIONS}",
                       repr(cfg.attention), ConfigError)


def _check_sizes(cfg, name: str, fields) -> None:
  """Every size of a tower (and ``fields``) is an int >= 1: a 0 or negative size would build a
  model with empty or broken tensors instead of failing."""
  for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                *fields):
    _positive_size(f"{name}.{field}", getattr(cfg, field))


def _positive_size(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise bad_argument(name, "an int >= 1", f"{value!r} ({type(value).__name__})", ConfigError)


def _check_tower(cfg, name: str) -> None:
  _check_attention(cfg, name)
  if cfg.hidden_act not in _ACTIVATIONS:
    raise bad_argument(f"{name}.hidden_act", f"one of {sorted(_ACTIVATIONS)}", cfg.hidden_act,
                       ConfigError)
  if cfg.hidden_size % cfg.num_attention_heads:
    raise bad_argument(f"{name}.hidden_size",
                       f"a multiple of num_attention_heads {cfg.num_attention_heads}",
                       cfg.hidden_size, ConfigError)


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
    _positive_size("projection_dim", self.projection_dim)

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


def _normal(std: float):
  return jax.nn.initializers.normal(stddev=std)


def even_length_attention(q, k, v, *, causal: bool, implementation: str):
  """``jax.nn.dot_product_attention`` with an odd length L padded to L + 1 and sliced back.

  JAX 0.11's cuDNN path refuses odd lengths when differentiated ("Unsupported sequence length Q
  197, KV 197": its check counts the placeholder bias it passes), so ViT's 197 tokens train only
  padded. The padded key is masked: by ``key_value_seq_lengths`` = L, or, when causal, by the
  causal mask itself (no real query sees the last position); the padded query row is dropped."""
  length = q.shape[1]
  if length % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  widths = ((0, 0), (0, 1), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  lengths = None if causal else jnp.full((q.shape[0],), length, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :length]


def attend(q, k, v, *, causal: bool, implementation: str = "auto"):
  """softmax(q kᵀ / √d_head [+ causal mask]) v for (B, L, H, d_head) q, k, v.

  ``"xla"``: the scores in float32 (``preferred_element_type``), softmax in float32, weights
  cast back to v's dtype. ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``,
  cuDNN's fused flash attention (no (B, H, L, L) array in memory; float32 softmax inside).
  ``"auto"``: cuDNN on a GPU backend for bfloat16/float16 compute when JAX accepts the shapes,
  else XLA; float32 models thus keep the exact XLA path that the transformers parity tests check.
  """
  use_cudnn = implementation == "cudnn" or (
      implementation == "auto" and jax.default_backend() == "gpu"
      and jnp.dtype(q.dtype) in (jnp.bfloat16, jnp.float16))
  if use_cudnn:
    try:
      return even_length_attention(q, k, v, causal=causal, implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as e:
      if implementation == "cudnn":   # asked for by name: say why it cannot run here
        raise bad_argument("attention", "'auto' or 'xla' here: cuDNN flash attention needs a "
                           "CUDA GPU, bfloat16/float16 and a supported head size",
                           f"'cudnn' with {jnp.dtype(q.dtype).name} q of shape {q.shape} on "
                           f"{jax.default_backend()} ({e})", ConfigError) from None
      warnings.warn(f"attention 'auto': cuDNN flash attention refused q of shape {q.shape} "
                    f"({e}); using XLA attention, which is slower", stacklevel=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores * q.shape[-1]**-0.5
  if causal:
    length = q.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class _Attention(nnx.Module):
  """Multi-head self-attention (``attend``) between the q/k/v and out projections.

  q, k and v come from one matmul with the three kernels concatenated, [q k v] = x [W_q W_k W_v]
  + [b_q b_k b_v] (one (d, 3d) GEMM forward and one for the input gradient, instead of three and
  a sum); the parameters stay transformers' separate ``q_proj``/``k_proj``/``v_proj``."""

  def __init__(self, cfg, *, causal: bool, dtype, param_dtype, rngs: nnx.Rngs):
    width, layers = cfg.hidden_size, cfg.num_hidden_layers
    in_std, out_std = width**-0.5 * (2 * layers)**-0.5, width**-0.5
    linear = lambda std: nnx.Linear(width, width, kernel_init=_normal(std), dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = linear(in_std), linear(in_std), linear(in_std)
    self.out_proj = linear(out_std)
    self.num_heads = cfg.num_attention_heads
    self.causal = causal
    self.implementation = cfg.attention

  def _qkv(self, x):
    """(B, L, d) -> q, k, v, each (B, L, d), from one matmul in the compute dtype."""
    projections = (self.q_proj, self.k_proj, self.v_proj)
    dtype = self.q_proj.dtype or x.dtype
    kernel = jnp.concatenate([p.kernel[...] for p in projections], axis=1).astype(dtype)
    bias = jnp.concatenate([p.bias[...] for p in projections]).astype(dtype)
    return jnp.split(jnp.dot(x.astype(dtype), kernel) + bias, 3, axis=-1)

  def __call__(self, x):
    batch, length, width = x.shape
    split = lambda y: y.reshape(batch, length, self.num_heads, width // self.num_heads)
    q, k, v = map(split, self._qkv(x))
    out = attend(q, k, v, causal=self.causal, implementation=self.implementation)
    return self.out_proj(out.reshape(batch, length, width))


class _MLP(nnx.Module):
  """fc2(act(fc1(x)))."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    width, layers = cfg.hidden_size, cfg.num_hidden_layers
    self.fc1 = nnx.Linear(width, cfg.intermediate_size, kernel_init=_normal((2 * width)**-0.5),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.intermediate_size, width,
                          kernel_init=_normal(width**-0.5 * (2 * layers)**-0.5),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = cfg.hidden_act

  def __call__(self, x):
    return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class _Adapter(nnx.Module):
  """LIFT's AdaptFormer branch (shijxcs/LIFT ``models/peft_modules.py`` ``AdaptFormer``):
  s · up(relu(down(LN_a(h)))) on the residual stream h.

  LN_a is the adapter's own LayerNorm (weight 1, bias 0, eps 1e-5 as ``torch.nn.LayerNorm``);
  ``down`` is ``kaiming_normal_(a=√5)`` (normal, variance 1/(3·fan_in)) with zero bias; ``up`` is
  zero, so the branch is 0 at init; s is a learnable (1,) scale initialised to 1 when ``scale``
  is ``"learnable"``, else the fixed float ``scale``.
  """

  def __init__(self, width: int, bottleneck: int, *, scale=ADAPTER_SCALE_LEARNABLE, dtype,
               param_dtype, rngs: nnx.Rngs):
    _check_adapter_scale(scale)
    self.ln = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down = nnx.Linear(width, bottleneck, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           kernel_init=jax.nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                                           "normal"))
    self.up = nnx.Linear(bottleneck, width, kernel_init=jax.nn.initializers.zeros, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    learnable = scale == ADAPTER_SCALE_LEARNABLE
    self.scale = nnx.Param(jnp.ones((1,), param_dtype)) if learnable else None
    self.fixed_scale = None if learnable else float(scale)

  def __call__(self, h):
    out = self.up(jax.nn.relu(self.down(self.ln(h))))
    scale = self.fixed_scale if self.scale is None else self.scale[...].astype(out.dtype)
    return out * scale


class _Block(nnx.Module):
  """Pre-LN transformer block; with an adapter (LIFT ``models/peft_vit.py``): h + mlp(ln2(h)) +
  adapter(h), h the residual stream after attention (see ``_Adapter``)."""

  def __init__(self, cfg, *, causal: bool, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = norm()
    self.self_attn = _Attention(cfg, causal=causal, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    self.layer_norm2 = norm()
    self.mlp = _MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    adapter_dim = getattr(cfg, "adapter_dim", 0)
    self.adapter = _Adapter(cfg.hidden_size, adapter_dim,
                            scale=getattr(cfg, "adapter_scale", ADAPTER_SCALE_LEARNABLE),
                            dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs) if adapter_dim else None

  def __call__(self, h):
    h = h + self.self_attn(self.layer_norm1(h))
    out = h + self.mlp(self.layer_norm2(h))
    if self.adapter is not None:
      out = out + self.adapter(h)
    return out


def _run_blocks(layers, h, remat: bool):
  for layer in layers:
    h = nnx.remat(lambda block, x: block(x))(layer, h) if remat else layer(h)
  return h


class VisionTransformer(nnx.Module):
  """CLIP's ViT: patch conv, class token, position embeddings, pre-LN, blocks, post-LN on CLS."""

  def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    width = cfg.hidden_size
    self.class_embedding = nnx.Param(_normal(width**-0.5)(rngs.params(), (width,), param_dtype))
    self.patch_embedding = nnx.Conv(3, width, kernel_size=(cfg.patch_size, cfg.patch_size),
                                    strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                                    use_bias=False, kernel_init=_normal(0.02), dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(cfg.grid_size**2 + 1, width, embedding_init=_normal(0.02),
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = lambda: nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.pre_layernorm = norm()
    self.layers = nnx.List([_Block(cfg, causal=False, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = norm()

  def embed(self, images):
    """(B, H, W, 3) -> (B, 1 + grid^2, width): [CLS; patches] + position embeddings."""
    _check_images(images, self.config.image_size)
    patches = self.patch_embedding(images.astype(self.dtype))
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype),
                           (patches.shape[0], 1, patches.shape[-1]))
    tokens = jnp.concatenate([cls, patches], axis=1)
    return tokens + self.position_embedding.embedding[...].astype(tokens.dtype)

  def __call__(self, images):
    """(B, H, W, 3) -> (B, width): post-LN CLS feature (HF's ``pooler_output``)."""
    h = self.pre_layernorm(self.embed(images))
    h = _run_blocks(self.layers, h, self.config.remat)
    return self.post_layernorm(h[:, 0])


class TextTransformer(nnx.Module):
  """CLIP's causal text transformer; the feature is the final-LN state at the first EOS token."""

  def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    width = cfg.hidden_size
    embed = lambda n: nnx.Embed(n, width, embedding_init=_normal(0.02), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = embed(cfg.vocab_size)
    self.position_embedding = embed(cfg.max_position_embeddings)
    self.layers = nnx.List([_Block(cfg, causal=True, dtype=dtype, param_dtype=param_dtype,
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
    h = self.final_layer_norm(_run_blocks(self.layers, h, cfg.remat))
    return h[jnp.arange(batch), eos_positions(input_ids, cfg.eos_token_id)]


def check_token_ids(name: str, ids, vocab_size: int) -> None:
  """Raises when ``ids`` is concrete and holds an id outside [0, vocab_size): the embedding
  lookup would not fail but give NaN features (too large) or another token's row (negative)."""
  values = _checks.concrete(ids)
  if values is not None and values.size and (values.min() < 0 or values.max() >= vocab_size):
    raise bad_argument(name, f"token ids in [0, {vocab_size}) (the model's vocab_size)",
                       f"ids in [{values.min()}, {values.max()}]")


def _check_images(images, image_size: int) -> None:
  shape = tuple(images.shape)
  if len(shape) != 4:
    raise bad_argument("images", "a rank-4 (batch, height, width, 3) NHWC array",
                       f"shape {shape}")
  if shape[0] < 1:
    raise bad_argument("images", "a batch of at least one image", f"shape {shape}")
  if shape[-1] != 3:
    hint = " (channels-first NCHW? glajax takes NHWC)" if shape[1] == 3 else ""
    raise bad_argument("images", "NHWC with 3 channels last", f"shape {shape}{hint}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise bad_argument("images", "floating-point CLIP-normalised pixels", f"dtype {images.dtype}")
  if shape[1:3] != (image_size, image_size):
    raise bad_argument("images", f"{image_size}x{image_size} pixels (the model's image_size; "
                       "see interpolate_position_embedding)", f"shape {shape}")


class CLIP(nnx.Module):
  """CLIP with transformers' parameter layout; random init as transformers' ``_init_weights``."""

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.vision_model = VisionTransformer(config.vision, dtype=dtype, param_dtype=param_dtype,
                                          rngs=rngs)
    self.text_model = TextTransformer(config.text, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
    projection = lambda width: nnx.Linear(width, config.projection_dim, use_bias=False,
                                          kernel_init=_normal(width**-0.5), dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
    self.visual_projection = projection(config.vision.hidden_size)
    self.text_projection = projection(config.text.hidden_size)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

  def vision_features(self, images):
    """(B, H, W, 3) -> (B, vision width): pooled post-LN CLS feature, before the projection."""
    return self.vision_model(images).astype(jnp.float32)

  def encode_image(self, images):
    """(B, H, W, 3) CLIP-normalised -> (B, D) projected image embeddings, not normalised."""
    return self.visual_projection(self.vision_model(images)).astype(jnp.float32)

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


def l2_normalise(x):
  """x / max(‖x‖₂, 1e-12) over the last axis (``torch.nn.functional.normalize``); NumPy in,
  NumPy out, so initialisers can use it too. The one L2 normalisation of glajax."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def eos_positions(input_ids, eos_token_id: int):
  """Where the text tower pools: the first ``eos_token_id`` of each row (legacy configs with
  eos_token_id == 2: the largest id, as transformers does). NumPy in, NumPy out."""
  xp = np if isinstance(input_ids, np.ndarray) else jnp
  if eos_token_id == 2:
    return xp.argmax(input_ids, axis=-1)
  return xp.argmax(input_ids == eos_token_id, axis=-1)


def resize_position_embedding(table, new_grid: int):
  """(1 + g^2, D) -> (1 + new_grid^2, D): bicubic resize of the patch grid; CLS row kept."""
  num_patches = table.shape[0] - 1
  grid = math.isqrt(num_patches)
  if grid * grid != num_patches:
    raise bad_argument("table", "1 + a square number of rows", table.shape)
  patches = table[1:].reshape(grid, grid, table.shape[1])
  patches = jax.image.resize(patches.astype(jnp.float32), (new_grid, new_grid, table.shape[1]),
                             method="bicubic")
  return jnp.concatenate([table[:1], patches.reshape(-1, table.shape[1]).astype(table.dtype)])


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

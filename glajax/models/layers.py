"""Building blocks shared by the model families (CLIP, SigLIP): attention with its kernel
choice, the pre-LN block with LIFT's optional AdaptFormer adapter, a tower's blocks stacked and
scanned, BatchNorm with PyTorch's semantics, and the checks and small helpers every tower uses.

  block(h) = h' + mlp(ln2(h')) [+ adapter(h')],  h' = h + attn(ln1(h))
  tower(h) = block_{L-1}(… block_0(h))   (``Blocks``: one ``jax.lax.scan`` over stacked weights)
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glajax import parallel
from glajax.errors import ConfigError, bad_argument
from glajax.methods import _checks
from glajax.schema import Field

ADAPTER_SCALE_LEARNABLE = "learnable"   # LIFT's ``adaptformer_scale = "learnable"``

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def check_adapter_scale(scale) -> None:
  if scale != ADAPTER_SCALE_LEARNABLE and (isinstance(scale, bool)
                                           or not isinstance(scale, numbers.Real)):
    raise bad_argument("vision.adapter_scale", f"{ADAPTER_SCALE_LEARNABLE!r} or a float",
                       repr(scale), ConfigError)



ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def check_attention(cfg, name: str) -> None:
  if cfg.attention not in ATTENTION_IMPLEMENTATIONS:
    raise bad_argument(f"{name}.attention", f"one of {ATTENTION_IMPLEMENTATIONS}",
                       repr(cfg.attention), ConfigError)


def check_sizes(cfg, name: str, fields) -> None:
  """Every size of a tower (and ``fields``) is an int >= 1: a 0 or negative size would build a
  model with empty or broken tensors instead of failing."""
  for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                *fields):
    positive_size(f"{name}.{field}", getattr(cfg, field))


def positive_size(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise bad_argument(name, "an int >= 1", f"{value!r} ({type(value).__name__})", ConfigError)


def check_tower(cfg, name: str) -> None:
  check_attention(cfg, name)
  check_remat(f"{name}.remat", cfg.remat)
  positive_size(f"{name}.unroll", cfg.unroll)
  if cfg.hidden_act not in ACTIVATIONS:
    raise bad_argument(f"{name}.hidden_act", f"one of {sorted(ACTIVATIONS)}", cfg.hidden_act,
                       ConfigError)
  if cfg.hidden_size % cfg.num_attention_heads:
    raise bad_argument(f"{name}.hidden_size",
                       f"a multiple of num_attention_heads {cfg.num_attention_heads}",
                       cfg.hidden_size, ConfigError)


def normal(std: float):
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

  ``"xla"``: the scores in float32 (``preferred_element_type``; float64 for float64 compute),
  softmax in that precision, weights cast back to v's dtype. ``"cudnn"``:
  ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash attention (no
  (B, H, L, L) array in memory; float32 softmax inside).
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
  precision = jnp.promote_types(q.dtype, jnp.float32)   # float64 compute keeps float64
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=precision)
  scores = scores * q.shape[-1]**-0.5
  if causal:
    length = q.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(mask, scores, jnp.finfo(precision).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Attention(nnx.Module):
  """Multi-head self-attention (``attend``) between the q/k/v and out projections.

  q, k and v come from one matmul with the three kernels concatenated, [q k v] = x [W_q W_k W_v]
  + [b_q b_k b_v] (one (d, 3d) GEMM forward and one for the input gradient, instead of three and
  a sum); the parameters stay transformers' separate ``q_proj``/``k_proj``/``v_proj``."""

  def __init__(self, cfg, *, causal: bool, dtype, param_dtype, rngs: nnx.Rngs):
    width, layers = cfg.hidden_size, cfg.num_hidden_layers
    in_std, out_std = width**-0.5 * (2 * layers)**-0.5, width**-0.5
    linear = lambda std: nnx.Linear(width, width, kernel_init=normal(std), dtype=dtype,
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


class MLP(nnx.Module):
  """fc2(act(fc1(x)))."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    width, layers = cfg.hidden_size, cfg.num_hidden_layers
    self.fc1 = nnx.Linear(width, cfg.intermediate_size, kernel_init=normal((2 * width)**-0.5),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.intermediate_size, width,
                          kernel_init=normal(width**-0.5 * (2 * layers)**-0.5),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = cfg.hidden_act

  def __call__(self, x):
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class Adapter(nnx.Module):
  """LIFT's AdaptFormer branch (shijxcs/LIFT ``models/peft_modules.py`` ``AdaptFormer``):
  s · up(relu(down(LN_a(h)))) on the residual stream h.

  LN_a is the adapter's own LayerNorm (weight 1, bias 0, eps 1e-5 as ``torch.nn.LayerNorm``);
  ``down`` is ``kaiming_normal_(a=√5)`` (normal, variance 1/(3·fan_in)) with zero bias; ``up`` is
  zero, so the branch is 0 at init; s is a learnable (1,) scale initialised to 1 when ``scale``
  is ``"learnable"``, else the fixed float ``scale``.
  """

  def __init__(self, width: int, bottleneck: int, *, scale=ADAPTER_SCALE_LEARNABLE, dtype,
               param_dtype, rngs: nnx.Rngs):
    check_adapter_scale(scale)
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


class Block(nnx.Module):
  """Pre-LN transformer block; with an adapter (LIFT ``models/peft_vit.py``): h + mlp(ln2(h)) +
  adapter(h), h the residual stream after attention (see ``Adapter``)."""

  def __init__(self, cfg, *, causal: bool, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = norm()
    self.self_attn = Attention(cfg, causal=causal, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.layer_norm2 = norm()
    self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    adapter_dim = getattr(cfg, "adapter_dim", 0)
    self.adapter = Adapter(cfg.hidden_size, adapter_dim,
                           scale=getattr(cfg, "adapter_scale", ADAPTER_SCALE_LEARNABLE),
                           dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs) if adapter_dim else None

  def __call__(self, h):
    h = h + self.self_attn(self.layer_norm1(h))
    out = h + self.mlp(self.layer_norm2(h))
    if self.adapter is not None:
      out = out + self.adapter(h)
    return out


class BatchNorm(nnx.Module):
  """``torch.nn.BatchNorm2d`` over the last (channel) axis (``torch/nn/modules/batchnorm.py``,
  ``momentum`` as torch's, 0.1).

  Eval mode (``use_running_average``, the default; ``model.eval()``):
  y = (x − μ_run) / √(σ²_run + ε) · γ + β. Train mode (``model.train()``): the batch's mean μ_B
  and biased variance σ²_B normalise, and the running statistics move towards them with the
  variance unbiased, as torch does (Flax's ``nnx.BatchNorm`` keeps the biased one):
  μ_run ← (1 − m)·μ_run + m·μ_B, σ²_run ← (1 − m)·σ²_run + m·σ²_B·n/(n − 1), n the values
  per channel. Under ``jax.jit`` with a batch sharded over devices, μ_B and σ²_B are those of
  the global batch (SyncBatchNorm's statistics, whatever the device count). Statistics are
  ``nnx.BatchStat``s in float32 (float64 when ``param_dtype`` is); the normalisation runs in
  float32 (float64 when ``dtype`` is).
  """

  def __init__(self, channels: int, *, epsilon: float = 1e-5, momentum: float = 0.1,
               scale_init=jax.nn.initializers.ones, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # deterministic initialisers
    self.scale = nnx.Param(scale_init(None, (channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
    stat_dtype = jnp.promote_types(param_dtype, jnp.float32)
    self.mean = nnx.BatchStat(jnp.zeros((channels,), stat_dtype))
    self.var = nnx.BatchStat(jnp.ones((channels,), stat_dtype))
    self.epsilon, self.momentum, self.dtype = epsilon, momentum, dtype
    self.use_running_average = True

  def __call__(self, x):
    x = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    if self.use_running_average:
      mean, var = self.mean[...].astype(x.dtype), self.var[...].astype(x.dtype)
    else:
      axes = tuple(range(x.ndim - 1))
      mean = x.mean(axes)
      var = jnp.square(x - mean).mean(axes)
      n = math.prod(x.shape[:-1])
      m = self.momentum
      running = self.mean[...].dtype
      self.mean[...] = jax.lax.stop_gradient((1 - m) * self.mean[...] + m * mean).astype(running)
      self.var[...] = jax.lax.stop_gradient(
          (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))).astype(running)
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(x.dtype)
    return ((x - mean) * inv + self.bias[...].astype(x.dtype)).astype(self.dtype)


# ``remat``: what the backward pass keeps of each block's forward pass; the rest it recomputes
# from the block's input. "none": everything; "block": nothing but the input
# (``jax.checkpoint_policies.nothing_saveable``); "dots": also the outputs of the matmuls with
# the weights (``dots_with_no_batch_dims_saveable``: attention's batched score and value
# matmuls, the normalisations and activations are recomputed). A convolution is not a matmul:
# in a ResNet "dots" keeps what "block" keeps.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# A tower's run-time options: how it computes, not what (the same values and gradients up to
# float rounding). Every family's loader takes them by these names and defaults, every recipe's
# ``model`` section as ``model.<name>`` (its schema field here); exports and architecture
# comparisons leave them out (``without_run_options``). name -> (default, field).
RUN_OPTIONS = {
    "remat": ("none", Field("choice", choices=tuple(REMAT_POLICIES))),
    "attention": ("auto", Field("choice", choices=ATTENTION_IMPLEMENTATIONS)),
    "unroll": (1, Field("int", 1)),
}
RUN_DEFAULTS = {name: default for name, (default, _) in RUN_OPTIONS.items()}


def with_run_options(cfg, **options):
  """``cfg`` (a tower's config dataclass) with those of the ``RUN_OPTIONS`` in ``options`` that
  it has (a ResNet has ``remat`` alone) set to their values."""
  names = {f.name for f in dataclasses.fields(cfg)}
  return dataclasses.replace(cfg, **{k: v for k, v in options.items()
                                     if k in RUN_OPTIONS and k in names})


def without_run_options(cfg):
  """``cfg`` with its run-time options at their defaults: its architecture alone."""
  return with_run_options(cfg, **RUN_DEFAULTS)


def check_remat(name: str, remat) -> None:
  if not isinstance(remat, str) or remat not in REMAT_POLICIES:
    raise bad_argument(name, f"one of {', '.join(map(repr, REMAT_POLICIES))}", repr(remat),
                       ConfigError)


def run_blocks(layers, h, remat: str):
  """h through the heterogeneous ``layers`` (a ResNet stage's Bottlenecks) in turn, each
  rematerialised as ``remat`` says (``REMAT_POLICIES``): the same values and gradients, less
  memory held for the backward pass. A transformer tower's equal blocks are ``Blocks``."""
  policy = REMAT_POLICIES[remat]
  for layer in layers:
    h = (layer(h) if remat == "none"
         else nnx.remat(lambda block, x: block(x), policy=policy)(layer, h))
  return h


class Blocks(Block):
  """A tower's ``cfg.num_hidden_layers`` blocks as one ``Block`` whose every parameter has a
  leading layer axis (block i's are ``[i]``), run by ``jax.lax.scan``:

    h_{i+1} = block(h_i; θ[i]),  i = 0 … L − 1

  so the compiled program holds one block whatever the depth. The scan step is
  ``jax.checkpoint``-ed with ``cfg.remat``'s policy (``REMAT_POLICIES``): each block is
  rematerialised on its own, as a list of blocks would be. ``cfg.unroll`` blocks run inline per
  iteration (``jax.lax.scan``'s ``unroll``); from the depth on, all of them with no loop: the same
  function up to float rounding, without the loop's slicing of the stacks and stacking of
  per-block values, which in a shallow tower of small blocks cost more than the blocks.

  The blocks are initialised one after the other from ``rngs``, the parameters a list of
  ``Block`` s would get. ``blocks.block(i)`` is block i as a ``Block`` (a copy; write through
  the stacked arrays, ``blocks.mlp.fc1.kernel[i] = …``; indexing and iterating raise InputError).
  Checkpoint formats name block i's parameters ``….layers.{i}.…``: ``checkpoints.unstack`` /
  ``stack`` translate.

  Under FSDP (``gather(model, mesh, by_block=True)``) step i gathers block i's parameters whole
  from their split stacks, θ[i] ← all_gather(θ[i]), and the backward scan's step i
  reduce-scatters their gradient (the transpose), so a device holds one block's parameters whole
  at a time (the backward pass also keeps those its remat policy saves: with "none", the weights
  each block's matmuls used).
  """
  # The mesh to gather each step's block on (set by ``gather``; None: as the stack is placed).
  gather_mesh = None

  def __init__(self, cfg, *, causal: bool, dtype, param_dtype, rngs: nnx.Rngs):
    super().__init__(cfg, causal=causal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    rest = [Block(cfg, causal=causal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(cfg.num_hidden_layers - 1)]
    nnx.update(self, jax.tree.map(lambda *blocks: jnp.stack(blocks), nnx.state(self),
                                  *map(nnx.state, rest)))
    self.config, self.causal, self.dtype, self.param_dtype = cfg, causal, dtype, param_dtype

  def __len__(self) -> int:
    return self.layer_norm1.scale.shape[0]

  def block(self, i: int) -> Block:
    """Block i as a ``Block`` of its own: a copy (writing it leaves the stack as it is)."""
    count = len(self)
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -count <= i < count:
      raise bad_argument("i", f"a block index in [-{count}, {count})", repr(i))
    block = nnx.eval_shape(lambda: Block(self.config, causal=self.causal, dtype=self.dtype,
                                         param_dtype=self.param_dtype, rngs=nnx.Rngs(0)))
    nnx.update(block, jax.tree.map(lambda x: x[i], nnx.state(self)))
    return block

  def __getitem__(self, i):
    raise bad_argument(f"blocks[{i!r}]", "blocks.block(i) (a copy of block i) or a write "
                       "through the stacked arrays (blocks.mlp.fc1.kernel[i] = …)",
                       "an index into a tower's stacked blocks")

  def __iter__(self):
    return self[0]

  def __call__(self, h):
    graphdef, stacked = nnx.split(self)
    mesh = self.gather_mesh

    def step(h, weights):
      if mesh is not None:
        weights = jax.lax.with_sharding_constraint(weights, _compute_shardings(weights, mesh))
      return Block.__call__(nnx.merge(graphdef, weights), h), None

    if self.config.remat != "none":
      step = jax.checkpoint(step, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
    unroll = True if self.config.unroll >= len(self) else self.config.unroll
    return jax.lax.scan(step, h, stacked, unroll=unroll)[0]


# Tensor parallelism (``parallel.tensor_spec``): the axis of each array of ``Attention`` and
# ``MLP`` split over the mesh's ``model`` axis, Megatron's: q/k/v and fc1 by their outputs (heads,
# hidden units), out_proj and fc2 by their inputs, so a block's attention and MLP each end in
# one reduction over ``model``. Axes count from the end (a stack of blocks has the same rule).
TENSOR_AXES = ((re.compile(r"(^|/)self_attn/[qkv]_proj/(kernel|bias)(/\.value)?$"), -1),
               (re.compile(r"(^|/)self_attn/out_proj/kernel(/\.value)?$"), -2),
               (re.compile(r"(^|/)mlp/fc1/(kernel|bias)(/\.value)?$"), -1),
               (re.compile(r"(^|/)mlp/fc2/kernel(/\.value)?$"), -2))


def tensor_axis(path: str) -> int | None:
  """The axis of the array at ``path`` ('…/self_attn/q_proj/kernel') that tensor parallelism
  splits (``TENSOR_AXES``), None for an array it keeps whole."""
  return next((axis for pattern, axis in TENSOR_AXES if pattern.search(path)), None)


def _compute_shardings(tree, mesh):
  """Where a step computes with ``tree``'s arrays: FSDP's ``data`` split gathered, the
  ``model`` axis' split of ``tensor_axis`` kept (the "replicated" placement of ``parallel``)."""
  return parallel.shardings(tree, mesh, "replicated", tensor_axis)


def gather(model, mesh, by_block: bool = False):
  """Every array of ``model`` (merged inside a jitted step) gathered where the step starts, as
  ``_compute_shardings`` says (whole on each device of ``mesh``, but for the ``model`` axis'
  split of ``tensor_axis``); with ``by_block``, every ``Blocks``' stacks stay as they are
  placed and each scan step gathers its own block (FSDP: one block at a time, see ``Blocks``).
  In place; returns ``model``."""
  stacks = {path: module for path, module in nnx.iter_modules(model)
            if by_block and isinstance(module, Blocks)}
  for module in stacks.values():
    module.gather_mesh = mesh
  outside = lambda path, _: not any(path[:len(stack)] == stack for stack in stacks)
  state = nnx.state(model, outside)
  nnx.update(model, jax.lax.with_sharding_constraint(
      state, _compute_shardings(state, mesh)))
  return model


def check_token_ids(name: str, ids, vocab_size: int) -> None:
  """Raises when ``ids`` is concrete and holds an id outside [0, vocab_size): the embedding
  lookup would not fail but give NaN features (too large) or another token's row (negative)."""
  values = _checks.concrete(ids)
  if values is not None and values.size and (values.min() < 0 or values.max() >= vocab_size):
    raise bad_argument(name, f"token ids in [0, {vocab_size}) (the model's vocab_size)",
                       f"ids in [{values.min()}, {values.max()}]")


def square_size(size, name: str) -> int:
  """A config's image or patch size as one int: ``[s, s]`` -> s; a non-square one refused."""
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise bad_argument(f"vision_config.{name}", "a square size", size, ConfigError)
    size = size[0]
  return int(size)


def embed_text(text_tower, input_ids, inputs_embeds=None):
  """(B, L) ids [, (B, L, width) embeddings replacing the lookup] -> (B, L, width): token plus
  position embeddings of a text tower with ``config``, ``token_embedding`` and
  ``position_embedding``, after checking the ids (shape, length, vocabulary) and the
  replacement's shape."""
  cfg = text_tower.config
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise bad_argument("input_ids", "a (batch, length) integer array",
                       f"shape {input_ids.shape} dtype {input_ids.dtype}")
  batch, length = input_ids.shape
  if not 1 <= length <= cfg.max_position_embeddings:
    raise bad_argument("input_ids", f"length in [1, {cfg.max_position_embeddings}]", length)
  check_token_ids("input_ids", input_ids, cfg.vocab_size)
  if inputs_embeds is None:
    inputs_embeds = text_tower.token_embedding(input_ids)
  elif inputs_embeds.shape != (batch, length, cfg.hidden_size):
    raise bad_argument("inputs_embeds", f"shape {(batch, length, cfg.hidden_size)}",
                       inputs_embeds.shape)
  positions = text_tower.position_embedding.embedding[:length]
  return inputs_embeds + positions.astype(inputs_embeds.dtype)


def check_images(images, image_size: int | None = None) -> None:
  """A batch of normalised NHWC RGB images, ``image_size`` square when given (a ViT's position
  embeddings fix it; a ResNet pools any size)."""
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
    raise bad_argument("images", "floating-point normalised pixels", f"dtype {images.dtype}")
  if image_size is not None and shape[1:3] != (image_size, image_size):
    raise bad_argument("images", f"{image_size}x{image_size} pixels (the model's image_size; "
                       "load with image_size= to resize its position embeddings)", f"shape {shape}")


def l2_normalise(x):
  """x / max(‖x‖₂, 1e-12) over the last axis (``torch.nn.functional.normalize``); NumPy in,
  NumPy out, so initialisers can use it too. The one L2 normalisation of glajax."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def resize_position_embedding(table, new_grid: int, prefix: int = 1):
  """(prefix + g^2, D) -> (prefix + new_grid^2, D): bicubic resize of the patch grid; the
  ``prefix`` rows before it (CLIP's CLS: 1; SigLIP has none: 0) kept."""
  num_patches = table.shape[0] - prefix
  grid = math.isqrt(max(num_patches, 0))
  if grid * grid != num_patches or grid == 0:
    raise bad_argument("table", f"{prefix} + a square number of rows", table.shape)
  patches = table[prefix:].reshape(grid, grid, table.shape[1])
  patches = jax.image.resize(patches.astype(jnp.float32), (new_grid, new_grid, table.shape[1]),
                             method="bicubic")
  return jnp.concatenate([table[:prefix], patches.reshape(-1, table.shape[1]).astype(table.dtype)])


def resize_vision_positions(model, image_size: int, prefix: int = 1):
  """Sets ``model`` (in place, and returns it) to take ``image_size`` px images: the position
  table of its ``vision_model`` resized bicubically (``resize_position_embedding``, its
  ``prefix`` rows kept) and ``config.vision.image_size`` set. For ViT towers whose config has
  ``patch_size`` and ``grid_size``."""
  vision = model.config.vision
  if (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
      or image_size < 1 or image_size % vision.patch_size):
    raise bad_argument("image_size", f"a positive multiple of the patch size {vision.patch_size}",
                       repr(image_size))
  new_vision = dataclasses.replace(vision, image_size=image_size)
  table = model.vision_model.position_embedding.embedding
  table.set_value(resize_position_embedding(table[...], new_vision.grid_size, prefix))
  model.vision_model.position_embedding.num_embeddings = prefix + new_vision.grid_size**2
  model.vision_model.config = new_vision
  model.config = dataclasses.replace(model.config, vision=new_vision)
  return model


def init_compiled(build):
  """The module ``build()`` makes (the same weights, to float rounding), its initialisers
  compiled as one unoptimised XLA program that runs once: a few seconds instead of the eager
  constructor's compiling of ~100 small kernels."""
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  init = jax.jit(lambda: nnx.state(build())).lower().compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return nnx.merge(graphdef, init())

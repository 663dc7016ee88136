"""The attention kernels (``models.layers.attend``) and the fused q/k/v projection (issue 14).

- XLA path: against a float64 NumPy softmax(q kᵀ/√d [+ causal]) v, values and gradients, at
  float32 "highest" precision (tolerance 1e-5);
- cuDNN path (GPU only): against the same float64 reference in bfloat16, where the error is set
  by bfloat16 inputs and outputs (8-bit mantissa: ~4e-3 relative per rounding), so the bound is
  2e-2 and within 2x the XLA path's own bfloat16 error; its gradients within 2e-2 of the XLA
  path's bfloat16 gradients; the odd-length padding it needs, checked on any backend;
- the fused q/k/v projection against the three separate projections it replaced (float32, 1e-6);
- a 100-step bfloat16 training run against the previous attention (``legacy_attention_call``):
  the loss curves may differ by no more than bfloat16 itself moves them, measured as the gap
  between the previous implementation in bfloat16 and in float32.
On a CPU, ``"auto"`` is the XLA path, so there the run compares the fused projection alone; on a
GPU (benchmarks/gpu.sh runs this file) it compares cuDNN attention + the fused projection. The
loss-curve check is coarse by nature (measured on a CPU: it catches q scaled by 2, e.g. a wrong
1/√d, but not by 1.25): the exact numerics are the unit tests above it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax.errors import ConfigError
from glajax.models import layers
from glajax.models.clip import CLIPConfig, init_clip
from glajax.models.layers import attend
from glajax.models.heads import LinearHead
from glajax.parallel import make_mesh, replicated, shard_batch
from glajax.train import engine, recipes
from glajax.train.state import create_train_state, make_optimizer

_ON_GPU = "__import__('jax').default_backend() != 'gpu'"


def legacy_attention_call(self, x, implementation="xla"):
  """``Attention.__call__`` before issue 14: three q/k/v matmuls, then (by default) the XLA
  einsum softmax."""
  batch, length, width = x.shape
  split = lambda y: y.reshape(batch, length, self.num_heads, width // self.num_heads)
  q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
  out = attend(q, k, v, causal=self.causal, implementation=implementation)
  return self.out_proj(out.reshape(batch, length, width))


def _reference(q, k, v, causal):
  """float64 NumPy softmax(q kᵀ/√d [+ causal mask]) v, (B, L, H, D) layout."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _qkv(seed, shape=(2, 13, 3, 8)):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for _ in range(3)]


def _reference_grads(q, k, v, g, causal, eps=1e-6):
  """d⟨attend(q, k, v), g⟩ / d(q, k, v) by central differences of the float64 reference."""
  grads = []
  for which in range(3):
    args = [np.asarray(a, np.float64) for a in (q, k, v)]
    grad = np.zeros_like(args[which])
    for index in np.ndindex(grad.shape):
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[which][index] += eps
      minus[which][index] -= eps
      grad[index] = np.sum((_reference(*plus, causal) - _reference(*minus, causal)) * g) / (2 * eps)
    grads.append(grad)
  return grads


@pytest.mark.parametrize("causal", [False, True])
def test_xla_attention_matches_float64_reference(causal):
  q, k, v = _qkv(0, (2, 5, 2, 4))
  g = np.random.default_rng(1).normal(size=q.shape)
  out = jax.jit(lambda q, k, v: attend(q, k, v, causal=causal, implementation="xla"))(q, k, v)
  np.testing.assert_allclose(out, _reference(q, k, v, causal), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      attend(q, k, v, causal=causal, implementation="xla") * g), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads, _reference_grads(q, k, v, g, causal)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length,causal", [(7, False), (7, True), (8, False)])
def test_even_length_padding_computes_the_same_attention(length, causal):
  """The odd-length padding that cuDNN training needs, checked through XLA's implementation of
  the same masked call: values and gradients equal unpadded attention (float32, 1e-5)."""
  q, k, v = _qkv(9, (2, length, 2, 8))
  g = np.random.default_rng(10).normal(size=q.shape).astype(np.float32)
  results = []
  for padded in (True, False):
    fn = (lambda q, k, v: layers.even_length_attention(q, k, v, causal=causal,
                                                         implementation="xla")) if padded else (
        lambda q, k, v: attend(q, k, v, causal=causal, implementation="xla"))
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    results.append((out, *vjp(g)))
  for got, want in zip(*results):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(_ON_GPU, reason="cuDNN flash attention needs a CUDA GPU")
@pytest.mark.parametrize("shape,causal", [((4, 197, 12, 64), False), ((4, 77, 8, 64), True)])
def test_cudnn_attention_matches_reference_in_bfloat16(shape, causal):
  q, k, v = _qkv(2, shape)
  g = np.random.default_rng(3).normal(size=shape).astype(np.float32)
  want = _reference(q, k, v, causal)
  errors, grads = {}, {}
  for implementation in ("xla", "cudnn"):
    fn = jax.jit(lambda q, k, v, i=implementation: attend(q, k, v, causal=causal,
                                                          implementation=i))
    args = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    if implementation == "cudnn":
      assert "cudnn" in fn.lower(*args).as_text().lower()   # the fused kernel, not a fallback
    got = np.asarray(fn(*args), np.float64)
    errors[implementation] = np.linalg.norm(got - want) / np.linalg.norm(want)
    # the training path too: cuDNN refused odd lengths only when differentiated
    grads[implementation] = [np.asarray(x, np.float64) for x in jax.jit(jax.grad(
        lambda q, k, v, i=implementation: jnp.sum(attend(q, k, v, causal=causal,
                                                          implementation=i).astype(jnp.float32)
                                                   * g), argnums=(0, 1, 2)))(*args)]
  assert errors["cudnn"] < 2e-2 and errors["cudnn"] < 2 * errors["xla"] + 1e-3, errors
  for got, want_grad in zip(grads["cudnn"], grads["xla"]):   # two bfloat16 computations
    assert np.linalg.norm(got - want_grad) / np.linalg.norm(want_grad) < 2e-2


def test_auto_keeps_xla_for_float32_and_off_gpu():
  """float32 (any backend) and every dtype off a GPU: the XLA einsum path, no cuDNN call."""
  q, k, v = _qkv(3)
  for dtype in (jnp.float32, jnp.bfloat16):
    args = [jnp.asarray(a, dtype) for a in (q, k, v)]
    hlo = jax.jit(lambda q, k, v: attend(q, k, v, causal=False)).lower(*args).as_text()
    uses_cudnn = "cudnn" in hlo.lower()
    assert uses_cudnn == (dtype == jnp.bfloat16 and jax.default_backend() == "gpu")


def test_fused_qkv_projection_matches_separate_projections():
  model = init_clip(CLIPConfig.tiny(), seed=4)
  attention = model.vision_model.layers.block(0).self_attn
  x = np.random.default_rng(5).normal(size=(2, 17, 32)).astype(np.float32)
  fused = jax.jit(lambda m, x: m(x))(attention, x)
  separate = jax.jit(lambda m, x: legacy_attention_call(m, x))(attention, x)
  np.testing.assert_allclose(fused, separate, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_unknown_attention_is_a_config_error(tower):
  with pytest.raises(ConfigError, match=f"{tower}.attention.*'flash'"):
    CLIPConfig.tiny(**{f"{tower}_attention": "flash"})


def test_auto_says_when_it_falls_back_from_cudnn(monkeypatch):
  """On a GPU backend, bfloat16 "auto" that cuDNN refuses warns (a silent fallback once hid a
  1.36x slower ViT-B/16 step on an H200); here the refusal is the CPU's "cuDNN is not detected"."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(11))
  with pytest.warns(UserWarning, match="cuDNN flash attention refused.*using XLA attention"):
    out = attend(q, k, v, causal=False)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(attend(
      q, k, v, causal=False, implementation="xla"), np.float32))


def test_cudnn_by_name_where_it_cannot_run_is_a_config_error():
  q, k, v = (jnp.asarray(a, jnp.float32) for a in _qkv(8))   # float32: never cuDNN's
  with pytest.raises(ConfigError, match="attention.*cudnn.*float32"):
    attend(q, k, v, causal=False, implementation="cudnn")


def _loss_curve(dtype, steps: int = 100, legacy: bool = False):
  """Losses of ``steps`` WiSE-FT fine-tuning steps of a tiny CLIP + head on fixed data."""
  rng = np.random.default_rng(6)
  images = rng.normal(size=(32, 32, 32, 3)).astype(np.float32)
  labels = (images.mean(axis=(1, 2)) @ rng.normal(size=(3, 4))).argmax(-1).astype(np.int32)
  clip = init_clip(CLIPConfig.tiny(vision_hidden_size=64, vision_num_attention_heads=4), seed=7,
                   dtype=dtype)
  head = LinearHead(rng.normal(size=(16, 4)).astype(np.float32))
  recipe = recipes.finetune()
  recipe.optimizer.update(learning_rate=1e-3)
  task = recipes.classifier_task(clip, head, recipe)
  mesh = make_mesh(jax.local_devices()[:1])
  graphdef, params, rest = engine.split_model(task.model)
  tx, _ = make_optimizer(recipe.optimizer, params, total_steps=steps,
                         aliases=engine.param_groups(task.model))
  state = jax.device_put(create_train_state(params, tx, 0), replicated(mesh))
  step = engine.make_train_step(graphdef, task.loss_fn, tx, mesh)
  losses = []
  for i in range(steps):
    rows = np.arange(8 * i, 8 * i + 8) % len(labels)
    state, metrics = step(state, rest, shard_batch({"image": images[rows],
                                                    "label": labels[rows]}, mesh))
    losses.append(metrics["loss"])
  return np.asarray(jax.device_get(losses), np.float64)


def test_bfloat16_loss_curve_matches_the_previous_attention(monkeypatch):
  """100 bfloat16 steps: |L_new − L_previous| ≤ the bfloat16-vs-float32 gap of the previous
  implementation (its own rounding noise), at every step; and training does learn."""
  new = _loss_curve(jnp.bfloat16)
  monkeypatch.setattr(layers.Attention, "__call__", legacy_attention_call)
  previous = _loss_curve(jnp.bfloat16)
  previous_f32 = _loss_curve(jnp.float32)
  noise = np.max(np.abs(previous - previous_f32))
  assert new[-10:].mean() < 0.8 * new[:10].mean()          # the curve moves
  assert np.max(np.abs(new - previous)) <= max(noise, 1e-6), (np.max(np.abs(new - previous)),
                                                               noise)

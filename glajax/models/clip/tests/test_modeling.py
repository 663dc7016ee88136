"""The Flax NNX CLIP module on its own: configs, presets, adapters, remat, pooling, resizing.

Parity with transformers' PyTorch CLIP is in test_params_hf.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from glajax import ConfigError, InputError
from glajax.models.clip.modeling import (CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig,
                                         init_clip, interpolate_position_embedding)
from glajax.models.layers import resize_position_embedding


def _tiny(seed=0, dtype=jnp.float32, **overrides):
  return init_clip(CLIPConfig.tiny(**overrides), seed=seed, dtype=dtype)


@pytest.fixture(scope="module")
def model():
  """A tiny CLIP that tests must not modify."""
  return _tiny()


_image = jax.jit(lambda m, x: m.encode_image(x))
_text = jax.jit(lambda m, ids, embeds: m.encode_text(ids, embeds))


def _images(n=2, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


IDS = np.array([[49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, 0],
                [49406, 320, 2368, 49407, 0, 0, 0, 0, 0, 0],
                [49406, 49407, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)


@pytest.mark.parametrize("preset, count", [
    # transformers.CLIPModel(...).num_parameters() of the published OpenAI checkpoints
    # (ViT-B/16 149_620_737, ViT-L/14 427_616_513, ViT-L/14-336 427_944_193; those architectures
    # are checked against transformers in test_params_hf.py's slow real-size test)
    ("vit_b32", 151_277_313)])
def test_preset_parameter_counts(preset, count):
  model = nnx.eval_shape(lambda: CLIP(getattr(CLIPConfig, preset)(), rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == count


def test_config_hf_round_trip_and_tiny_overrides():
  cfg = CLIPConfig.tiny(image_size=30, patch_size=6, text_hidden_size=24, vision_hidden_size=36,
                        vision_num_attention_heads=3, vocab_size=100, projection_dim=8)
  assert cfg.vision.image_size == 30 and cfg.text.vocab_size == 100 and cfg.projection_dim == 8
  assert CLIPConfig.from_hf(cfg.to_hf()) == cfg
  assert cfg.to_hf()["model_type"] == "clip"
  with_adapter = CLIPConfig.tiny(adapter_dim=4)
  assert "adapter_dim" not in with_adapter.to_hf()["vision_config"]
  assert CLIPConfig.from_hf(with_adapter.to_hf()).vision.adapter_dim == 0


@pytest.mark.parametrize("make, match", [
    (lambda: CLIPConfig.tiny(num_hidden_layers=3), "num_hidden_layers"),  # ambiguous
    (lambda: CLIPConfig.tiny(depth=3), "depth"),
    (lambda: CLIPVisionConfig(hidden_act="swish"), "hidden_act"),
    (lambda: CLIPTextConfig(hidden_size=30, num_attention_heads=8), "multiple"),
    (lambda: CLIPVisionConfig(image_size=30, patch_size=8), "image_size"),
    (lambda: CLIPConfig.from_hf({"model_type": "siglip"}), "siglip"),
])
def test_bad_configs(make, match):
  with pytest.raises(ConfigError, match=match):
    make()


def test_call_is_scaled_cosine(model):
  images = _images(3)
  logits = jax.jit(lambda m, x, t: m(x, t))(model, images, IDS)
  img = np.asarray(_image(model, images), np.float64)
  txt = np.asarray(_text(model, IDS, None), np.float64)
  cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
      txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
  np.testing.assert_allclose(logits, np.exp(2.6592) * cos, atol=1e-5)
  assert logits.shape == (3, 3) and logits.dtype == jnp.float32
  assert model.image_features(images).shape == (3, 32)


def test_text_pools_first_eos_and_ignores_padding(model):
  ids = IDS.copy()
  ids[:, -2:] = 49407  # padding with EOS after the first EOS (transformers' pad token)
  ids[1, 5] = 123      # anything after the first EOS is invisible to it (causal attention)
  np.testing.assert_allclose(_text(model, ids, None), _text(model, IDS, None), atol=1e-6)
  short = _text(model, IDS[:, :8], None)
  np.testing.assert_allclose(short, _text(model, IDS, None), atol=1e-6)


def test_inputs_embeds_replace_the_lookup(model):
  embeds = model.text_model.token_embedding(jnp.asarray(IDS))
  np.testing.assert_allclose(_text(model, IDS, embeds),
                             _text(model, IDS, None), atol=1e-6)
  noise = np.random.default_rng(0).normal(size=embeds.shape).astype(np.float32)
  shifted = _text(model, IDS, embeds + noise)
  assert np.abs(shifted - _text(model, IDS, None)).max() > 1e-3
  with pytest.raises(InputError, match="inputs_embeds"):
    _text(model, IDS, embeds[:, :4])


def test_bad_text_input(model):
  with pytest.raises(InputError, match="input_ids"):
    model.encode_text(IDS[0])
  with pytest.raises(InputError, match="input_ids.*77"):
    model.encode_text(np.zeros((1, 78), np.int32))


def test_adapter_is_identity_at_init_then_adaptformer():
  """LIFT's AdaptFormer: h + mlp(ln2(h)) + s·up(relu(down(LN_a(h)))), checked on one block in
  NumPy (parity with LIFT's PyTorch code is in test_lift_parity.py); a fixed float scale too."""
  model = _tiny(adapter_dim=4)
  images = _images()
  with_adapters = _image(model, images)
  graphdef, state = nnx.split(model)
  plain = nnx.merge(graphdef, state)
  plain.vision_model.layers.adapter = None   # every block's (the blocks are stacked)
  # Zero-initialised up-projection: equal up to the float rounding of a differently fused graph.
  np.testing.assert_allclose(with_adapters, _image(plain, images), rtol=0, atol=1e-6)

  for scale in ("learnable", 0.5):
    block = _tiny(adapter_dim=4, adapter_scale=scale).vision_model.layers.block(0)
    rng = np.random.default_rng(1)
    block.adapter.up.kernel[...] = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
    block.adapter.up.bias[...] = jnp.asarray(rng.normal(size=(32,)), jnp.float32)
    block.adapter.ln.bias[...] = jnp.asarray(rng.normal(size=(32,)), jnp.float32)
    if scale == "learnable":
      block.adapter.scale[...] = jnp.asarray([0.7], jnp.float32)
    h = rng.normal(size=(2, 5, 32)).astype(np.float32)
    mid = h + np.asarray(block.self_attn(block.layer_norm1(h)))
    normed = (mid - mid.mean(-1, keepdims=True)) / np.sqrt(mid.var(-1, keepdims=True) + 1e-5)
    normed = normed + np.asarray(block.adapter.ln.bias)
    down = np.maximum(normed @ np.asarray(block.adapter.down.kernel)
                      + np.asarray(block.adapter.down.bias), 0)
    adapter = down @ np.asarray(block.adapter.up.kernel) + np.asarray(block.adapter.up.bias)
    s = 0.7 if scale == "learnable" else 0.5
    expected = mid + np.asarray(block.mlp(block.layer_norm2(mid))) + s * adapter
    np.testing.assert_allclose(block(h), expected, atol=1e-5)
  with pytest.raises(ConfigError, match="adapter_scale"):
    CLIPConfig.tiny(adapter_dim=4, adapter_scale="fixed")


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_the_same_values_and_gradients(remat):
  """Values of both towers and parameter gradients through the rematerialised vision blocks
  equal those without remat; the policy is in the program."""
  images = _images()
  ids = np.array([[1, 5, 9, 99, 0], [1, 99, 0, 0, 0]])
  results = []
  for policy in ("none", remat):
    model = _tiny(vision_remat=policy, text_remat=policy, vocab_size=100, text_eos_token_id=99,
                  vision_num_hidden_layers=1, text_num_hidden_layers=1)
    graphdef, params = nnx.split(model)
    loss = lambda params: jnp.sum(jnp.sin(nnx.merge(graphdef, params).image_features(images)))
    grad = jax.grad(loss)
    jaxpr = str(jax.make_jaxpr(grad)(params))
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (policy != "none")
    results.append((_text(model, ids, None), jax.jit(grad)(params)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *results)


def test_remat_policies_trade_memory_for_compute():
  """What the backward pass of a 4-block tower keeps from the forward pass (JAX's saved
  residuals, the memory a policy decides; XLA's CPU memory analysis does not model it): fewer
  bytes with "dots" than without remat, fewer still with "block"."""
  from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint prints
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
  kept = {}
  for policy in ("none", "dots", "block"):
    graphdef, params = nnx.split(_tiny(vision_remat=policy, vision_num_hidden_layers=4))
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p).image_features(images)))  # noqa
    kept[policy] = sum(np.prod(a.shape) * a.dtype.itemsize
                       for a, _ in saved_residuals(loss, params))
  assert kept["block"] < kept["dots"] < kept["none"], kept


def test_remat_refuses_an_unknown_policy():
  with pytest.raises(ConfigError, match="vision.remat.*'none', 'block', 'dots'.*True"):
    _tiny(vision_remat=True)


def test_bfloat16_compute_float32_params(model):
  f32, bf16 = model, _tiny(dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  images = _images()
  out = _image(bf16, images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _image(f32, images), atol=0.05)


def test_init_clip_equals_the_eager_constructor(model):
  eager = CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0))
  got, want = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(eager))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got, want)


def test_hf_like_init(model):
  assert float(model.logit_scale[...]) == pytest.approx(2.6592)
  assert model.logit_scale.shape == ()
  assert np.std(model.text_model.token_embedding.embedding[...]) == pytest.approx(0.02, rel=0.02)
  assert model.visual_projection.kernel.shape == (32, 16)


def _pil_bicubic(plane, size):
  """Reference: PIL's bicubic (Keys a = -0.5, antialiased when shrinking)."""
  return np.asarray(Image.fromarray(plane, mode="F").resize((size, size), Image.BICUBIC))


@pytest.mark.parametrize("new_grid", [7, 9, 3])
def test_resize_position_embedding_matches_pil_bicubic(new_grid):
  table = np.random.default_rng(0).normal(size=(1 + 5 * 5, 4)).astype(np.float32)
  resized = np.asarray(jax.jit(resize_position_embedding, static_argnums=1)(table, new_grid))
  assert resized.shape == (1 + new_grid**2, 4)
  np.testing.assert_array_equal(resized[0], table[0])
  grid = table[1:].reshape(5, 5, 4)
  expected = np.stack([_pil_bicubic(grid[..., c], new_grid) for c in range(4)], -1)
  np.testing.assert_allclose(resized[1:].reshape(new_grid, new_grid, 4), expected, atol=1e-5)


def test_interpolate_position_embedding_changes_image_size():
  model = _tiny()
  same = _image(model, _images())
  interpolate_position_embedding(model, 32)  # same size: unchanged
  np.testing.assert_allclose(_image(model, _images()), same, atol=1e-6)
  interpolate_position_embedding(model, 48)
  assert model.config.vision.image_size == 48
  assert _image(model, _images(size=48)).shape == (2, 16)
  with pytest.raises(InputError, match="images.*48x48"):
    _image(model, _images())
  with pytest.raises(InputError, match="image_size"):
    interpolate_position_embedding(model, 50)


def test_presets_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    CLIPConfig.vit_b32().projection_dim = 3

"""The Flax NNX SigLIP module on its own: configs, real-size shapes, the sigmoid logits, the MAP
head's split into ``image_features`` and W_o, text pooling, remat, bfloat16, resizing.

Parity with transformers' PyTorch SiglipModel is in test_siglip_params_hf.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax import ConfigError, InputError
from glajax.models.siglip.modeling import (SigLIP, SiglipConfig, SiglipTextConfig,
                                           SiglipVisionConfig, init_siglip,
                                           interpolate_position_embedding)


@pytest.fixture(scope="module")
def model():
  """A tiny SigLIP that tests must not modify."""
  return init_siglip(SiglipConfig.tiny(), seed=0)


_image = jax.jit(lambda m, x: m.encode_image(x))
_text = jax.jit(lambda m, ids, embeds: m.encode_text(ids, embeds))


def _images(n=2, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _ids(n=3, seed=0):
  return np.random.default_rng(seed).integers(0, 259, size=(n, 64)).astype(np.int32)


def _count(module):
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# The published configs (config.json of each hub repo; missing keys are transformers' defaults).
PUBLISHED = {
    # huggingface.co/google/siglip-base-patch16-224/blob/main/config.json
    "base_p16_224": dict(text_config=dict(hidden_size=768, intermediate_size=3072,
                                          num_attention_heads=12, vocab_size=32000),
                         vision_config=dict(patch_size=16)),
    # huggingface.co/google/siglip-so400m-patch14-384/blob/main/config.json
    "so400m_p14_384": dict(
        text_config=dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                         num_hidden_layers=27),
        vision_config=dict(hidden_size=1152, image_size=384, intermediate_size=4304,
                           num_attention_heads=16, num_hidden_layers=27, patch_size=14)),
    # huggingface.co/google/siglip2-base-patch16-224 (model_type "siglip", Gemma's vocabulary)
    "siglip2_base_p16_224": dict(text_config=dict(vocab_size=256000), vision_config=dict()),
}
# transformers' SiglipModel(config).num_parameters() for those configs (the model cards round
# them to 203M, 878M and 375M; So400m's image tower is the "400m": 428M).
COUNTS = {"base_p16_224": 203_155_970, "so400m_p14_384": 877_960_498,
          "siglip2_base_p16_224": 375_187_970}
PRESETS = {"base_p16_224": SiglipConfig.base_p16_224(), "so400m_p14_384":
           SiglipConfig.so400m_p14_384(), "siglip2_base_p16_224": SiglipConfig.base_p16_224(256000)}


@pytest.mark.parametrize("name", ["base_p16_224", "siglip2_base_p16_224",
                                  pytest.param("so400m_p14_384", marks=pytest.mark.slow)])
def test_real_size_parameter_counts(name):
  """nnx.eval_shape of each preset has transformers' count for the published config, built on
  torch's meta device (no memory), and from_hf of that config gives the preset."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.SiglipConfig(**PUBLISHED[name])
  with torch.device("meta"):
    theirs = transformers.SiglipModel(config)
  assert sum(p.numel() for p in theirs.parameters()) == COUNTS[name]
  shapes = nnx.eval_shape(lambda: SigLIP(PRESETS[name], rngs=nnx.Rngs(0)))
  assert _count(shapes) == COUNTS[name]
  assert SiglipConfig.from_hf(config) == PRESETS[name]
  if name == "so400m_p14_384":
    tower = sum(p.numel() for p in theirs.vision_model.parameters())
    assert tower == 428_225_600 == _count(shapes.vision_model)
    assert shapes.vision_model.position_embedding.embedding.shape == (27 * 27, 1152)


def test_config_round_trip_and_tiny():
  cfg = SiglipConfig.tiny(vision=dict(image_size=30, patch_size=6, hidden_size=36,
                                      num_attention_heads=3), text=dict(vocab_size=100))
  assert cfg.vision.image_size == 30 and cfg.text.projection_size == 36
  assert cfg.tokenizer == "bytes" and SiglipConfig.from_hf(cfg.to_hf()) == cfg
  assert cfg.to_hf()["model_type"] == "siglip" and cfg.to_hf()["glajax_tokenizer"] == "bytes"
  plain = dataclasses.replace(cfg, tokenizer=None)
  assert "glajax_tokenizer" not in plain.to_hf() and SiglipConfig.from_hf(plain.to_hf()) == plain
  assert SiglipConfig().logit_bias_init_value == -10.0   # big_vision's SigLIP initialisation


@pytest.mark.parametrize("make, match", [
    (lambda: SiglipVisionConfig(hidden_act="swish"), "hidden_act"),
    (lambda: SiglipTextConfig(hidden_size=30, num_attention_heads=8), "multiple"),
    (lambda: SiglipVisionConfig(image_size=8, patch_size=16), "image_size"),
    (lambda: SiglipConfig(text=SiglipTextConfig(projection_size=512)), "projection_size.*768"),
    (lambda: SiglipConfig(tokenizer="gpt2"), "tokenizer"),
    (lambda: SiglipConfig.from_hf({"model_type": "clip"}), "model_type 'clip'"),
    (lambda: SiglipConfig.from_hf({"model_type": "siglip2"}), "NaFlex"),
    (lambda: SiglipConfig.from_hf({"model_type": "siglip_vision_model"}), "both towers"),
    (lambda: SiglipConfig.from_hf({"model_type": "siglip",
                                   "vision_config": {"num_channels": 1}}), "num_channels"),
    (lambda: SiglipConfig.from_hf({"model_type": "siglip",
                                   "vision_config": {"image_size": [224, 256]}}), "square"),
])
def test_bad_configs(make, match):
  with pytest.raises(ConfigError, match=match):
    make()


def test_call_is_scaled_cosine_plus_bias(model):
  images, ids = _images(3), _ids(4)
  logits = jax.jit(lambda m, x, t: m(x, t))(model, images, ids)
  img = np.asarray(_image(model, images), np.float64)
  txt = np.asarray(_text(model, ids, None), np.float64)
  cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
      txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
  np.testing.assert_allclose(logits, 10.0 * cos - 10.0, atol=1e-5)
  assert logits.shape == (3, 4) and logits.dtype == jnp.float32


def test_embedding_is_the_map_head_after_image_features(model):
  """encode_image = y + MLP(LN(y)), y = image_features · W_o + b_o: the split the interface
  documents (W_o = image_projection_kernel)."""
  images = _images()
  features = np.asarray(model.image_features(images), np.float64)
  head = model.vision_model.head
  y = features @ np.asarray(model.image_projection_kernel()) + np.asarray(head.out_proj.bias)
  y32 = jnp.asarray(y, jnp.float32)
  np.testing.assert_allclose(y + np.asarray(head.mlp(head.layernorm(y32))),
                             np.asarray(_image(model, images)), atol=1e-5)
  assert model.image_projection_kernel().shape == (32, 32)
  assert model.text_projection_kernel().shape == (32, 32)


def test_inputs_embeds_replace_the_lookup(model):
  ids = _ids()
  embeds = model.embed_tokens(jnp.asarray(ids))
  np.testing.assert_allclose(_text(model, ids, embeds), _text(model, ids, None), atol=1e-6)
  noise = np.random.default_rng(0).normal(size=embeds.shape).astype(np.float32)
  assert np.abs(_text(model, ids, embeds + noise) - _text(model, ids, None)).max() > 1e-3
  with pytest.raises(InputError, match="inputs_embeds"):
    _text(model, ids, embeds[:, :4])


def test_bad_inputs(model):
  with pytest.raises(InputError, match="input_ids"):
    model.encode_text(_ids()[0])
  with pytest.raises(InputError, match=r"input_ids.*\[1, 64\]"):
    model.encode_text(np.zeros((1, 65), np.int32))
  with pytest.raises(InputError, match="input_ids.*259"):
    model.encode_text(np.full((1, 64), 259, np.int32))
  with pytest.raises(InputError, match="NCHW"):
    model.encode_image(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.slow
def test_remat_gives_the_same_values_and_gradients():
  images, ids = _images(), _ids(2)
  results = []
  for remat in ("none", "block"):
    model = init_siglip(SiglipConfig.tiny(vision=dict(remat=remat, num_hidden_layers=1),
                                          text=dict(remat=remat, num_hidden_layers=1)))
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(images, ids)))
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (remat != "none")
    results.append(jax.jit(jax.grad(loss))(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *results)


def test_bfloat16_compute_float32_params(model):
  bf16 = init_siglip(SiglipConfig.tiny(), dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  out = _image(bf16, _images())
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _image(model, _images()), atol=0.05)


def test_init_siglip_equals_the_eager_constructor(model):
  eager = SigLIP(SiglipConfig.tiny(), rngs=nnx.Rngs(0))
  got, want = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(eager))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got, want)
  assert float(model.logit_scale[...]) == pytest.approx(np.log(10.0))
  assert float(model.logit_bias[...]) == -10.0


def test_interpolate_position_embedding_has_no_class_row():
  model = init_siglip(SiglipConfig.tiny())
  table = np.asarray(model.vision_model.position_embedding.embedding[...])
  same = _image(model, _images())
  interpolate_position_embedding(model, 32)
  np.testing.assert_allclose(_image(model, _images()), same, atol=1e-6)
  np.testing.assert_allclose(model.vision_model.position_embedding.embedding[...], table,
                             atol=1e-6)
  interpolate_position_embedding(model, 48)
  assert model.vision_model.position_embedding.embedding.shape == (36, 32)
  assert model.config.vision.image_size == 48 and model.spec.image_size == 48
  assert _image(model, _images(size=48)).shape == (2, 32)
  with pytest.raises(InputError, match="image_size"):
    interpolate_position_embedding(model, 50)

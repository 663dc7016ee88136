"""Parity of glajax's SigLIP with transformers' PyTorch ``SiglipModel``, through transformers
checkpoints in every layout the family reads, and the export back.

Each checkpoint is a tiny random SigLIP built and saved with transformers in the test itself;
every parameter (biases, LayerNorms, t and b included, which transformers initialises to 0 or 1)
is drawn at random so that each one matters. float32, under ``jax.jit``, ≤ 1e-5.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import glajax  # noqa: E402
from glajax import CheckpointError, ConfigError  # noqa: E402
from glajax.models import registry  # noqa: E402
from glajax.models.siglip import SigLIP, load_siglip, save_siglip  # noqa: E402

ATOL = 1e-5

# name -> (transformers SiglipConfig kwargs, how it is saved)
CHECKPOINTS = {
    # odd sizes: image 30, patch 6 (25 tokens), 3 heads; text narrower than the embedding
    "odd": (dict(
        text_config=dict(vocab_size=99, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=3, max_position_embeddings=12, projection_size=36),
        vision_config=dict(image_size=30, patch_size=6, hidden_size=36, intermediate_size=50,
                           num_hidden_layers=2, num_attention_heads=3)), "safetensors"),
    # exact GELU; pytorch_model.bin (transformers 5's save_pretrained writes safetensors only)
    "gelu_bin": (dict(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=10, hidden_act="gelu"),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=4, hidden_act="gelu")),
        "torch.save"),
    # sharded safetensors (model.safetensors.index.json + shards)
    "sharded": (dict(
        text_config=dict(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2)), "sharded"),
    # bfloat16 weights, as the hub's SigLIP 2 checkpoints are stored
    "bf16": (dict(
        text_config=dict(vocab_size=70, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=9),
        vision_config=dict(image_size=24, patch_size=8, hidden_size=32, intermediate_size=40,
                           num_hidden_layers=1, num_attention_heads=2)), "bf16"),
}


def _hf_model(name: str, seed: int = 0):
  """A transformers SiglipModel with every parameter random (t = 2.3, b = -1.7)."""
  torch.manual_seed(seed)
  model = transformers.SiglipModel(transformers.SiglipConfig(**CHECKPOINTS[name][0])).eval()
  with torch.no_grad():
    for key, param in model.named_parameters():
      if key == "logit_scale":
        param.fill_(2.3)
      elif key == "logit_bias":
        param.fill_(-1.7)
      else:
        param.add_(0.1 * torch.randn_like(param))
  if CHECKPOINTS[name][1] == "bf16":
    model = model.to(torch.bfloat16).to(torch.float32)   # the values a BF16 file holds
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, transformers model)."""
  out = {}
  for name, (_, how) in CHECKPOINTS.items():
    model = _hf_model(name)
    directory = str(tmp_path_factory.mktemp(name))
    if how == "torch.save":
      model.save_pretrained(directory)
      os.remove(os.path.join(directory, "model.safetensors"))
      torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    elif how == "sharded":
      model.save_pretrained(directory, max_shard_size="10KB")
    elif how == "bf16":
      model.to(torch.bfloat16).save_pretrained(directory)
      model.to(torch.float32)
    else:
      model.save_pretrained(directory)
    out[name] = directory, model
  return out


def _inputs(hf_model, seed=0):
  """Images (B, H, W, 3) and full-length token ids (SigLIP pools at the last position)."""
  cfg = hf_model.config
  size = cfg.vision_config.image_size
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(3, size, size, 3)).astype(np.float32)
  text = cfg.text_config
  ids = rng.integers(0, text.vocab_size, size=(4, text.max_position_embeddings))
  return images, ids


def _nchw(images):
  return torch.from_numpy(images.transpose(0, 3, 1, 2))


def _hf_outputs(hf_model, images, ids):
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(ids), pixel_values=_nchw(images))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


@jax.jit
def _glajax_outputs(model, images, ids):
  normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return (normalise(model.encode_image(images)), normalise(model.encode_text(ids)),
          model(images, ids))


def test_layouts_on_disk(checkpoints):
  files = {name: set(os.listdir(checkpoints[name][0])) for name in CHECKPOINTS}
  assert "model.safetensors" in files["odd"] and "pytorch_model.bin" in files["gelu_bin"]
  assert "model.safetensors.index.json" in files["sharded"]
  header = safetensors.safe_open(os.path.join(checkpoints["bf16"][0], "model.safetensors"),
                                 "np")
  assert {header.get_slice(k).get_dtype() for k in header.keys()} == {"BF16"}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_parity_with_transformers(checkpoints, name):
  directory, hf_model = checkpoints[name]
  model = glajax.load_model(directory)   # found by the registry: the SigLIP family
  assert isinstance(model, SigLIP)
  images, ids = _inputs(hf_model)
  for ours, theirs, what in zip(_glajax_outputs(model, images, ids),
                                _hf_outputs(hf_model, images, ids),
                                ("image embeddings", "text embeddings", "logits_per_image")):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL, rtol=0, err_msg=what)


def test_bf16_weights_are_read_exactly(checkpoints):
  directory, hf_model = checkpoints["bf16"]
  ours = checkpoints_params(load_siglip(directory))
  theirs = {k: v.numpy() for k, v in hf_model.state_dict().items() if "position_ids" not in k}
  from glajax.models.siglip import params_hf  # noqa: E402
  exported = params_hf.TABLE.export(ours)
  assert set(exported) == set(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def checkpoints_params(model):
  from glajax.models import checkpoints as ckpt  # noqa: E402
  return ckpt.host_params(model)


@jax.jit
def _layers(model, images, ids):
  v, t = model.vision_model, model.text_model
  e0 = v.embed(images)
  t0 = t.token_embedding(ids) + t.position_embedding.embedding[:ids.shape[1]]
  tokens = v.tokens(images)
  return {"vision embeddings": e0, "vision block 0": v.layers.block(0)(e0),
          "vision post-LN tokens": tokens, "MAP pooled before W_o": v.head.pool(tokens),
          "vision pooled (MAP)": v(images), "text embeddings": t0,
          "text block 0 (bidirectional)": t.layers.block(0)(t0),
          "text pooled (last position, head)": t.head(t(ids))}


def test_layer_by_layer(checkpoints):
  """Embeddings, the first block, the post-LN tokens, the MAP head's attention before W_o, the
  pooled features of each tower: a mismatch points at its layer."""
  directory, hf_model = checkpoints["odd"]
  model = load_siglip(directory)
  images, ids = _inputs(hf_model)
  with torch.no_grad():
    vis = hf_model.vision_model(pixel_values=_nchw(images), output_hidden_states=True)
    txt = hf_model.text_model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    embeddings = hf_model.vision_model.embeddings(_nchw(images))
    attention = hf_model.vision_model.head.attention   # torch MultiheadAttention; W_o -> I
    identity = torch.nn.MultiheadAttention(attention.embed_dim, attention.num_heads,
                                           batch_first=True)
    identity.load_state_dict(attention.state_dict())
    identity.out_proj.weight.copy_(torch.eye(attention.embed_dim))
    identity.out_proj.bias.zero_()
    probe = hf_model.vision_model.head.probe.repeat(len(images), 1, 1)
    pooled = identity(probe, vis.last_hidden_state, vis.last_hidden_state)[0][:, 0]
  ours = _layers(model, images, ids)
  for name, theirs in (("vision embeddings", embeddings), ("vision block 0", vis.hidden_states[1]),
                       ("vision post-LN tokens", vis.last_hidden_state),
                       ("MAP pooled before W_o", pooled),
                       ("vision pooled (MAP)", vis.pooler_output),
                       ("text embeddings", txt.hidden_states[0]),
                       ("text block 0 (bidirectional)", txt.hidden_states[1]),
                       ("text pooled (last position, head)", txt.pooler_output)):
    np.testing.assert_allclose(np.asarray(ours[name]), theirs.numpy(), atol=ATOL, err_msg=name)
  np.testing.assert_allclose(np.asarray(model.image_features(images)), pooled.numpy(), atol=ATOL)


def test_text_pools_at_the_last_position(checkpoints):
  """Every token counts (bidirectional attention) and the pooled state is the last one's: a
  change at position 0 moves the embedding; shorter ids pool at their own last token."""
  directory, hf_model = checkpoints["odd"]
  model = load_siglip(directory)
  _, ids = _inputs(hf_model)
  encode = jax.jit(lambda m, x: m.encode_text(x))
  changed = ids.copy()
  changed[:, 0] = (changed[:, 0] + 1) % 99
  assert np.abs(np.asarray(encode(model, changed)) - np.asarray(encode(model, ids))).min() > 1e-4
  with torch.no_grad():
    theirs = hf_model.get_text_features(input_ids=torch.from_numpy(ids[:, :7])).pooler_output
  np.testing.assert_allclose(np.asarray(encode(model, ids[:, :7])), theirs.numpy(), atol=ATOL)


def test_export_round_trip_through_transformers(checkpoints, tmp_path):
  """save_siglip -> SiglipModel.from_pretrained gives the same logits; its tensors are the
  original checkpoint's bit for bit, and glajax reads back the same parameters."""
  directory, hf_model = checkpoints["odd"]
  model = load_siglip(directory)
  saved = save_siglip(model, tmp_path / "export")
  assert sorted(os.listdir(saved)) == [".glajax-export", "config.json", "model.safetensors"]
  original = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  written = safetensors.numpy.load_file(os.path.join(saved, "model.safetensors"))
  assert set(written) == set(original)
  for key in original:
    np.testing.assert_array_equal(written[key], original[key], err_msg=key)
  reloaded = transformers.SiglipModel.from_pretrained(saved).eval()
  images, ids = _inputs(hf_model, seed=1)
  np.testing.assert_allclose(_hf_outputs(reloaded, images, ids)[2],
                             np.asarray(_glajax_outputs(model, images, ids)[2]), atol=ATOL)
  again = load_siglip(saved)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(again, nnx.Param)),
               jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def _write(directory, config: dict, tensors: dict) -> str:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"))
  return str(directory)


def test_missing_unexpected_and_misshapen_tensors_are_named(checkpoints, tmp_path):
  directory, _ = checkpoints["odd"]
  config = json.load(open(os.path.join(directory, "config.json")))
  tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  del tensors["vision_model.head.probe"]
  tensors["text_model.extra.weight"] = np.zeros(3, np.float32)
  tensors["logit_bias"] = np.zeros(2, np.float32)
  broken = _write(tmp_path / "broken", config, tensors)
  with pytest.raises(CheckpointError) as error:
    load_siglip(broken)
  message = str(error.value)
  assert "3 problems" in message and "missing tensor vision_model.head.probe" in message
  assert "unexpected tensor text_model.extra.weight" in message
  assert "logit_bias: expected shape ()" in message


@pytest.mark.parametrize("change, match", [
    ({"model_type": "siglip2"}, "siglip2.*NaFlex"),
    ({"vision_config": {"vision_use_head": False}}, "vision_use_head"),
    ({"text_config": {"projection_size": 20}}, "projection_size.*36"),
])
def test_configs_glajax_does_not_read_are_refused_before_the_weights(checkpoints, tmp_path,
                                                                     change, match):
  directory, _ = checkpoints["odd"]
  config = json.load(open(os.path.join(directory, "config.json")))
  for key, value in change.items():
    config[key] = {**config[key], **value} if isinstance(value, dict) else value
  os.makedirs(tmp_path / "ckpt")
  with open(tmp_path / "ckpt" / "config.json", "w") as f:
    json.dump(config, f)   # no weights: refused on its config alone
  with pytest.raises(CheckpointError, match=match):
    load_siglip(str(tmp_path / "ckpt"))


def test_a_clip_checkpoint_is_refused_by_name(tmp_path):
  torch.manual_seed(0)
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8),
      vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2), projection_dim=8))
  clip.save_pretrained(tmp_path / "clip")
  with pytest.raises(CheckpointError, match="not a SigLIP checkpoint.*model_type 'clip'"):
    load_siglip(str(tmp_path / "clip"))
  assert registry.locate(str(tmp_path / "clip"))[0].name == "clip"


def test_loader_options(checkpoints):
  directory, _ = checkpoints["odd"]
  with pytest.raises(ConfigError, match="options.*siglip.*adapter_dim"):
    glajax.load_model(directory, adapter_dim=4)
  model = glajax.load_model(directory, image_size=36, remat="block", attention="xla")
  assert model.config.vision.image_size == 36 and model.config.vision.remat == "block"
  assert model.vision_model.position_embedding.embedding.shape == (36, 36)
  assert model.encode_image(np.zeros((1, 36, 36, 3), np.float32)).shape == (1, 36)

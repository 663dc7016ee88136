"""Parity of glajax's CLIP with transformers' PyTorch CLIPModel, through HF checkpoints.

Each checkpoint is a tiny random CLIP built and saved with transformers in the test itself.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from glajax import CheckpointError, GlajaxError, InputError  # noqa: E402
from glajax.models.clip import checkpoint as clip_checkpoint  # noqa: E402
from glajax.models.clip import CLIP, CLIPConfig  # noqa: E402
from glajax.models.clip import load_clip, save_clip  # noqa: E402

ATOL = 1e-5

# name -> (transformers CLIPConfig kwargs, save_pretrained kwargs or "torch.save")
CHECKPOINTS = {
    # odd sizes: image 30, patch 6, hidden 36, 3 heads; safetensors
    "quick_gelu_odd": (dict(
        text_config=dict(vocab_size=99, hidden_size=36, intermediate_size=50, num_hidden_layers=2,
                         num_attention_heads=3, max_position_embeddings=12, eos_token_id=98,
                         bos_token_id=97, pad_token_id=0),
        vision_config=dict(image_size=30, patch_size=6, hidden_size=36, intermediate_size=50,
                           num_hidden_layers=2, num_attention_heads=3),
        projection_dim=20, logit_scale_init_value=2.3), {}),
    # gelu, towers of different widths, legacy eos_token_id == 2; pytorch_model.bin (written
    # with torch.save: transformers 5's save_pretrained writes safetensors only)
    "gelu_legacy_eos_bin": (dict(
        text_config=dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=10, hidden_act="gelu",
                         eos_token_id=2, bos_token_id=1, pad_token_id=0),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=4, hidden_act="gelu"),
        projection_dim=12), "torch.save"),
    # sharded safetensors (model.safetensors.index.json + shards)
    "sharded": (dict(
        text_config=dict(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, eos_token_id=79,
                         bos_token_id=78, pad_token_id=0),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=8), dict(max_shard_size="10KB")),
}


def _hf_model(name: str, seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(**CHECKPOINTS[name][0])
  return transformers.CLIPModel(config).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, transformers model)."""
  out = {}
  for name, (_, save_kwargs) in CHECKPOINTS.items():
    model = _hf_model(name)
    directory = str(tmp_path_factory.mktemp(name))
    if save_kwargs == "torch.save":
      model.save_pretrained(directory)
      os.remove(os.path.join(directory, "model.safetensors"))
      torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    else:
      model.save_pretrained(directory, **save_kwargs)
    out[name] = directory, model
  return out


def _inputs(hf_model, seed=0):
  """Images (B, H, W, 3) and a text batch with padding after EOS (and ids above EOS for legacy)."""
  cfg = hf_model.config
  size = cfg.vision_config.image_size
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(3, size, size, 3)).astype(np.float32)
  text = cfg.text_config
  eos, length = text.eos_token_id, text.max_position_embeddings
  words = [w for w in range(3, text.vocab_size) if w != eos]
  ids = np.zeros((4, length), np.int64)
  for row, n in enumerate([1, 3, length - 2, 5]):
    ids[row, 0] = text.bos_token_id
    ids[row, 1:1 + n] = rng.choice(words, size=n)
    ids[row, 1 + n] = eos
  return images, ids


def _hf_outputs(hf_model, images, ids):
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(ids),
                   pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return (out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy())


_image = jax.jit(lambda model, images: model.encode_image(images))


@jax.jit
def _glajax_outputs(model, images, ids):
  normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return (normalise(model.encode_image(images)), normalise(model.encode_text(ids)),
          model(images, ids))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_parity_with_transformers(checkpoints, name):
  directory, hf_model = checkpoints[name]
  files = set(os.listdir(directory))
  assert {"quick_gelu_odd": "model.safetensors", "gelu_legacy_eos_bin": "pytorch_model.bin",
          "sharded": "model.safetensors.index.json"}[name] in files
  model = load_clip(directory)
  images, ids = _inputs(hf_model)
  for ours, theirs, what in zip(_glajax_outputs(model, images, ids),
                                _hf_outputs(hf_model, images, ids),
                                ("image embeddings", "text embeddings", "logits_per_image")):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL, rtol=0, err_msg=what)


def test_layer_by_layer(checkpoints):
  """Embeddings, then the first block, then the pooled features of each tower."""
  directory, hf_model = checkpoints["quick_gelu_odd"]
  model = load_clip(directory)
  images, ids = _inputs(hf_model)
  with torch.no_grad():
    vis = hf_model.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                output_hidden_states=True)
    txt = hf_model.text_model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
  ours = _layers(model, images, ids)
  with torch.no_grad():
    embeddings = hf_model.vision_model.embeddings(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  for name, theirs in (("vision embeddings", embeddings.numpy()),
                       ("vision pre-LN", vis.hidden_states[0].numpy()),
                       ("vision block 0", vis.hidden_states[1].numpy()),
                       ("vision pooled", vis.pooler_output.numpy()),
                       ("text embeddings", txt.hidden_states[0].numpy()),
                       ("text block 0 (causal)", txt.hidden_states[1].numpy()),
                       ("text pooled", txt.pooler_output.numpy())):
    np.testing.assert_allclose(ours[name], theirs, atol=ATOL, err_msg=name)


@jax.jit
def _layers(model, images, ids):
  v, t = model.vision_model, model.text_model
  h0 = v.pre_layernorm(v.embed(images))
  e0 = t.token_embedding(ids) + t.position_embedding.embedding[:ids.shape[1]]
  return {"vision embeddings": v.embed(images), "vision pre-LN": h0,
          "vision block 0": v.layers.block(0)(h0), "vision pooled": v(images),
          "text embeddings": e0, "text block 0 (causal)": t.layers.block(0)(e0),
          "text pooled": t(ids)}


def test_legacy_eos_pools_at_argmax(checkpoints):
  """eos_token_id == 2: the pooled token is the largest id, not the first 2 (as transformers)."""
  directory, hf_model = checkpoints["gelu_legacy_eos_bin"]
  model = load_clip(directory)
  assert model.config.text.eos_token_id == 2
  ids = np.array([[1, 2, 63, 5, 0, 0], [1, 7, 2, 9, 40, 0]])
  with torch.no_grad():
    theirs = hf_model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
  ours = np.asarray(jax.jit(lambda m, x: m.encode_text(x))(model, ids))
  np.testing.assert_allclose(ours, theirs, atol=ATOL)
  with torch.no_grad():  # pooling at the first 2 instead would give something else
    at_first_2 = hf_model.text_projection(hf_model.text_model(
        input_ids=torch.from_numpy(ids)).last_hidden_state[[0, 1], [1, 2]]).numpy()
  assert np.abs(at_first_2 - theirs).max() > 1e-3


def test_save_clip_round_trip_through_transformers(checkpoints, tmp_path):
  directory, hf_model = checkpoints["quick_gelu_odd"]
  model = load_clip(directory)
  saved = save_clip(model, tmp_path / "export")
  assert sorted(os.listdir(saved)) == [".glajax-export", "config.json", "model.safetensors"]
  reloaded = transformers.CLIPModel.from_pretrained(saved).eval()
  images, ids = _inputs(hf_model, seed=1)
  np.testing.assert_allclose(_hf_outputs(reloaded, images, ids)[2],
                             np.asarray(_glajax_outputs(model, images, ids)[2]), atol=ATOL)
  # and the exact same parameters back through glajax
  again = load_clip(saved)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(jax.tree.map(
      np.asarray, jax.device_get(_params(model)))), jax.tree.leaves(_params(again)))


def _params(model):
  from flax import nnx
  return nnx.state(model, nnx.Param)


def test_save_clip_overwrites_atomically(checkpoints, tmp_path, monkeypatch):
  directory, _ = checkpoints["sharded"]
  model = load_clip(directory)
  target = tmp_path / "ckpt"
  save_clip(model, target)
  before = (target / "model.safetensors").read_bytes()

  def crash(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(clip_checkpoint, "save_file", crash)  # as checkpoint.py imported it
  with pytest.raises(CheckpointError, match="directory: .*disk full"):
    save_clip(model, target)
  assert (target / "model.safetensors").read_bytes() == before  # old checkpoint untouched
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
  monkeypatch.undo()
  save_clip(model, target)  # overwriting an existing checkpoint works
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def _tree(root):
  """{relative path: (mode, bytes)} of every file and folder under ``root``."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      data = open(path, "rb").read() if os.path.isfile(path) else None
      out[os.path.relpath(path, root)] = (os.stat(path).st_mode, data)
  return out


def test_save_clip_never_removes_what_glajax_did_not_write(checkpoints, tmp_path, monkeypatch):
  directory, _ = checkpoints["quick_gelu_odd"]
  model = load_clip(directory)
  cwd = tmp_path / "work" / "cwd"
  cwd.mkdir(parents=True)
  (cwd / "notes.txt").write_text("mine")
  monkeypatch.chdir(cwd)
  target = tmp_path / "work" / "mixed"
  target.mkdir()
  (target / "notes.txt").write_text("keep me")
  (target / "config.json").write_text("{}")
  (target / "runs").mkdir()
  before = _tree(tmp_path)
  for args, kwargs, match in (
      ((model, target), {}, "directory: .*new or empty directory.*notes.txt"),
      ((model, target), {"overwrite": True}, "directory: .*never removed.*notes.txt"),
      ((model, ""), {}, "directory: expected a non-empty directory path"),
      ((model, "."), {}, "directory: .*current directory"),
      ((model, ".."), {}, "directory: .*current directory and its parents"),
      ((model, str(tmp_path)), {"overwrite": True}, "directory: .*current directory"),
      ((model, target / "notes.txt"), {}, "directory: expected a directory path"),
      ((model, target / "notes.txt" / "sub"), {}, "directory: .*under the file .*notes.txt"),
  ):
    with pytest.raises(GlajaxError, match=match):
      save_clip(*args, **kwargs)
    assert _tree(tmp_path) == before, (args[1], kwargs)


def test_save_clip_replaces_exports_and_honours_the_umask(checkpoints, tmp_path):
  directory, _ = checkpoints["quick_gelu_odd"]
  model = load_clip(directory)
  old_mask = os.umask(0o027)
  try:
    target = save_clip(model, tmp_path / "export", extra_files={"head.npz": b"npz", "a.txt": "x"})
  finally:
    os.umask(old_mask)
  assert oct(os.stat(target).st_mode & 0o777) == oct(0o750)  # not mkdtemp's 0700
  assert oct(os.stat(os.path.join(target, "model.safetensors")).st_mode & 0o777) == oct(0o640)
  marker = json.load(open(os.path.join(target, ".glajax-export")))
  assert marker["files"] == ["a.txt", "config.json", "head.npz", "model.safetensors"]
  save_clip(model, target)  # glajax's own export (head.npz listed in its marker) is replaced
  assert sorted(os.listdir(target)) == [".glajax-export", "config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["export"]
  # A checkpoint glajax did not write (transformers' save_pretrained): only with overwrite=True.
  foreign = tmp_path / "hf"
  transformers.CLIPModel(transformers.CLIPConfig(**CHECKPOINTS["quick_gelu_odd"][0])
                         ).save_pretrained(foreign)
  with pytest.raises(CheckpointError, match="overwrite=True"):
    save_clip(model, foreign)
  save_clip(model, foreign, overwrite=True)
  np.testing.assert_array_equal(_params(load_clip(foreign))["logit_scale"][...],
                                _params(model)["logit_scale"][...])
  empty = tmp_path / "empty"
  empty.mkdir()
  save_clip(model, empty)  # an empty directory holds nothing to lose
  with pytest.raises(InputError, match="extra_files"):
    save_clip(model, tmp_path / "x", extra_files={"../escape": b""})


def test_non_finite_weights_are_neither_loaded_nor_exported(checkpoints, tmp_path):
  directory, _ = checkpoints["quick_gelu_odd"]
  tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  tensors["vision_model.encoder.layers.1.mlp.fc2.weight"][0, 0] = np.nan
  tensors["text_projection.weight"][:] = np.inf
  (tmp_path / "nan").mkdir()
  safetensors.numpy.save_file(tensors, tmp_path / "nan" / "model.safetensors")
  (tmp_path / "nan" / "config.json").write_bytes(
      open(os.path.join(directory, "config.json"), "rb").read())
  with pytest.raises(CheckpointError, match="checkpoint: expected finite weights.*2 tensors.*"
                     "vision_model.encoder.layers.1.mlp.fc2.weight \\(1 of"):
    load_clip(tmp_path / "nan")
  model = load_clip(directory)
  model.text_projection.kernel[...] = jnp.full_like(model.text_projection.kernel[...], jnp.nan)
  with pytest.raises(InputError, match="model: expected finite weights.*text_projection.weight"):
    save_clip(model, tmp_path / "export")
  assert not (tmp_path / "export").exists()


def test_adapters_saved_beside_and_restored(checkpoints, tmp_path):
  directory, hf_model = checkpoints["quick_gelu_odd"]
  base = load_clip(directory)
  model = load_clip(directory, adapter_dim=4)
  images, ids = _inputs(hf_model)
  np.testing.assert_allclose(_image(model, images), _image(base, images), atol=1e-6)
  up = model.vision_model.layers.adapter.up.kernel   # every block's, stacked: block 1's
  up[1] = jnp.asarray(np.random.default_rng(0).normal(size=up.shape[1:]), jnp.float32)
  assert np.abs(_image(model, images) - _image(base, images)).max() > 1e-3
  save_clip(model, tmp_path / "with_adapters")
  restored = load_clip(tmp_path / "with_adapters")
  assert restored.config.vision.adapter_dim == 4
  np.testing.assert_array_equal(_image(restored, images), _image(model, images))
  # transformers reads the base weights and ignores the adapter file
  hf_again = transformers.CLIPModel.from_pretrained(tmp_path / "with_adapters").eval()
  np.testing.assert_allclose(_hf_outputs(hf_again, images, ids)[0],
                             _hf_outputs(hf_model, images, ids)[0], atol=1e-6)


def test_image_size_interpolates_position_embeddings(checkpoints):
  """load_clip(image_size=...) vs transformers' interpolate_pos_encoding (torch bicubic, a=-0.75).

  jax.image.resize's bicubic uses Keys a=-0.5, so the two agree loosely, not to 1e-5.
  """
  directory, hf_model = checkpoints["quick_gelu_odd"]
  model = load_clip(directory, image_size=42)
  assert model.config.vision.image_size == 42
  assert model.vision_model.position_embedding.embedding.shape == (1 + 7 * 7, 36)
  images = np.random.default_rng(0).normal(size=(2, 42, 42, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = hf_model.get_image_features(pixel_values=torch.from_numpy(
        images.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True).pooler_output.numpy()
  ours = np.asarray(jax.jit(lambda m, x: m.encode_image(x))(model, images))
  cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
  assert cos.min() > 0.99, cos


def test_bfloat16_compute_agrees_loosely(checkpoints):
  directory, hf_model = checkpoints["quick_gelu_odd"]
  model = load_clip(directory, dtype=jnp.bfloat16)
  assert model.visual_projection.kernel.dtype == jnp.float32  # params stay float32
  images, ids = _inputs(hf_model)
  logits = _glajax_outputs(model, images, ids)[2]
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), _hf_outputs(hf_model, images, ids)[2],
                             atol=0.08)  # measured 0.023 (|logits| <= 3); bfloat16 has 8 bits


def test_config_json_matches_transformers_defaults(tmp_path):
  """A config.json that leaves defaults out reads as transformers reads it."""
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  assert CLIPConfig.from_hf(tmp_path) == CLIPConfig.vit_b32()
  for preset in (CLIPConfig.vit_b16(), CLIPConfig.vit_l14_336()):
    theirs = transformers.CLIPConfig(**preset.to_hf())
    assert CLIPConfig.from_hf(theirs.to_dict()) == CLIPConfig.from_hf(theirs) == preset


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match="no such directory"):
    load_clip(tmp_path / "nope")


def test_uncached_hub_id_offline():
  with pytest.raises(CheckpointError, match="glajax-test/not-a-repo"):
    load_clip("glajax-test/not-a-repo")


def test_hub_id_from_the_offline_cache(checkpoints, tmp_path, monkeypatch):
  """A hub id resolves through huggingface_hub's cache (HF_HUB_OFFLINE=1 in conftest)."""
  import huggingface_hub.constants
  directory, hf_model = checkpoints["quick_gelu_odd"]
  repo = tmp_path / "models--glajax-test--tiny-clip"
  snapshot = repo / "snapshots" / ("0" * 40)
  snapshot.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  for name in os.listdir(directory):
    (snapshot / name).write_bytes(open(os.path.join(directory, name), "rb").read())
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  model = load_clip("glajax-test/tiny-clip")
  images, ids = _inputs(hf_model)
  np.testing.assert_allclose(_glajax_outputs(model, images, ids)[2],
                             _hf_outputs(hf_model, images, ids)[2], atol=ATOL)


def test_directory_without_weights(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(CLIPConfig.tiny().to_hf()))
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_clip(tmp_path)


def test_non_clip_checkpoint(tmp_path):
  bert = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=8)
  bert.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="not a CLIP checkpoint.*bert"):
    load_clip(tmp_path)


def test_truncated_safetensors(checkpoints, tmp_path):
  directory, _ = checkpoints["quick_gelu_odd"]
  for name in ("config.json", "model.safetensors"):
    data = open(os.path.join(directory, name), "rb").read()
    (tmp_path / name).write_bytes(data[:len(data) // 2] if name.endswith("tensors") else data)
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_clip(tmp_path)


def test_wrong_shapes_reported_together(checkpoints, tmp_path):
  directory, _ = checkpoints["quick_gelu_odd"]
  tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  tensors["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((51, 36), np.float32)
  tensors["visual_projection.weight"] = np.zeros((20, 35), np.float32)
  del tensors["vision_model.post_layernorm.bias"]
  tensors["vision_model.extra.weight"] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_bytes(open(os.path.join(directory, "config.json"), "rb").read())
  with pytest.raises(CheckpointError) as info:
    load_clip(tmp_path)
  message = str(info.value)
  assert "4 problems" in message
  for part in ("text_model.encoder.layers.1.mlp.fc1.weight: expected shape (36, 50)",
               "visual_projection.weight: expected shape (36, 20)",
               "missing tensor vision_model.post_layernorm.bias",
               "unexpected tensor vision_model.extra.weight"):
    assert part in message


@pytest.mark.parametrize("shape, dtype, match", [((30, 30, 3), np.float32, "rank-4"),
                                                 ((2, 3, 30, 30), np.float32, "channels-first"),
                                                 ((2, 32, 32, 3), np.float32, "30x30"),
                                                 ((2, 30, 30, 3), np.uint8, "floating-point")])
def test_bad_images(checkpoints, shape, dtype, match):
  model = load_clip(checkpoints["quick_gelu_odd"][0])
  with pytest.raises(InputError, match=f"images.*{match}"):
    model.encode_image(np.zeros(shape, dtype))
  assert issubclass(InputError, GlajaxError)


# ---------------------------------------------------------------------------------------------
# Real-size architectures (random weights, batch 1)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["vit_b16", "vit_l14"])
def test_real_size_matches_transformers(preset):
  config = getattr(CLIPConfig, preset)()
  torch.manual_seed(0)
  hf_model = transformers.CLIPModel(transformers.CLIPConfig(**config.to_hf())).eval()
  tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  model = clip_checkpoint.from_tensors(config, tensors)
  del tensors
  images, ids = _inputs(hf_model)
  images, ids = images[:1], np.array([[49406, 320, 1125, 539, 320, 2368, 269, 49407] + [0] * 69])
  ours = [np.asarray(x) for x in _glajax_outputs(model, images, ids)]
  theirs = _hf_outputs(hf_model, images, ids)
  # 1e-4 relative to each output's scale: the largest embedding entry, and for the (1, 1) logits
  # the largest logit possible, exp(logit_scale) (a random model's cosine is near 0).
  scales = (np.abs(theirs[0]).max(), np.abs(theirs[1]).max(), np.exp(config.logit_scale_init_value))
  for a, b, scale, what in zip(ours, theirs, scales, ("image", "text", "logits")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=what)
  assert isinstance(model, CLIP)

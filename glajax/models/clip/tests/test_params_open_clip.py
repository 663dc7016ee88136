"""Parity of glajax's CLIP (ViT and ModifiedResNet) with open_clip 3.3.0's PyTorch CLIP, through
open_clip-format directories (safetensors and .bin) and OpenAI-style TorchScript ``.pt`` files.

Each checkpoint is a small random open_clip model built in the test, its BatchNorm statistics and
affine parameters randomised (so that BatchNorm in eval mode is exercised), saved in the format.
The reference is the installed open_clip code (``open_clip_reference``), float32, eval mode.
"""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax.models.clip.tests import open_clip_reference
from glajax import CheckpointError
from glajax.models import checkpoints, registry
from glajax.models.clip import CLIP, CLIPConfig, load_clip, save_clip
from glajax.models.clip import params_open_clip

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

# name -> (open_clip model_cfg, how it is saved)
RN = {"embed_dim": 24, "quick_gelu": True,
      "vision_cfg": {"image_size": 64, "layers": [2, 1, 1, 1], "width": 8, "head_width": 32,
                     "patch_size": None},
      "text_cfg": {"context_length": 12, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2}}
CHECKPOINTS = {
    # two blocks in stage 1 (an identity shortcut), grid 2x2, 8 pooling heads, QuickGELU text
    "rn_quickgelu": (RN, "safetensors"),
    # odd widths: stem 3 channels, grid 3x3, 3 pooling heads; GELU text; 11 text tokens
    "rn_gelu_odd": ({"embed_dim": 20,
                     "vision_cfg": {"image_size": 96, "layers": [1, 1, 2, 1], "width": 6,
                                    "head_width": 64},
                     "text_cfg": {"context_length": 11, "vocab_size": 80, "width": 24,
                                  "heads": 2, "layers": 1}}, "bin"),
    # a QuickGELU ViT (open_clip's -quickgelu models) with 3 heads of 16 and mlp_ratio 2
    "vit_quickgelu": ({"embed_dim": 16, "quick_gelu": True,
                       "vision_cfg": {"image_size": 32, "layers": 2, "width": 48,
                                      "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
                       "text_cfg": {"context_length": 10, "vocab_size": 90, "width": 32,
                                    "heads": 4, "layers": 2}}, "safetensors"),
    "vit_gelu": ({"embed_dim": 16,
                  "vision_cfg": {"image_size": 24, "layers": 1, "width": 32, "head_width": 16,
                                 "patch_size": 6},
                  "text_cfg": {"context_length": 9, "vocab_size": 70, "width": 16, "heads": 2,
                               "layers": 1}}, "bin"),
    # OpenAI's TorchScript archives: QuickGELU, heads = width / 64, fp16 weights
    # (convert_weights), as build_model reads them
    "rn_openai_pt": ({"embed_dim": 32, "quick_gelu": True,
                      "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8},
                      "text_cfg": {"context_length": 10, "vocab_size": 90, "width": 64,
                                   "heads": 1, "layers": 2}}, "pt"),
    "vit_openai_pt": ({"embed_dim": 32, "quick_gelu": True,
                       "vision_cfg": {"image_size": 32, "layers": 2, "width": 128,
                                      "patch_size": 16},
                       "text_cfg": {"context_length": 10, "vocab_size": 90, "width": 64,
                                    "heads": 1, "layers": 1}}, "pt"),
}


def _torch_model(model_cfg, seed=0):
  """A random open_clip CLIP in eval mode with non-trivial BatchNorm statistics and scales."""
  open_clip = open_clip_reference.load()
  torch.manual_seed(seed)
  model = open_clip.CLIP(**model_cfg).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.normal_(1.0, 0.3)  # OpenAI initialises each bn3 to 0
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  return model


def _write(model, model_cfg, how, directory):
  """Saves ``model`` in format ``how``; returns the path load_clip takes and the float32 model
  whose outputs are the reference (for .pt: the fp16-rounded weights, as OpenAI ships them)."""
  os.makedirs(directory, exist_ok=True)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if how == "pt":
    open_clip = open_clip_reference.load()
    half = copy.deepcopy(model)
    open_clip.convert_weights_to_lp(half, torch.float16)
    path = os.path.join(directory, "model.pt")
    torch.jit.save(torch.jit.script(half), path)
    return path, half.float().eval()
  with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275,
                                                                    0.40821073]}}, f)
  if how == "safetensors":
    safetensors_torch.save_file(state, os.path.join(directory, "open_clip_model.safetensors"))
  else:
    torch.save(state, os.path.join(directory, "open_clip_pytorch_model.bin"))
  return directory, model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (path, reference torch model, model_cfg)."""
  out = {}
  for name, (model_cfg, how) in CHECKPOINTS.items():
    path, reference = _write(_torch_model(model_cfg), model_cfg, how,
                             str(tmp_path_factory.mktemp(name)))
    out[name] = path, reference, model_cfg
  return out


def _inputs(model_cfg, seed=0):
  """NHWC images and CLIP-tokenizer-like ids: BOS, words, EOS = vocab − 1 (the largest id, where
  open_clip's argmax pools), zero padding."""
  rng = np.random.default_rng(seed)
  size = model_cfg["vision_cfg"]["image_size"]
  images = rng.normal(size=(3, size, size, 3)).astype(np.float32)
  vocab, length = model_cfg["text_cfg"]["vocab_size"], model_cfg["text_cfg"]["context_length"]
  ids = np.zeros((4, length), np.int64)
  for row, n in enumerate([0, 2, length - 2, 5]):
    ids[row, 0] = vocab - 2
    ids[row, 1:1 + n] = rng.integers(1, vocab - 2, size=n)
    ids[row, 1 + n] = vocab - 1
  return images, ids


def _torch_outputs(model, images, ids):
  x, t = torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(ids)
  with torch.no_grad():
    return (model.encode_image(x).numpy(), model.encode_text(t).numpy(),
            model.get_logits(x, t)[0].numpy())


@jax.jit
def _outputs(model, images, ids):
  return model.encode_image(images), model.encode_text(ids), model(images, ids)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_parity_with_open_clip(saved, name):
  path, reference, model_cfg = saved[name]
  model = load_clip(path)
  assert model.config.resnet == isinstance(model_cfg["vision_cfg"]["layers"], list)
  expected_act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
  assert model.config.text.hidden_act == expected_act
  images, ids = _inputs(model_cfg)
  theirs = _torch_outputs(reference, images, ids)
  for ours, theirs, what in zip(_outputs(model, images, ids), theirs,
                                ("encode_image", "encode_text", "logits_per_image")):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL, rtol=0, err_msg=what)


@jax.jit
def _resnet_steps(model, images):
  v = model.vision_model
  stem = v.stem(images)
  first = v.layer1[0](stem)
  trunk = v.trunk(images)
  return {"stem": stem, "layer1.0": first, "trunk": trunk, "attention pool": v.features(images),
          "image_features": model.image_features(images),
          "encode_image": model.encode_image(images)}


def test_resnet_step_by_step(saved):
  """Stem, first block, the four stages, the attention pool before and after c_proj."""
  path, reference, model_cfg = saved["rn_quickgelu"]
  model = load_clip(path)
  images, _ = _inputs(model_cfg)
  visual = reference.visual
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    stem = visual.stem(x)
    trunk = visual.layer4(visual.layer3(visual.layer2(visual.layer1(stem))))
    pooled = _attention_pool_before_c_proj(visual.attnpool, trunk)
    theirs = {"stem": nhwc(stem), "layer1.0": nhwc(visual.layer1[0](stem)), "trunk": nhwc(trunk),
              "attention pool": pooled.numpy(), "image_features": pooled.numpy(),
              "encode_image": visual(x).numpy()}
  ours = _resnet_steps(model, images)
  for name, value in theirs.items():
    np.testing.assert_allclose(np.asarray(ours[name]), value, atol=ATOL, rtol=0, err_msg=name)
  # the projection the interface names is c_proj: features · W_v + b = encode_image
  kernel, bias = model.image_projection_kernel(), model.vision_model.attnpool.c_proj.bias[...]
  np.testing.assert_allclose(np.asarray(ours["image_features"] @ kernel + bias),
                             theirs["encode_image"], atol=ATOL)
  np.testing.assert_array_equal(np.asarray(kernel),
                                visual.attnpool.c_proj.weight.detach().numpy().T)


def _attention_pool_before_c_proj(pool, x):
  """open_clip's AttentionPool2d.forward with an identity output projection."""
  x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)
  x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :]
  width = x.shape[-1]
  out, _ = torch.nn.functional.multi_head_attention_forward(
      query=x[:1], key=x, value=x, embed_dim_to_check=width, num_heads=pool.num_heads,
      q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
      v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
      in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
      bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
      out_proj_weight=torch.eye(width), out_proj_bias=torch.zeros(width),
      use_separate_proj_weight=True, training=False, need_weights=False)
  return out[0]


@jax.jit
def _vit_steps(model, images, ids):
  v, t = model.vision_model, model.text_model
  h0 = v.pre_layernorm(v.embed(images))
  e0 = t.token_embedding(ids) + t.position_embedding.embedding[:ids.shape[1]]
  return {"vision embeddings + ln_pre": h0, "vision block 0": v.layers.block(0)(h0),
          "text embeddings": e0, "text block 0 (causal)": t.layers.block(0)(e0)}


def test_vit_step_by_step(saved):
  path, reference, model_cfg = saved["vit_quickgelu"]
  model = load_clip(path)
  images, ids = _inputs(model_cfg)
  with torch.no_grad():
    h0 = reference.visual._embeds(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    e0 = reference.token_embedding(torch.from_numpy(ids)) + reference.positional_embedding
    theirs = {"vision embeddings + ln_pre": h0.numpy(),
              "vision block 0": reference.visual.transformer.resblocks[0](h0).numpy(),
              "text embeddings": e0.numpy(),
              "text block 0 (causal)": reference.transformer.resblocks[0](
                  e0, attn_mask=reference.attn_mask).numpy()}
  ours = _vit_steps(model, images, ids)
  for name, value in theirs.items():
    np.testing.assert_allclose(np.asarray(ours[name]), value, atol=ATOL, rtol=0, err_msg=name)


def test_batch_norm_train_mode_normalises_with_batch_statistics(saved):
  """``model.train()``: BatchNorm normalises with the batch's statistics, as torch's train mode
  (biased variance); the default is eval mode (running statistics)."""
  path, reference, model_cfg = saved["rn_quickgelu"]
  model = load_clip(path)
  assert model.vision_model.bn1.use_running_average
  images, _ = _inputs(model_cfg, seed=3)
  with torch.no_grad():
    theirs = copy.deepcopy(reference).train().encode_image(
        torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  model.train()
  graphdef, state = nnx.split(model)
  ours = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))(state, images)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL)
  model.eval()
  eval_mode = np.asarray(_outputs(model, images, _inputs(model_cfg)[1])[0])
  assert np.abs(eval_mode - theirs).max() > 1e-3   # running statistics give something else


def test_resnet_computes_in_bfloat16(saved):
  """The recipes' bfloat16 compute (float32 parameters and statistics) on a ResNet: within
  bfloat16's precision of float32."""
  path, _, model_cfg = saved["rn_quickgelu"]
  images, ids = _inputs(model_cfg)
  model = load_clip(path, dtype=jnp.bfloat16)
  assert model.vision_model.bn1.mean[...].dtype == model.vision_model.conv1.kernel[...].dtype == (
      jnp.float32)
  ours = np.asarray(_outputs(model, images, ids)[0])
  want = np.asarray(_outputs(load_clip(path), images, ids)[0])
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, want, atol=0.05 * np.abs(want).max())


def _state(model):
  return {k: np.asarray(v) for k, v in checkpoints.host_params(
      model, (nnx.Param, nnx.BatchStat)).items()}


@pytest.mark.parametrize("name, fmt", [("rn_quickgelu", None), ("vit_quickgelu", "open_clip")])
def test_export_round_trips_through_open_clip(saved, name, fmt, tmp_path):
  """save_clip writes a ResNet in open_clip's format (a ViT on request): open_clip builds it from
  the exported config and loads the weights strictly; glajax reloads them bit for bit. Run-time
  options (remat, unroll) are not the architecture: the export leaves them out."""
  path, reference, model_cfg = saved[name]
  model = load_clip(path, remat="block", unroll=2)
  exported = save_clip(model, tmp_path / "export", format=fmt)
  assert sorted(os.listdir(exported)) == [".glajax-export", "open_clip_config.json",
                                          "open_clip_model.safetensors"]
  assert registry.locate(exported)[1] == "open_clip"
  with open(os.path.join(exported, "open_clip_config.json")) as f:
    config = json.load(f)
  open_clip = open_clip_reference.load()
  theirs = open_clip.CLIP(**config["model_cfg"]).eval()
  theirs.load_state_dict(safetensors_torch.load_file(
      os.path.join(exported, "open_clip_model.safetensors")), strict=True)
  images, ids = _inputs(model_cfg, seed=1)
  np.testing.assert_allclose(_torch_outputs(theirs, images, ids)[2],
                             _torch_outputs(reference, images, ids)[2], atol=ATOL, rtol=0)
  again = load_clip(exported, remat="block", unroll=2)
  assert again.config == model.config
  ours, back = _state(model), _state(again)
  assert ours.keys() == back.keys()
  for key in ours:
    np.testing.assert_array_equal(back[key], ours[key], err_msg=key)


def test_loading_names_missing_unexpected_and_misshapen_tensors(saved, tmp_path):
  _, reference, model_cfg = saved["rn_quickgelu"]
  state = {k: v.contiguous() for k, v in reference.state_dict().items()}
  del state["visual.layer1.1.bn2.running_var"]
  state["visual.extra.weight"] = torch.zeros(3)
  state["visual.attnpool.positional_embedding"] = torch.zeros(9, 256)
  directory = tmp_path / "broken"
  directory.mkdir()
  (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
  safetensors_torch.save_file(state, str(directory / "open_clip_model.safetensors"))
  with pytest.raises(CheckpointError) as error:
    load_clip(directory)
  message = str(error.value)
  assert "3 problems" in message
  assert "missing tensor visual.layer1.1.bn2.running_var" in message
  assert "unexpected tensor visual.extra.weight" in message
  assert "visual.attnpool.positional_embedding: expected shape (5, 256)" in message


# ------------------------------------------------------------------------------ real sizes

PUBLISHED = {  # open_clip 3.3.0 docs/model_profile.csv: mparams, image_mparams, text_mparams
    "rn50": (102.01, 38.32, 63.69), "rn101": (119.69, 56.26, 63.43),
    "rn50x4": (178.3, 87.14, 91.16), "rn50x16": (290.98, 167.33, 123.65),
    "rn50x64": (623.26, 420.38, 202.88)}


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_resnet_presets_have_the_published_sizes(preset):
  """The preset built with nnx.eval_shape has open_clip's parameter count exactly (its model
  config built on the meta device) and the published one to the 0.01 M it is printed with."""
  model = nnx.eval_shape(lambda: CLIP(getattr(CLIPConfig, preset)(), rngs=nnx.Rngs(0)))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))
  total, image = count(model), count(model.vision_model)
  published = PUBLISHED[preset]
  for ours, theirs in zip((total, image, total - image), published):
    assert abs(ours / 1e6 - theirs) <= 0.005 + 1e-9, (preset, ours, theirs)
  open_clip = open_clip_reference.load()
  name = preset.replace("rn", "RN") + "-quickgelu"   # OpenAI's are QuickGELU
  with open(os.path.join(os.path.dirname(open_clip.__file__), "model_configs",
                         f"{name}.json")) as f:
    model_cfg = json.load(f)
  with torch.device("meta"):
    theirs = open_clip.CLIP(**model_cfg)
  assert total == sum(p.numel() for p in theirs.parameters())
  assert image == sum(p.numel() for p in theirs.visual.parameters())
  assert params_open_clip.config_from_open_clip(model_cfg) == getattr(CLIPConfig, preset)()


@pytest.mark.slow
def test_rn50_parity_at_real_size(tmp_path):
  """open_clip's RN50 with random weights (224 px, 32 pooling heads), float32: the logits."""
  open_clip = open_clip_reference.load()
  with open(os.path.join(os.path.dirname(open_clip.__file__), "model_configs",
                         "RN50-quickgelu.json")) as f:
    model_cfg = json.load(f)
  path, reference = _write(_torch_model(model_cfg), model_cfg, "safetensors", str(tmp_path))
  model = load_clip(path)
  images, ids = _inputs(model_cfg)
  ours = _outputs(model, images[:2], ids)
  theirs = _torch_outputs(reference, images[:2], ids)
  for o, t, what in zip(ours, theirs, ("encode_image", "encode_text", "logits_per_image")):
    np.testing.assert_allclose(np.asarray(o), t, atol=ATOL, rtol=0, err_msg=what)

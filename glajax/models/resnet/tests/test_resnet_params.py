"""The ResNet checkpoint formats: transformers' ResNetForImageClassification (parity step by step
with random weights, tiny configs), timm hub folders and torchvision state-dict files (detection
through the registry, missing and unexpected tensors named, ``num_batches_tracked`` skipped), and
each family refusing the other's checkpoints."""
import json

import numpy as np
import pytest
import safetensors.torch
from flax import nnx

import glajax
from glajax import CheckpointError
from glajax.models import registry
from glajax.models.clip import CLIPConfig, init_clip, load_clip, save_clip
from glajax.models.resnet import load_resnet
from glajax.models.resnet.modeling import ResNetConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from glajax.models.resnet.tests import resnet_reference as ref  # noqa: E402

ATOL = 1e-5

HF_CONFIGS = {   # transformers ResNetConfig kwargs
    "bottleneck": dict(embedding_size=8, hidden_sizes=[16, 32, 32, 64], depths=[1, 2, 1, 1],
                       layer_type="bottleneck", num_labels=5),
    "basic": dict(embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[2, 1, 1, 1],
                  layer_type="basic", num_labels=3),
    "v1_stride_in_1x1": dict(embedding_size=8, hidden_sizes=[16, 32, 64], depths=[1, 1, 2],
                             layer_type="bottleneck", downsample_in_bottleneck=True,
                             num_labels=4),
}


def _images(n=2, size=35, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def hf_model(name, seed=0):
  """A transformers ResNetForImageClassification with random weights and BatchNorm statistics."""
  torch.manual_seed(seed)
  model = transformers.ResNetForImageClassification(transformers.ResNetConfig(**HF_CONFIGS[name]))
  return ref.randomise_batchnorm(model, seed).eval()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_transformers_parity_step_by_step(name, tmp_path):
  torch_model = hf_model(name)
  torch_model.save_pretrained(tmp_path)
  assert registry.locate(tmp_path) == (registry.FAMILIES["resnet"], "transformers")
  model = glajax.load_model(tmp_path)
  assert model.config.num_classes == HF_CONFIGS[name]["num_labels"] and model.config.labels is None
  images = _images()
  with torch.no_grad():
    out = torch_model(ref.nchw(images), output_hidden_states=True)
    inner = torch_model.resnet(ref.nchw(images))
  stem = nnx.jit(lambda m, x: m.stem(x))(model, images)
  np.testing.assert_allclose(stem, ref.nhwc(out.hidden_states[0]), atol=ATOL, rtol=0)
  h = stem
  for s, stage in enumerate(model.stages):   # every stage from the previous one's reference
    h = nnx.jit(ref.run_blocks)(stage, ref.nhwc(out.hidden_states[s]))
    np.testing.assert_allclose(h, ref.nhwc(out.hidden_states[s + 1]), atol=ATOL, rtol=0,
                               err_msg=f"stage {s}")
  features = nnx.jit(lambda m, x: m.encode_image(x))(model, images)
  np.testing.assert_allclose(features, inner.pooler_output.flatten(1).numpy(), atol=ATOL, rtol=0)
  logits = nnx.jit(lambda m, x: m(x))(model, images)
  np.testing.assert_allclose(logits, out.logits.numpy(), atol=ATOL, rtol=0)


def test_transformers_labels_and_processor(tmp_path):
  torch_model = hf_model("bottleneck")
  torch_model.config.id2label = {i: f"class {i}" for i in range(5)}
  torch_model.config.label2id = {f"class {i}": i for i in range(5)}
  torch_model.save_pretrained(tmp_path)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 160},
       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
  model = load_resnet(tmp_path)
  assert model.config.labels == tuple(f"class {i}" for i in range(5))
  assert model.spec.image_size == 160 and model.spec.mean == (0.5, 0.5, 0.5)


def _timm_folder(directory, architecture="resnet18", weights="model.safetensors", **config):
  """A timm hub folder of torchvision's ``architecture`` with random weights, its config.json
  laid out as timm/resnet50.tv_in1k's; returns the reference model."""
  torch_model = ref.build(*ref.ARCHITECTURES.get(architecture, ref.ARCHITECTURES["resnet18"]))
  directory.mkdir(exist_ok=True)
  (directory / "config.json").write_text(json.dumps({
      "architecture": architecture, "num_classes": 1000, "num_features": 512,
      "pretrained_cfg": {
          "tag": "tv_in1k", "custom_load": False, "input_size": [3, 224, 224],
          "fixed_input_size": False, "interpolation": "bilinear", "crop_pct": 0.875,
          "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
          "num_classes": 1000, "pool_size": [7, 7], "first_conv": "conv1", "classifier": "fc",
          "license": "bsd-3-clause", "origin_url": "https://github.com/pytorch/vision"},
      **config}))
  state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
  if weights.endswith(".safetensors"):
    safetensors.torch.save_file(state, directory / weights)
  else:
    torch.save(state, directory / weights)
  return torch_model


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_timm_folder(weights, tmp_path):
  """Real-size ResNet-18 in timm's hub layout (config.json + weights), e.g. timm/resnet18.tv_in1k."""
  torch_model = _timm_folder(tmp_path / "timm", weights=weights)
  assert registry.locate(tmp_path / "timm")[1] == "timm"
  model = glajax.load_model(tmp_path / "timm")
  assert model.config == ResNetConfig.preset("resnet18")
  images = _images(2, 64)
  with torch.no_grad():
    expected = torch_model(ref.nchw(images)).numpy()
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, images), expected, atol=ATOL,
                             rtol=0)


def test_timm_unknown_architecture_and_arguments_are_refused(tmp_path):
  for architecture in ("resnet50d", "vit_base_patch16_224"):
    folder = tmp_path / architecture
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": architecture}))
    with pytest.raises(CheckpointError, match=f"timm ResNet.*resnet50.*'{architecture}'"):
      glajax.load_model(folder)
  folder = tmp_path / "deep_stem"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"architecture": "resnet50",
                                                  "model_args": {"stem_type": "deep"}}))
  with pytest.raises(CheckpointError, match="model_args.*stem_type"):
    load_resnet(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  state = ref.build("bottleneck", (1, 1, 1, 1), widths=(4, 8, 8, 16), stem=8,
                    num_classes=3).state_dict()
  assert any(k.endswith("num_batches_tracked") for k in state)   # skipped, not unexpected
  del state["layer2.0.bn2.running_var"], state["layer3.0.downsample.0.weight"]
  state["layer1.0.extra.weight"] = torch.zeros(3)
  state["layer1.0.conv2.weight"] = torch.zeros(4, 4, 1, 1)
  path = tmp_path / "broken.pth"
  torch.save(state, path)
  with pytest.raises(CheckpointError) as error:
    load_resnet(path)
  message = str(error.value)
  for text in ("4 problems", "missing tensor layer2.0.bn2.running_var",
               "missing tensor layer3.0.downsample.0.weight",
               "unexpected tensor layer1.0.extra.weight (3,)",
               "layer1.0.conv2.weight: expected shape (3, 3, 4, 4)"):
    assert text in message, message


def test_each_family_refuses_the_others_checkpoints(tmp_path):
  clip_dir = save_clip(init_clip(CLIPConfig.tiny()), tmp_path / "clip")
  with pytest.raises(CheckpointError, match="not a ResNet checkpoint.*model_type 'clip'"):
    load_resnet(clip_dir)
  hf_model("basic").save_pretrained(tmp_path / "resnet")
  with pytest.raises(CheckpointError, match="not a CLIP checkpoint.*model_type 'resnet'"):
    load_clip(tmp_path / "resnet")
  torch.save({"model": torch.zeros(3)}, tmp_path / "other.pth")
  with pytest.raises(CheckpointError, match="glajax family.*the file .*other.pth"):
    glajax.load_model(tmp_path / "other.pth")
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(CheckpointError, match="directory or a .pth file.*weights.npz"):
    load_resnet(tmp_path / "weights.npz")
  with pytest.raises(CheckpointError, match="text tower.*resnet"):
    glajax.load_tokenizer(tmp_path / "resnet")


def _cache(tmp_path, monkeypatch, repo_id, source):
  """``source``'s files as the hub snapshot of ``repo_id`` in a fresh huggingface_hub cache
  (HF_HUB_OFFLINE=1 in conftest)."""
  import huggingface_hub.constants
  repo = tmp_path / "cache" / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / ("0" * 40)
  snapshot.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  for path in source.iterdir():
    (snapshot / path.name).write_bytes(path.read_bytes())
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))


def test_hub_ids_from_the_offline_cache(tmp_path, monkeypatch):
  """Hub ids resolve through huggingface_hub's cache: a timm repo with PyTorch weights, a
  transformers one with safetensors; an id in no cache and no format is named."""
  torch_model = _timm_folder(tmp_path / "timm", weights="pytorch_model.bin")
  _cache(tmp_path, monkeypatch, "glajax-test/resnet18.tv_in1k", tmp_path / "timm")
  hf = hf_model("basic")
  hf.save_pretrained(tmp_path / "hf")
  _cache(tmp_path, monkeypatch, "glajax-test/resnet-tiny", tmp_path / "hf")
  images = _images(2, 64)
  with torch.no_grad():
    expected = {"glajax-test/resnet18.tv_in1k": torch_model(ref.nchw(images)).numpy(),
                "glajax-test/resnet-tiny": hf(ref.nchw(images)).logits.numpy()}
  for repo_id, logits in expected.items():
    model = glajax.load_model(repo_id)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, images), logits, atol=ATOL,
                               rtol=0, err_msg=repo_id)
  with pytest.raises(CheckpointError, match="glajax-test/not-a-resnet"):
    load_resnet("glajax-test/not-a-resnet")

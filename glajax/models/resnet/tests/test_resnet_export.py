"""The ResNet family's export: transformers' ResNetForImageClassification reads it with nothing
missing or unexpected and computes glajax's logits; glajax reloads it bit-identically; a
fine-tuned raw linear head becomes its classifier with ``id2label`` and an image processor."""
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import glajax
from glajax import InputError
from glajax.models import registry
from glajax.models.clip import CLIPConfig, init_clip
from glajax.models.family import ExportInfo
from glajax.models.heads import ImageClassifier, LinearHead
from glajax.models.resnet import ResNetConfig, init_resnet, load_resnet, save_resnet
from glajax.models.resnet.checkpoint import host_state
from glajax.train import recipes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from glajax.models.resnet.tests import resnet_reference as ref  # noqa: E402

ATOL = 1e-5
CLASSNAMES = ("cat", "dog", "bird")


def _images(n=2, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _random_statistics(model, seed=0):
  """Random BatchNorm statistics, so that eval mode is not the identity."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
    shape = var.get_value().shape
    value = rng.uniform(0.5, 1.5, shape) if path[-1] == "var" else rng.normal(0, 0.1, shape)
    var.set_value(value.astype(np.float32))
  return model


def _hf(directory):
  model, info = transformers.ResNetForImageClassification.from_pretrained(
      directory, output_loading_info=True)
  assert not any(info.values()), info   # nothing missing, unexpected or mismatched
  return model.eval()


@pytest.mark.parametrize("config", [ResNetConfig.tiny(num_classes=6),
                                    ResNetConfig.tiny(block="basic", depths=(2, 1, 1, 1),
                                                      downsample_in_bottleneck=False),
                                    ResNetConfig.tiny(downsample_in_bottleneck=True)])
def test_export_round_trip_bit_exact_and_transformers_logits(config, tmp_path):
  model = _random_statistics(init_resnet(config, seed=3))
  directory = save_resnet(model, tmp_path / "export")
  reloaded = load_resnet(directory)
  assert reloaded.config == model.config
  ours, again = host_state(model), host_state(reloaded)
  assert ours.keys() == again.keys()
  for key in ours:
    np.testing.assert_array_equal(again[key], ours[key], err_msg=key)
  images = _images()
  with torch.no_grad():
    expected = _hf(directory)(ref.nchw(images)).logits.numpy()
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, images), expected, atol=ATOL,
                             rtol=0)
  second = save_resnet(reloaded, directory)   # an earlier glajax export is replaced
  assert second == directory


def test_fine_tuned_head_exports_as_the_classifier_with_id2label(tmp_path):
  backbone = _random_statistics(init_resnet(ResNetConfig.tiny(), seed=4))
  rng = np.random.default_rng(0)
  head = LinearHead(rng.normal(size=(64, 3)).astype(np.float32), rng.normal(size=3),
                    normalize=False)
  classifier = ImageClassifier(backbone, head)
  directory = tmp_path / "classifier"
  recipes.export_classifier(classifier, str(directory), ExportInfo(CLASSNAMES, None, 32))
  hf = _hf(directory)
  assert hf.config.id2label == dict(enumerate(CLASSNAMES))
  images = _images(2, 32, seed=5)
  with torch.no_grad():
    expected = hf(ref.nchw(images)).logits.numpy()
  ours = nnx.jit(lambda m, x: m(x))(classifier, images)
  np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)
  processor = transformers.AutoImageProcessor.from_pretrained(directory)
  assert list(processor.image_mean) == [0.485, 0.456, 0.406] and processor.crop_pct == 0.875
  picture = Image.fromarray(np.full((50, 70, 3), 255, np.uint8))
  pixels = processor(images=picture, return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(pixels[0, :, 0, 0], (1 - np.array([0.485, 0.456, 0.406]))
                             / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
  assert pixels.shape == (1, 3, 32, 32)
  reloaded = glajax.load_model(directory)
  assert reloaded.config.labels == CLASSNAMES
  np.testing.assert_array_equal(reloaded.classifier()[0], head.kernel[...])
  assert (directory / "head.npz").is_file()


def test_heads_that_an_export_cannot_hold_are_refused(tmp_path):
  backbone = init_resnet(ResNetConfig.tiny())
  normalised = ImageClassifier(backbone, LinearHead(np.ones((64, 3), np.float32)))
  with pytest.raises(InputError, match="classifier.*raw pooled features.*normalised"):
    recipes.export_classifier(normalised, str(tmp_path / "a"), ExportInfo(CLASSNAMES, None, 32))
  clip = init_clip(CLIPConfig.tiny())
  raw = ImageClassifier(clip, LinearHead(np.ones((16, 3), np.float32), normalize=False))
  tokenizer = glajax.load_tokenizer()
  with pytest.raises(InputError, match="classifier.*normalised features.*raw"):
    recipes.export_classifier(raw, str(tmp_path / "b"), ExportInfo(CLASSNAMES, tokenizer, 32))
  with pytest.raises(InputError, match="head"):
    save_resnet(backbone, tmp_path / "c", head=(np.ones((8, 3)), np.ones(3)))
  assert not any((tmp_path / name).exists() for name in "abc")


def test_raw_linear_head_is_the_models_own_head():
  model = init_resnet(ResNetConfig.tiny(num_classes=5), seed=2)
  head = LinearHead(*model.classifier(), normalize=False)
  images = _images()
  ours = nnx.jit(lambda m, x: m(x))(ImageClassifier(model, head), images)
  np.testing.assert_allclose(ours, nnx.jit(lambda m, x: m(x))(model, images), atol=1e-6)
  assert registry.family_of(model).name == "resnet"
  assert set(ImageClassifier(model, head).param_groups()) == {"image", "classifier", "head"}
  with pytest.raises(InputError, match="bias.*shape"):
    LinearHead(np.ones((4, 3), np.float32), np.ones(4))

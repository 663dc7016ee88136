"""The source classifier of a supervised model (``common.own_head``): its own head on a dataset's
classes (ImageNet-1k rows for ImageNet-R, the whole head for ImageNet-Sketch and for a head of
exactly the dataset's classes), refused with a clear error where the dataset needs a new head.
Both families' source classifiers run end to end in test_experiments_runlocal.py."""
import numpy as np
import pytest

from glajax import ConfigError
from glajax.data import registry as data_registry
from glajax.data import world
from glajax.experiments.kinds import common
from glajax.models.resnet import ResNetConfig, init_resnet
from glajax.models.resnet.modeling import TINY_CLASSES


@pytest.fixture(scope="module")
def imagenet_classifier():
  return init_resnet(ResNetConfig.tiny(num_classes=1000), seed=1)


def test_imagenet_head_restricted_to_a_subsets_classes(imagenet_classifier):
  kernel, bias = imagenet_classifier.classifier()
  info = data_registry.get("imagenet_r")
  head = common.own_head(imagenet_classifier, info)
  rows = [group[0] for group in info.imagenet_classes]
  assert len(rows) == 200 and not head.normalize
  np.testing.assert_array_equal(head.kernel[...], kernel[:, rows])
  np.testing.assert_array_equal(head.bias[...], bias[rows])
  features = np.random.default_rng(0).normal(size=(3, kernel.shape[0])).astype(np.float32)
  np.testing.assert_allclose(head(features), (features @ kernel + bias)[:, rows], rtol=1e-6,
                             atol=1e-5)   # what the runner's ImageNet-R transform of z keeps
  sketch = common.own_head(imagenet_classifier, data_registry.get("imagenet_sketch"))
  np.testing.assert_array_equal(sketch.kernel[...], kernel)


def test_datasets_that_need_a_new_head_are_refused(imagenet_classifier):
  with pytest.raises(ConfigError, match="model.checkpoints.*65 classes of office_home_art.*"
                     "a head of 1000 classes.*needs a new head"):
    common.own_head(imagenet_classifier, data_registry.get("office_home_art"))
  with pytest.raises(ConfigError, match="text tower for objectnet.*several ImageNet classes"):
    common.own_head(imagenet_classifier, data_registry.get("objectnet"))


def test_tiny_resnet_head_covers_the_demo_world():
  assert TINY_CLASSES == world.NUM_CLASSES
  model = init_resnet(ResNetConfig.tiny())
  head = common.own_head(model, data_registry.get("demo_shapes_tiny"))
  np.testing.assert_array_equal(head.kernel[...], model.fc.kernel[...])

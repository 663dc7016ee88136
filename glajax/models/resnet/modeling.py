"""Flax NNX supervised ResNets (He et al., 2016): torchvision's ``ResNet`` in NHWC, ImageNet
normalisation, BatchNorm with PyTorch's semantics (``layers.BatchNorm``), global average
pooling and the ``fc`` classifier.

The module tree mirrors torchvision's ``torchvision/models/resnet.py`` (``conv1``, ``bn1``,
``layer1``..``layer4`` of ``BasicBlock`` / ``Bottleneck``, ``fc``), so that torchvision/timm
state dicts convert by a short table. ``Bottleneck`` strides on its 3×3 convolution (ResNet
v1.5, torchvision and timm); ``downsample_in_bottleneck`` strides on the first 1×1 instead
(v1, transformers' option of that name).

  logits = fc(mean_{h,w} layer4(…layer1(maxpool(relu(bn1(conv1(x)))))))
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glajax.errors import ConfigError, bad_argument
from glajax.models.family import ModelSpec
from glajax.models.layers import BatchNorm, check_images, positive_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # torchvision's ImageNet normalisation (transforms docs)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLOCKS = {"basic": 1, "bottleneck": 4}   # block type -> expansion (output / width)
# torchvision's and timm's architectures (torchvision/models/resnet.py resnet18..resnet152)
ARCHITECTURES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                 "resnet50": ("bottleneck", (3, 4, 6, 3)),
                 "resnet101": ("bottleneck", (3, 4, 23, 3)),
                 "resnet152": ("bottleneck", (3, 8, 36, 3))}
TINY_CLASSES = 100   # the demo world's classes: a tiny model's own head covers them


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """A ResNet: ``block`` ("basic" or "bottleneck"), ``depths`` blocks per stage, ``widths``
  each stage's inner width (its output is width × expansion: 4 for bottlenecks), the stem's
  ``stem_width``, ``num_classes`` outputs of ``fc``; ``labels`` its class names when the
  checkpoint names them; ``image_size``, ``mean`` and ``std`` its input (ImageNet's)."""
  block: str = "bottleneck"
  depths: tuple[int, ...] = (3, 4, 6, 3)
  widths: tuple[int, ...] = (64, 128, 256, 512)
  stem_width: int = 64
  num_classes: int = 1000
  downsample_in_bottleneck: bool = False
  labels: tuple[str, ...] | None = None
  image_size: int = 224
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if self.block not in BLOCKS:
      raise bad_argument("resnet.block", f"one of {sorted(BLOCKS)}", repr(self.block),
                         ConfigError)
    if not self.depths or len(self.depths) != len(self.widths):
      raise bad_argument("resnet.depths, resnet.widths", "one depth and one width per stage",
                         f"{self.depths} and {self.widths}", ConfigError)
    for name in ("stem_width", "num_classes", "image_size"):
      positive_size(f"resnet.{name}", getattr(self, name))
    for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
      positive_size(f"resnet.depths[{i}]", depth)
      positive_size(f"resnet.widths[{i}]", width)
    if self.labels is not None and len(self.labels) != self.num_classes:
      raise bad_argument("resnet.labels", f"{self.num_classes} class names (one per output)",
                         f"{len(self.labels)}", ConfigError)
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise bad_argument("resnet.mean, resnet.std", "3 means and 3 positive deviations",
                         f"{self.mean} and {self.std}", ConfigError)

  @property
  def expansion(self) -> int:
    return BLOCKS[self.block]

  @property
  def num_features(self) -> int:
    """The pooled feature's width (2048 for ResNet-50)."""
    return self.widths[-1] * self.expansion

  @classmethod
  def preset(cls, architecture: str, **overrides) -> ResNetConfig:
    """torchvision's/timm's ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``,
    ``resnet152``."""
    if architecture not in ARCHITECTURES:
      raise bad_argument("architecture", f"one of {', '.join(ARCHITECTURES)}",
                         repr(architecture), ConfigError)
    block, depths = ARCHITECTURES[architecture]
    return cls(block=block, depths=depths, **overrides)

  @classmethod
  def tiny(cls, **overrides) -> ResNetConfig:
    """A few-k-parameter bottleneck ResNet (one block per stage) for 32-px tests and demos."""
    return cls(**{**dict(depths=(1, 1, 1, 1), widths=(4, 8, 8, 16), stem_width=8,
                         num_classes=TINY_CLASSES, image_size=32), **overrides})


def _conv(cin: int, cout: int, kernel: int, stride: int, *, dtype, param_dtype, rngs):
  """torchvision's convolution: no bias, padding k // 2, He-normal (fan-out) init."""
  pad = kernel // 2
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Downsample(nnx.Module):
  """The projection shortcut: 1×1 convolution with the block's stride, BatchNorm
  (torchvision's ``downsample = Sequential(conv1x1, norm_layer)``)."""

  def __init__(self, cin: int, cout: int, stride: int, *, dtype, param_dtype, rngs):
    self.conv = _conv(cin, cout, 1, stride, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.bn = BatchNorm(cout, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3×3 convolutions, stride on conv1."""

  def __init__(self, cin: int, width: int, stride: int, cfg: ResNetConfig, *, dtype,
               param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.conv1 = _conv(cin, width, 3, stride, rngs=rngs, **kw)
    self.bn1 = BatchNorm(width, **kw)
    self.conv2 = _conv(width, width, 3, 1, rngs=rngs, **kw)
    self.bn2 = BatchNorm(width, **kw)
    self.downsample = (Downsample(cin, width, stride, rngs=rngs, **kw)
                       if stride != 1 or cin != width else None)

  def __call__(self, x):
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    return jax.nn.relu(h + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nnx.Module):
  """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + shortcut(x)): 1×1 to ``width``,
  3×3, 1×1 to 4·``width``; the stride on conv2 (v1.5) or, with ``downsample_in_bottleneck``,
  on conv1."""

  def __init__(self, cin: int, width: int, stride: int, cfg: ResNetConfig, *, dtype,
               param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    cout = width * cfg.expansion
    first = stride if cfg.downsample_in_bottleneck else 1
    self.conv1 = _conv(cin, width, 1, first, rngs=rngs, **kw)
    self.bn1 = BatchNorm(width, **kw)
    self.conv2 = _conv(width, width, 3, stride // first, rngs=rngs, **kw)
    self.bn2 = BatchNorm(width, **kw)
    self.conv3 = _conv(width, cout, 1, 1, rngs=rngs, **kw)
    self.bn3 = BatchNorm(cout, **kw)
    self.downsample = (Downsample(cin, cout, stride, rngs=rngs, **kw)
                       if stride != 1 or cin != cout else None)

  def __call__(self, x):
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    h = jax.nn.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    return jax.nn.relu(h + (x if self.downsample is None else self.downsample(x)))


def max_pool(x):
  """``MaxPool2d(kernel_size=3, stride=2, padding=1)``: the padding never wins (−∞)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNet(nnx.Module):
  """A supervised ResNet classifier with torchvision's parameter layout; eval-mode BatchNorm
  unless ``model.train()``. Implements the family interface (``glajax.models.family``): no
  text tower, no logit scale; its features are the pooled ``num_features``-wide vector and its
  own head is ``fc`` (:meth:`classifier`)."""

  logit_scale = None   # a supervised classifier: no contrastive scale
  logit_bias = None

  def __init__(self, config: ResNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.conv1 = _conv(3, config.stem_width, 7, 2, rngs=rngs, **kw)
    self.bn1 = BatchNorm(config.stem_width, **kw)
    block = Bottleneck if config.block == "bottleneck" else BasicBlock
    cin = config.stem_width
    for s, (depth, width) in enumerate(zip(config.depths, config.widths)):
      stage = []
      for i in range(depth):
        stride = 2 if i == 0 and s > 0 else 1
        stage.append(block(cin, width, stride, config, rngs=rngs, **kw))
        cin = width * config.expansion
      setattr(self, f"layer{s + 1}", nnx.List(stage))
    self.fc = nnx.Linear(config.num_features, config.num_classes, dtype=jnp.float32,
                         param_dtype=param_dtype, rngs=rngs)

  @property
  def spec(self) -> ModelSpec:
    cfg = self.config
    return ModelSpec("resnet", cfg.image_size, tuple(cfg.mean), tuple(cfg.std), has_text=False)

  @property
  def stages(self) -> list:
    """The blocks of each stage, ``[layer1, layer2, …]``."""
    return [getattr(self, f"layer{s + 1}") for s in range(len(self.config.depths))]

  @staticmethod
  def param_groups() -> dict[str, str]:
    """The parameter groups recipes name: the trunk (``image``) and its own ImageNet head
    (``classifier``)."""
    return {"image": r"^(conv1|bn1|layer\d+)/", "classifier": r"^fc/"}

  def stem(self, images):
    """(B, H, W, 3) normalised -> (B, H/4, W/4, stem_width): conv 7×7/2, BN, ReLU, max pool."""
    check_images(images)
    return max_pool(jax.nn.relu(self.bn1(self.conv1(images.astype(self.dtype)))))

  def image_features(self, images):
    """(B, H, W, 3) -> (B, num_features) float32: the globally average-pooled last stage."""
    h = self.stem(images)
    for stage in self.stages:
      for block in stage:
        h = block(h)
    return h.astype(jnp.float32).mean(axis=(1, 2))

  def encode_image(self, images):
    """The pooled feature (a supervised classifier has no projection): ``image_features``."""
    return self.image_features(images)

  @staticmethod
  def image_projection_kernel():
    """None: no linear projection after the pooled feature."""
    return None

  def classifier(self) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (num_features, num_classes), bias (num_classes,)) float32 of ``fc``: logits =
    encode_image(x) · kernel + bias, on raw (not normalised) features."""
    return (np.asarray(self.fc.kernel[...], np.float32),
            np.asarray(self.fc.bias[...], np.float32))

  def __call__(self, images):
    """(B, H, W, 3) -> (B, num_classes) float32 logits of its own head."""
    return self.fc(self.image_features(images))


def init_resnet(config: ResNetConfig, *, seed: int = 0, dtype=jnp.float32,
                param_dtype=jnp.float32) -> ResNet:
  """A randomly initialised ``ResNet(config, rngs=nnx.Rngs(seed))``, its initialisers compiled
  as one unoptimised XLA program (as ``init_clip``)."""
  build = lambda: ResNet(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  init = jax.jit(lambda: nnx.state(build())).lower().compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return nnx.merge(graphdef, init())

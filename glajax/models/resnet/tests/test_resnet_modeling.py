"""glajax's ResNet against torchvision's (ported in resnet_reference.py), float32, under jit:
random weights and random BatchNorm statistics saved as torchvision state dicts (``.pth`` and
``.safetensors``), loaded through the registry, compared step by step (stem, first stage,
pooled feature, logits); BatchNorm in train mode (outputs and running statistics after several
passes); the published parameter counts of every depth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
from flax import nnx

import glajax
from glajax import ConfigError, InputError
from glajax.models import registry
from glajax.models.heads import LinearHead
from glajax.models.layers import BatchNorm
from glajax.models.resnet import ResNet, ResNetConfig, init_resnet
from glajax.train import recipes

torch = pytest.importorskip("torch")
from glajax.models.resnet.tests import resnet_reference as ref  # noqa: E402

ATOL = 1e-5
TINY = dict(widths=(4, 8, 8, 16), stem=8, num_classes=7)


def _images(n=2, size=37, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _save(model, path):
  if str(path).endswith(".safetensors"):
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  else:
    torch.save(model.state_dict(), path)
  return str(path)


def _trunk(model, images):
  """The last stage's output, before pooling."""
  h = model.stem(images)
  for stage in model.stages:
    h = ref.run_blocks(stage, h)
  return h


_jit = {name: nnx.jit(lambda m, x, name=name: getattr(m, name)(x))
        for name in ("stem", "image_features", "__call__")}


@pytest.mark.parametrize("block,layers,suffix", [("bottleneck", (1, 2, 1, 1), ".pth"),
                                                 ("basic", (2, 1, 1, 1), ".safetensors")])
def test_eval_parity_step_by_step(block, layers, suffix, tmp_path):
  torch_model = ref.build(block, layers, **TINY)
  model = glajax.load_model(_save(torch_model, tmp_path / f"resnet{suffix}"))
  assert isinstance(model, ResNet) and registry.locate(tmp_path / f"resnet{suffix}")[1] == (
      "torchvision")
  assert model.config.block == block and model.config.depths == layers
  images = _images()   # 37 px: odd sizes at every stride-2 step
  x = ref.nchw(images)
  with torch.no_grad():
    stem = torch_model.stem(x)
    first = torch_model.layer1(stem)
    pooled = torch_model.features(x)
    logits = torch_model(x)
  np.testing.assert_allclose(_jit["stem"](model, images), ref.nhwc(stem), atol=ATOL, rtol=0)
  h = nnx.jit(ref.run_blocks)(model.layer1, ref.nhwc(stem))
  np.testing.assert_allclose(h, ref.nhwc(first), atol=ATOL, rtol=0)
  np.testing.assert_allclose(_jit["image_features"](model, images), pooled.numpy(), atol=ATOL,
                             rtol=0)
  np.testing.assert_allclose(_jit["__call__"](model, images), logits.numpy(), atol=ATOL, rtol=0)
  kernel, bias = model.classifier()
  np.testing.assert_allclose(pooled.numpy() @ kernel + bias, logits.numpy(), atol=ATOL, rtol=0)


def test_batchnorm_train_mode_matches_torch_over_several_passes(tmp_path):
  """model.train(): each pass normalises with the batch's statistics and moves the running
  ones (unbiased variance, momentum 0.1) exactly as torch's model.train() does; model.eval()
  then uses the updated running statistics."""
  torch_model = ref.build("bottleneck", (1, 2, 1, 1), **TINY)
  model = glajax.load_model(_save(torch_model, tmp_path / "resnet.pth"))
  torch_model.train()
  model.train()
  forward = nnx.jit(lambda m, x: m(x))
  for step in range(3):
    images = _images(4, 32, seed=10 + step)
    with torch.no_grad():
      expected = torch_model(ref.nchw(images)).numpy()
    np.testing.assert_allclose(forward(model, images), expected, atol=ATOL, rtol=0)
  stats = {name: module for name, module in torch_model.named_modules()
           if isinstance(module, torch.nn.BatchNorm2d)}
  ours = {".".join(map(str, path)): m for path, m in nnx.iter_modules(model)
          if isinstance(m, BatchNorm)}
  assert len(ours) == len(stats) == 20   # stem, 5 blocks × 3, 4 shortcuts
  for name, bn in stats.items():
    name = name.replace("downsample.1", "downsample.bn")
    np.testing.assert_allclose(ours[name].mean[...], bn.running_mean.numpy(), atol=ATOL, rtol=0,
                               err_msg=name)
    np.testing.assert_allclose(ours[name].var[...], bn.running_var.numpy(), rtol=1e-5,
                               atol=ATOL, err_msg=name)
  torch_model.eval()
  model.eval()
  images = _images(2, 32, seed=20)
  with torch.no_grad():
    expected = torch_model(ref.nchw(images)).numpy()
  np.testing.assert_allclose(forward(model, images), expected, atol=ATOL, rtol=0)


def test_train_mode_is_differentiable_and_eval_is_the_default():
  model = init_resnet(ResNetConfig.tiny())
  assert all(m.use_running_average for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm))
  images = _images(4, 32)
  stats = lambda: jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))  # noqa
  before = stats()
  model.train()
  grads = nnx.jit(lambda m: nnx.grad(lambda m: m(images).mean())(m))(model)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  after = stats()
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  assert all(jax.tree.leaves(changed)), "train mode moves every running statistic"


@pytest.mark.parametrize("architecture, count", [
    # torchvision's published parameter counts (torchvision.models docs, "Params" column)
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
    ("resnet101", 44_549_160), ("resnet152", 60_192_808)])
def test_parameter_counts_of_every_depth(architecture, count):
  model = nnx.eval_shape(lambda: ResNet(ResNetConfig.preset(architecture), rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == count
  torch_model = ref.build(*ref.ARCHITECTURES[architecture], randomise=False)
  assert sum(p.numel() for p in torch_model.parameters()) == count


def test_interface_and_bad_input():
  model = init_resnet(ResNetConfig.tiny(num_classes=5))
  spec = model.spec
  assert spec.family == "resnet" and not spec.has_text and spec.loss is None
  assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
  assert model.logit_scale is None and model.logit_bias is None
  assert model.image_projection_kernel() is None
  images = _images(2, 40)   # any resolution: global average pooling
  encoded = nnx.jit(lambda m, x: (m.encode_image(x), m.image_features(x), m(x)))(model, images)
  np.testing.assert_array_equal(encoded[0], encoded[1])
  assert encoded[2].shape == (2, 5)
  with pytest.raises(InputError, match="images.*NCHW"):
    model.stem(images.transpose(0, 3, 1, 2))
  with pytest.raises(ConfigError, match="resnet.block"):
    ResNetConfig(block="wide")
  with pytest.raises(ConfigError, match="architecture.*resnet50.*'resnet50d'"):
    ResNetConfig.preset("resnet50d")
  with pytest.raises(ConfigError, match="depths, resnet.widths"):
    ResNetConfig(depths=(1, 1), widths=(4, 4, 4))
  with pytest.raises(ConfigError, match="labels"):
    ResNetConfig(num_classes=3, labels=("a", "b"))


def test_what_needs_a_text_tower_refuses_a_supervised_classifier():
  model = init_resnet(ResNetConfig.tiny())
  config = recipes.finetune()
  with pytest.raises(InputError, match="model.*text tower.*resnet"):
    glajax.zeroshot_head(model, None, ["cat"], ["a {}."], show_progress=False)
  with pytest.raises(InputError, match="model.checkpoints.*text tower.*contrastive.*resnet"):
    recipes.contrastive_task(model, None, ["cat"], ["a {}."], recipes.flyp())
  with pytest.raises(InputError, match="model.checkpoints.*text tower.*prompt_tuning.*resnet"):
    recipes.prompt_tuning_task(model, None, ["cat"], recipes.prompt_tuning())
  with pytest.raises(InputError, match="model.checkpoints.*text tower.*backdoor_peft.*resnet"):
    recipes.backdoor_task(model, np.ones((1, 4), np.float32), [1], recipes.backdoor_peft(1))
  assert recipes.classifier_task(model, LinearHead(*model.classifier(), normalize=False),
                                 config).model.head.normalize is False


def test_bfloat16_compute_keeps_float32_statistics_and_logits():
  config = ResNetConfig.tiny()
  full = init_resnet(config, seed=1)
  half = init_resnet(config, seed=1, dtype=jnp.bfloat16)
  images = _images(2, 32)
  logits = _jit["__call__"](half, images)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, _jit["__call__"](full, images), atol=0.1, rtol=0.05)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(half, nnx.BatchStat)))




@pytest.mark.slow
def test_real_size_resnet50_parity(tmp_path):
  """torchvision's ResNet-50 at its own size (random weights and BatchNorm affine parameters,
  running statistics of other images, as a trained network's), 224-px images, from its state
  dict. In float64 the whole trunk equals torch's to 1e-10: the same function. In float32 the
  logits differ by float32 rounding alone: no more than twice torch's own float32 error
  (against its float64 result) on 50 layers of convolutions summed in another order."""
  torch_model = ref.calibrate_batchnorm(ref.build("bottleneck", (3, 4, 6, 3)),
                                        _images(8, 224, seed=1))
  path = _save(torch_model, tmp_path / "resnet50.safetensors")
  images = _images(2, 224)
  x = ref.nchw(images)
  with torch.no_grad():
    stem = torch_model.stem(x)
    logits = torch_model(x).numpy()
    double = torch_model.double()
    trunk64 = double.layer4(double.layer3(double.layer2(double.layer1(double.stem(x.double())))))
    logits64 = double(x.double()).numpy()
    torch_model.float()
  model = glajax.load_model(path)
  np.testing.assert_allclose(_jit["stem"](model, images), ref.nhwc(stem), atol=ATOL, rtol=0)
  ours = np.asarray(_jit["__call__"](model, images))
  error, torch_error = np.abs(ours - logits64).max(), np.abs(logits - logits64).max()
  assert error <= max(2 * torch_error, ATOL) and np.abs(ours - logits).max() <= 1e-4
  with jax.enable_x64(True):
    model64 = glajax.load_model(path, dtype=jnp.float64, param_dtype=jnp.float64)
    trunk = nnx.jit(_trunk)(model64, images.astype(np.float64))
    assert trunk.dtype == jnp.float64
    np.testing.assert_allclose(trunk, ref.nhwc(trunk64), atol=1e-10, rtol=0)

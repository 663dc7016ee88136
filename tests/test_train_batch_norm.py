"""BatchNorm in training against PyTorch.

``layers.BatchNorm`` against ``torch.nn.BatchNorm2d`` / ``BatchNorm1d`` (train and eval mode,
under jit, on one device and with the batch sharded over 8); the engine's jitted train step with
``train.batch_stats="train"`` on the resnet family's tiny model (the registry's ``tiny-resnet``,
carried to torchvision's layout by the family's own table) against the same SGD steps of the
same model in PyTorch under ``model.train()`` (float32, and float64 with gradient accumulation:
torch's forward passes over the same micro-batches, in order), ``"frozen"`` as PyTorch's
``model.eval()`` training, a resumed run bit for bit, WiSE-FT over the running statistics; then
a tiny open_clip ModifiedResNet in float64 on 1 and 8 devices and its export.

Float32 runs with gradient accumulation are not compared: BatchNorm's backward over few values
per channel is ill-conditioned there (PyTorch's own float32 steps of these models differ from its
float64 ones by ~1e-2 relative), so accumulation is checked in float64.
"""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec as P

from glajax import evaluate
from glajax.experiments.kinds import common
from glajax.models import layers, registry
from glajax.models.clip import load_clip, params_open_clip, save_clip
from glajax.models.clip.tests import open_clip_reference
from glajax.models.resnet import ResNetConfig, init_resnet, params_torchvision
from glajax.parallel import DATA_AXIS, make_mesh
from glajax.train import engine, losses

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from glajax.models.resnet.tests import resnet_reference as ref  # noqa: E402

# image 64: a 2×2 grid after the stride-32 trunk; two blocks in stage 1 (an identity shortcut)
MODEL_CFG = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 64, "layers": [2, 1, 1, 1], "width": 8,
                            "head_width": 16, "patch_size": None},
             "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2,
                          "layers": 1}}
SIZE, CLASSES, STEPS, LR = 64, 3, 4, 2.0**-10
_HEAD = np.random.default_rng(7).normal(size=(16, CLASSES))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(open_clip directory, its float64 torch model): random weights, BatchNorm statistics and
  affine parameters."""
  open_clip = open_clip_reference.load()
  torch.manual_seed(0)
  model = open_clip.CLIP(**MODEL_CFG).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.normal_(1.0, 0.3)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  directory = str(tmp_path_factory.mktemp("rn"))
  with open(os.path.join(directory, params_open_clip.CONFIG_FILE), "w") as f:
    json.dump({"model_cfg": MODEL_CFG}, f)
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              os.path.join(directory, params_open_clip.WEIGHTS_FILE))
  return directory, model.double()


def _batches(batch=16):
  rng = np.random.default_rng(0)
  return [{"image": rng.normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32),
           "label": rng.integers(0, CLASSES, batch).astype(np.int32)} for _ in range(STEPS)]


def _loss(model, batch, rng):
  del rng
  features = model.encode_image(batch["image"].astype(model.vision_model.dtype))
  logits = features @ jnp.asarray(_HEAD, features.dtype)
  return losses.cross_entropy(logits, batch["label"]), {}


def _config(accum_steps=1, batch_stats="train"):
  config = engine.default_config()
  config.update(total_steps=STEPS, accum_steps=accum_steps, batch_stats=batch_stats,
                log_every=STEPS, checkpoint_every=0, progress=False, tensorboard=False)
  config.optimizer.update(name="sgd", learning_rate=LR, momentum=0.9, weight_decay=1e-4,
                          warmup_steps=0, schedule="constant", grad_clip_norm=0.0,
                          trainable=("<image>",))
  return config


def _torch_steps(model, batches, accum_steps=1, train=True):
  """The same steps in PyTorch: SGD (momentum 0.9, weight decay 1e-4) on the image tower, each
  step's gradient the mean of those of its micro-batches (rows i, i + k, ...: the engine's)."""
  model = copy.deepcopy(model).train(train)
  optimizer = torch.optim.SGD(model.visual.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
  head = torch.from_numpy(_HEAD)
  for batch in batches:
    optimizer.zero_grad()
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2)).double()
    labels = torch.from_numpy(batch["label"]).long()
    for i in range(accum_steps):
      logits = model.encode_image(images[i::accum_steps]) @ head
      (torch.nn.functional.cross_entropy(logits, labels[i::accum_steps]) / accum_steps).backward()
    optimizer.step()
  return model.eval()


def _image_tower(model) -> dict[str, np.ndarray]:
  """open_clip name -> float64 array of every parameter and statistic of the image tower."""
  table = params_open_clip.table(model.config)
  out = {}
  for path, variable in nnx.to_flat_state(nnx.state(model.vision_model,
                                                    (nnx.Param, nnx.BatchStat))):
    key, transform = table.theirs("vision_model." + ".".join(map(str, path)))
    out[key] = table.transforms[transform][1](np.asarray(variable.get_value(), np.float64))
  return out


def _compare(ours, theirs, initial):
  """(max |Δ| over the running statistics, max |Δ| over the parameters, relative to how far
  torch moved each parameter)."""
  want = {k: v.numpy() for k, v in theirs.state_dict().items()}
  stats = max(np.abs(v - want[k]).max() for k, v in ours.items() if "running" in k)
  params = max(np.abs(v - want[k]).max() / np.abs(want[k] - initial[k]).max()
               for k, v in ours.items() if "running" not in k)
  return stats, params


def _torch_batch_norm(shape, rng):
  """torch's BatchNorm over the channels (last axis of ``shape``), random affine parameters."""
  channels = shape[-1]
  theirs = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(channels)
  with torch.no_grad():
    theirs.weight.copy_(torch.from_numpy(rng.normal(1, 0.3, channels).astype(np.float32)))
    theirs.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, channels).astype(np.float32)))
  ours = layers.BatchNorm(channels)
  ours.scale.set_value(jnp.asarray(theirs.weight.detach().numpy()))
  ours.bias.set_value(jnp.asarray(theirs.bias.detach().numpy()))
  return ours, theirs


def _channels_first(x):
  """NHWC -> NCHW (torch's layout); (N, C) as it is."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


@pytest.mark.parametrize("shape", [(6, 4, 3, 5), (16, 7)])
def test_batch_norm_layer_equals_torch_batch_norm(shape):
  """Three train-mode calls under jit on NHWC data (torch's NCHW, or (N, C)): outputs (biased
  batch variance) and running statistics (momentum 0.1, unbiased variance) within 1e-5 of
  torch's; then eval mode on the running ones."""
  rng = np.random.default_rng(0)
  ours, theirs = _torch_batch_norm(shape, rng)
  call = nnx.jit(lambda module, x: module(x))
  ours.train()
  theirs.train()
  for step in range(3):
    x = (2 * rng.normal(size=shape) + step).astype(np.float32)
    want = np.moveaxis(theirs(_channels_first(x)).detach().numpy(), 1, -1)
    np.testing.assert_allclose(np.asarray(call(ours, x)), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ours.mean[...], theirs.running_mean.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ours.var[...], theirs.running_var.numpy(), atol=1e-5, rtol=1e-5)
  assert not np.allclose(theirs.running_var.numpy(), 1.0)
  ours.eval()
  theirs.eval()
  want = np.moveaxis(theirs(_channels_first(x)).detach().numpy(), 1, -1)
  np.testing.assert_allclose(np.asarray(call(ours, x)), want, atol=1e-5, rtol=1e-5)


def test_train_mode_statistics_are_the_global_batch_s_on_8_devices():
  """The jitted train-mode forward of a layer and of the tiny ResNet with the batch sharded
  over 8 devices equals the unsharded one (within 1e-5: the reductions' order differs):
  outputs and updated running statistics."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  rng = np.random.default_rng(1)
  sharded = NamedSharding(make_mesh(jax.devices()[:8]), P(DATA_AXIS))
  forward = nnx.jit(lambda module, x: module(x))
  for build, shape in ((lambda: layers.BatchNorm(5), (16, 4, 3, 5)),
                       (lambda: _tiny_resnet(jnp.float32), (16, RN_SIZE, RN_SIZE, 3))):
    x = (2 * rng.normal(size=shape) + 1).astype(np.float32)
    results = []
    for placed in (jax.device_put(x, jax.devices()[0]), jax.device_put(x, sharded)):
      module = build()
      module.train()
      out = forward(module, placed)
      results.append((np.asarray(out), jax.tree.map(np.asarray, nnx.to_pure_dict(
          nnx.state(module, nnx.BatchStat)))))
    (one, one_stats), (eight, eight_stats) = results
    np.testing.assert_allclose(eight, one, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 eight_stats, one_stats)


# ------------------------------------------------------------------ the resnet family's tiny model

RN_SIZE, RN_BATCH, RN_STEPS, RN_LR = 64, 8, 3, 0.05


def _tiny_resnet(dtype=jnp.float32, seed: int = 0):
  """The registry's ``tiny-resnet`` at 64 px (float32), or the same model in ``dtype``, with
  random BatchNorm affine parameters and running statistics."""
  if dtype == jnp.float32:
    model = registry.tiny_model("tiny-resnet", RN_SIZE, seed)
  else:
    model = init_resnet(ResNetConfig.tiny(image_size=RN_SIZE), seed=seed, dtype=dtype,
                        param_dtype=dtype)
  rng = np.random.default_rng(seed + 1)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, layers.BatchNorm):
      n = module.mean.shape[0]
      for name, value in (("scale", rng.uniform(0.5, 1.5, n)), ("bias", rng.normal(0, 0.1, n)),
                          ("mean", rng.normal(0, 0.1, n)), ("var", rng.uniform(0.5, 1.5, n))):
        getattr(module, name).set_value(jnp.asarray(value, dtype))
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  """torchvision key -> array of every parameter and running statistic, by the family's table."""
  table, out = params_torchvision.TABLE, {}
  for path, variable in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
    key, transform = table.theirs(".".join(map(str, path)))
    out[key] = np.asarray(table.transforms[transform][1](np.asarray(variable.get_value())))
  return out


def _torch_resnet(model):
  """The torchvision ResNet (resnet_reference) holding ``model``'s weights and statistics."""
  cfg = model.config
  theirs = ref.build(cfg.block, cfg.depths, widths=cfg.widths, stem=cfg.stem_width,
                     num_classes=cfg.num_classes, randomise=False)
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _state_dict(model).items()}
  missing, unexpected = theirs.load_state_dict(tensors, strict=False)
  assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
  return theirs.to(torch.float64 if model.dtype == jnp.float64 else torch.float32)


def _rn_batches(steps: int = RN_STEPS):
  rng = np.random.default_rng(0)
  return [{"image": rng.normal(size=(RN_BATCH, RN_SIZE, RN_SIZE, 3)).astype(np.float32),
           "label": rng.integers(0, 100, RN_BATCH).astype(np.int32)} for _ in range(steps)]


def _rn_loss(model, batch, rng):
  del rng
  return losses.cross_entropy(model(batch["image"].astype(model.dtype)), batch["label"]), {}


def _rn_config(accum_steps=1, batch_stats="train", total=RN_STEPS, **overrides):
  config = engine.default_config()
  config.update({**dict(total_steps=total, accum_steps=accum_steps, batch_stats=batch_stats,
                        log_every=1, checkpoint_every=0, progress=False, tensorboard=False),
                 **overrides})
  config.optimizer.update(name="sgd", learning_rate=RN_LR, momentum=0.9, weight_decay=1e-4,
                          warmup_steps=0, schedule="constant", grad_clip_norm=0.0,
                          trainable=(".*",))
  return config


def _rn_torch_steps(theirs, batches, accum_steps=1, train=True) -> dict[str, np.ndarray]:
  """The same steps in PyTorch (``model.train()`` or ``.eval()``): SGD (momentum 0.9, weight
  decay 1e-4) over every parameter, each step's gradient the mean of its micro-batches' (rows
  i, i + k, ...: the engine's), each micro-batch a forward pass in turn."""
  theirs = copy.deepcopy(theirs).train(train)
  dtype = next(theirs.parameters()).dtype
  optimizer = torch.optim.SGD(theirs.parameters(), lr=RN_LR, momentum=0.9, weight_decay=1e-4)
  for batch in batches:
    optimizer.zero_grad()
    images, labels = ref.nchw(batch["image"]).to(dtype), torch.from_numpy(batch["label"]).long()
    for i in range(accum_steps):
      logits = theirs(images[i::accum_steps])
      (torch.nn.functional.cross_entropy(logits, labels[i::accum_steps]) / accum_steps).backward()
    optimizer.step()
  return {k: v.numpy() for k, v in theirs.state_dict().items()}


def _relative_errors(ours, theirs):
  """key -> max |ours − theirs| / max |theirs| of every parameter and statistic."""
  return {k: float(np.abs(v - theirs[k]).max() / np.abs(theirs[k]).max()) for k, v in ours.items()}


@pytest.mark.parametrize("dtype, accum_steps", [(jnp.float32, 1), (jnp.float64, 2)])
def test_resnet_train_steps_equal_torch_model_train(tmp_path, dtype, accum_steps):
  """3 SGD steps of batch 8 on 8 devices (``fit``, ``batch_stats="train"``): every parameter
  and running statistic within 1e-5 of torch's (relative to its largest value); the returned
  model's BatchNorm in eval mode, every statistic moved."""
  batches = _rn_batches()
  with jax.enable_x64(dtype == jnp.float64):
    model = _tiny_resnet(dtype)
    theirs = _torch_resnet(model)
    initial = _state_dict(model)
    trained, state = engine.fit(model, _rn_loss, _rn_config(accum_steps),
                                lambda start: iter(batches[start:]), str(tmp_path))
    ours = _state_dict(trained)
  assert state.batch_stats is not None
  assert all(m.use_running_average for _, m in nnx.iter_modules(trained)
             if isinstance(m, layers.BatchNorm))
  errors = _relative_errors(ours, _rn_torch_steps(theirs, batches, accum_steps))
  worst = max(errors, key=errors.get)
  assert errors[worst] < 1e-5, (worst, errors[worst])
  assert all(not np.allclose(ours[k], initial[k]) for k in ours if "running" in k)


def test_resnet_frozen_statistics_train_as_torch_model_eval(tmp_path):
  """``batch_stats="frozen"``: nothing more in the train state, the running statistics kept bit
  for bit, the parameters within 1e-5 of PyTorch's under ``model.eval()``."""
  batches = _rn_batches()
  model = _tiny_resnet()
  theirs = _torch_resnet(model)
  initial = _state_dict(model)
  trained, state = engine.fit(model, _rn_loss, _rn_config(batch_stats="frozen"),
                              lambda start: iter(batches[start:]), str(tmp_path))
  ours = _state_dict(trained)
  assert state.batch_stats is None
  for key in (k for k in ours if "running" in k):
    np.testing.assert_array_equal(ours[key], initial[key], err_msg=key)
  errors = _relative_errors(ours, _rn_torch_steps(theirs, batches, train=False))
  worst = max(errors, key=errors.get)
  assert errors[worst] < 1e-5, (worst, errors[worst])


class _Interrupted(Exception):
  pass


def test_resumed_run_has_the_uninterrupted_run_s_statistics(tmp_path):
  """A run checkpointed at step 2 and stopped at step 3, then resumed, ends with the train state's
  BatchNorm statistics (and the model's) of an uninterrupted run, bit for bit."""
  batches = _rn_batches(4)
  config = _rn_config(total=4, checkpoint_every=2)

  def interrupted(start):
    for step, batch in enumerate(batches[start:], start + 1):
      if step == 3:
        raise _Interrupted
      yield batch

  whole, whole_state = engine.fit(_tiny_resnet(), _rn_loss, config,
                                  lambda start: iter(batches[start:]), str(tmp_path / "whole"))
  with pytest.raises(_Interrupted):
    engine.fit(_tiny_resnet(), _rn_loss, config, interrupted, str(tmp_path / "resumed"))
  resumed, state = engine.fit(_tiny_resnet(), _rn_loss, config,
                              lambda start: iter(batches[start:]), str(tmp_path / "resumed"))
  assert int(state.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.batch_stats),
               jax.tree.map(np.asarray, whole_state.batch_stats))
  ours, want = _state_dict(resumed), _state_dict(whole)
  for key in ours:
    np.testing.assert_array_equal(ours[key], want[key], err_msg=key)


def test_wise_ft_interpolates_the_running_statistics():
  """``common.wise_ft_model``: (1 − α)·θ_zs + α·θ_ft over every parameter and running
  statistic, against NumPy."""
  zs, ft = _tiny_resnet(seed=0), _tiny_resnet(seed=1)
  alpha = 0.3
  merged = _state_dict(common.wise_ft_model(zs, ft, alpha))
  first, second = _state_dict(zs), _state_dict(ft)
  assert any("running_var" in k for k in merged)
  for key, value in merged.items():
    want = ((1 - alpha) * first[key].astype(np.float64) + alpha * second[key]).astype(np.float32)
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=key)
  assert not np.allclose(merged["bn1.running_var"], first["bn1.running_var"])


# ----------------------------------------------------------------- open_clip's ModifiedResNet


@pytest.mark.parametrize("accum_steps, devices", [
    (1, 8), (2, 8), pytest.param(2, 1, marks=pytest.mark.slow)])
def test_float64_train_step_equals_torch_model_train(checkpoint, tmp_path, accum_steps, devices):
  """The statistics of every step's global (micro-)batch, on any number of devices: each
  running mean and variance within 1e-8 of torch's, each parameter within 1e-6 of torch's
  move."""
  if jax.device_count() < devices:
    pytest.skip(f"needs {devices} devices")
  directory, reference = checkpoint
  batches = _batches()
  with jax.enable_x64(True):
    model = load_clip(directory, dtype=jnp.float64, param_dtype=jnp.float64)
    initial = _image_tower(model)
    trained, state = engine.fit(model, _loss, _config(accum_steps), lambda s: iter(batches[s:]),
                                str(tmp_path), mesh=make_mesh(jax.devices()[:devices]))
    ours = _image_tower(trained)
  assert state.batch_stats is not None
  assert all(m.use_running_average for _, m in nnx.iter_modules(trained)
             if isinstance(m, layers.BatchNorm))   # returned in eval mode
  theirs = _torch_steps(reference, batches, accum_steps)
  stats, params = _compare(ours, theirs, initial)
  assert stats < 1e-8 and params < 1e-6, (stats, params)
  moved = min(np.abs(ours[k] - initial[k]).max() for k in ours if "running" in k)
  assert moved > 1e-3   # every statistic moved


def test_frozen_statistics_train_as_torch_model_eval(checkpoint, tmp_path):
  """``batch_stats="frozen"``: nothing more in the train state, the running statistics kept bit
  for bit, and the parameters trained as PyTorch trains them under ``model.eval()`` (within
  2e-6 of torch's move)."""
  directory, reference = checkpoint
  batches = _batches()
  with jax.enable_x64(True):
    model = load_clip(directory, dtype=jnp.float64, param_dtype=jnp.float64)
    initial = _image_tower(model)
    trained, state = engine.fit(model, _loss, _config(batch_stats="frozen"),
                                lambda s: iter(batches[s:]), str(tmp_path))
    ours = _image_tower(trained)
  assert state.batch_stats is None
  for key in (k for k in ours if "running" in k):
    np.testing.assert_array_equal(ours[key], initial[key], err_msg=key)
  stats, params = _compare(ours, _torch_steps(reference, batches, train=False), initial)
  assert stats == 0 and params < 2e-6, params


def test_evaluation_and_export_use_the_trained_running_statistics(checkpoint, tmp_path):
  """A model fine-tuned with trained statistics: ``evaluate_logits`` runs it in eval mode even
  when it is given in train mode; its open_clip export holds the trained statistics, which
  open_clip loads strictly and glajax reloads bit for bit."""
  directory, _ = checkpoint
  batches = _batches()
  trained, _ = engine.fit(load_clip(directory), _loss, _config(), lambda s: iter(batches[s:]),
                          str(tmp_path / "run"))
  images = _batches(8)[0]["image"]
  eval_batch = {"image": images, "label": np.zeros(8, np.int32)}
  logits_fn = lambda model, batch: model.encode_image(batch["image"])
  want, _ = evaluate.evaluate_logits(trained, logits_fn, [eval_batch])
  in_train_mode = nnx.clone(trained)
  in_train_mode.train()
  got, _ = evaluate.evaluate_logits(in_train_mode, logits_fn, [eval_batch])
  np.testing.assert_array_equal(got, want)
  exported = save_clip(trained, tmp_path / "export")
  open_clip = open_clip_reference.load()
  theirs = open_clip.CLIP(**MODEL_CFG).eval()
  theirs.load_state_dict(safetensors_torch.load_file(
      os.path.join(exported, params_open_clip.WEIGHTS_FILE)), strict=True)
  ours = _image_tower(trained)
  for key, value in theirs.state_dict().items():
    if key.startswith("visual.") and "running" in key:
      np.testing.assert_array_equal(value.numpy(), ours[key], err_msg=key)
  with torch.no_grad():
    torch_logits = theirs.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(want, torch_logits, atol=1e-5)
  again = _image_tower(load_clip(exported))
  for key in ours:
    np.testing.assert_array_equal(again[key], ours[key], err_msg=key)
  initial = _image_tower(load_clip(directory))
  assert not np.allclose(ours["visual.bn1.running_var"], initial["visual.bn1.running_var"])


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_rematerialised_blocks_update_the_statistics_as_without(remat):
  """A CLIP ResNet in train mode with its blocks rematerialised: the loss, the gradients and the
  updated running statistics equal those without remat."""
  import dataclasses
  from glajax.models.clip.modeling import init_clip
  base = registry.tiny_model("tiny-rn", 32, 0)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  out = []
  for policy in ("none", remat):
    config = dataclasses.replace(base.config,
                                 vision=dataclasses.replace(base.config.vision, remat=policy))
    model = evaluate.set_batch_norm(init_clip(config, seed=0), train=True)
    graphdef, params, rest = evaluate.split_model(model)

    def loss(p, rest):
      merged = nnx.merge(graphdef, p, rest)
      return jnp.sum(jnp.sin(merged.image_features(images))), nnx.to_pure_dict(
          nnx.state(merged, nnx.BatchStat))

    out.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *out)

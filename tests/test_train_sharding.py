"""FSDP (``train.sharding="fsdp"``): the placement rule, FSDP training equal to replicated training
for a tiny CLIP (end to end, with LIFT's adapters, with CaRot's teacher), the state's shardings,
tensor parallelism (``train.model_parallel``) equal to replicated training, alone and under FSDP,
a checkpoint written on 8 devices resumed on 4, and two processes × 4 devices reading their own
shards of the data (with and without tensor-parallel pairs inside each) equal to one process ×
8 devices."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glajax import parallel
from glajax.models import layers
from glajax.errors import ConfigError, InputError
from glajax.models.heads import LinearHead
from glajax.parallel import fsdp_spec, make_mesh
from glajax.train import engine, recipes
from glajax.train.checkpoint import Checkpointer
from glajax.train.state import create_train_state, make_optimizer
from conftest import needs_cpu, needs_devices, two_jax_processes
import test_train_recipes as tr

DEVICES = 8


def test_fsdp_spec_splits_the_largest_divisible_axis():
  assert fsdp_spec((768, 3072), 8) == P(None, "data")          # MLP fc1 [in, out]
  assert fsdp_spec((3072, 768), 8) == P("data")                # fc2
  assert fsdp_spec((768, 768), 8) == P("data")                 # equal axes: the first
  assert fsdp_spec((16, 16, 3, 768), 8) == P(None, None, None, "data")   # patch conv HWIO
  assert fsdp_spec((1000, 12), 8) == P("data")                 # 12 % 8 != 0: the other axis
  assert fsdp_spec((49408, 512), 64) == P("data")             # token table: 49408 = 64 · 772
  assert fsdp_spec((77, 512), 8) == P(None, "data")            # 77 positions: not divisible
  assert fsdp_spec((49409, 3), 8) == P()                       # no axis divides
  assert fsdp_spec((768,), 8) == P()                           # < FSDP_MIN_SIZE elements
  assert fsdp_spec((parallel.FSDP_MIN_SIZE,), 8) == P("data")
  assert fsdp_spec((), 8) == P()
  with pytest.raises(InputError, match="sharding: expected one of replicated, fsdp"):
    parallel.shardings({"w": jnp.zeros(4)}, make_mesh(jax.devices()[:1]), "zero3")


def test_unknown_sharding_is_a_config_error_before_any_work(tmp_path):
  config = tr._engine_config(recipes.finetune(), 2)
  config.sharding = "zero3"
  clip = tr._clip()
  task = recipes.classifier_task(clip, LinearHead.from_zeroshot(tr._zeroshot_head(clip)), config)
  with pytest.raises(ConfigError, match="train.sharding: expected one of replicated, fsdp, "
                     "found 'zero3'"):
    engine.fit(task.model, task.loss_fn, config, tr._data, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def _no_key_bias(task, config):
  """Freezes the keys' biases: softmax ignores them, so their gradient is 0 in exact arithmetic
  and what the devices sum is rounding, which AdamW's g/√v turns into steps of ±lr whose sign no
  two summation orders share. (The recipe's ``<group>`` patterns resolved on the task's model.)"""
  groups = engine.param_groups(task.model)
  resolve = lambda p: groups[p[1:-1]] if p.startswith("<") and p.endswith(">") else p
  config.optimizer.trainable = tuple(f"{resolve(p)}.*(?<!/k_proj/bias)$"
                                     for p in config.optimizer.trainable)
  return task, config


def _task(recipe: str):
  """(task, config) of ``recipe`` on a tiny CLIP (finetune: from a wrong head, so the loss is
  far from 0)."""
  if recipe == "finetune":
    config = tr._engine_config(recipes.finetune(), 4)
    config.optimizer.learning_rate = 1e-4
    clip = tr._clip()
    head = np.roll(np.asarray(tr._zeroshot_head(clip)), 1, axis=0)
    return _no_key_bias(recipes.classifier_task(clip, LinearHead.from_zeroshot(head), config),
                        config)
  if recipe == "backdoor_peft":
    config = tr._engine_config(recipes.backdoor_peft(num_classes=100), 4)
    config.optimizer.update(learning_rate=0.05, steps_per_epoch=2)
    clip = tr._clip(adapter_dim=32)   # adapters big enough to be sharded
    text = np.random.default_rng(1).normal(size=(tr.CLASSES, 16)).astype(np.float32)
    return recipes.backdoor_task(clip, text, np.array([40, 20, 5, 2]), config), config
  config = tr._engine_config(recipes.carot(), 4)
  config.optimizer.learning_rate = 1e-4
  config.carot.teacher.every = 1
  task = recipes.contrastive_task(tr._clip(), tr._WordTokenizer(), ["red", "green", "blue", "grey"],
                                  ["a photo of a {}.", "a {} thing."], config)
  return _no_key_bias(task, config)


def _fit(recipe: str, how: str, workdir, mesh=None, data=tr._data, **overrides):
  task, config = _task(recipe)
  config.sharding = how
  config.update(overrides)
  model, state = engine.fit(task.model, task.loss_fn, config, data, str(workdir),
                            mesh=make_mesh() if mesh is None else mesh,
                            teacher_update=task.teacher_update)
  return tr._flat(engine.split_model(model)[1]), state


def _assert_close(got: dict, want: dict, rtol: float):
  """‖got − want‖ ≤ rtol·‖want‖ for every array (an entry near 0 has no useful relative error
  of its own)."""
  assert set(got) == set(want)
  for key in want:
    error = np.linalg.norm(got[key] - want[key])
    assert error <= rtol * np.linalg.norm(want[key]), (key, error, np.linalg.norm(want[key]))


def _assert_rule(tree, devices: int):
  """Every leaf is placed as ``fsdp_spec`` says; returns how many are split."""
  split = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = fsdp_spec(x.shape, devices)
    assert x.sharding.spec == spec, (jax.tree_util.keystr(path), x.shape, x.sharding.spec)
    assert x.sharding.mesh.shape["data"] == devices
    if spec != P():
      split += 1
      axis = list(spec).index("data")
      shard = {s.data.shape for s in x.addressable_shards}
      assert shard == {x.shape[:axis] + (x.shape[axis] // devices,) + x.shape[axis + 1:]}
  return split


@needs_devices(DEVICES)
@pytest.mark.parametrize("recipe, accum_steps", [
    ("finetune", 2), pytest.param("backdoor_peft", 1, marks=pytest.mark.slow),
    pytest.param("carot", 1, marks=pytest.mark.slow)])
def test_fsdp_training_equals_replicated_training(tmp_path, recipe, accum_steps):
  """Loss curve and final parameters (and CaRot's teacher) within 1e-6 relative (float32) on 8
  devices, with and without gradient accumulation; the params, optimiser state and teacher are
  placed as ``fsdp_spec`` says."""
  replicated, repl_state = _fit(recipe, "replicated", tmp_path / "replicated",
                                accum_steps=accum_steps)
  fsdp, state = _fit(recipe, "fsdp", tmp_path / "fsdp", accum_steps=accum_steps)
  assert tr._losses(tmp_path / "replicated") == pytest.approx(tr._losses(tmp_path / "fsdp"),
                                                               rel=1e-6, abs=0)
  _assert_close(fsdp, replicated, 1e-6)
  initial = tr._flat(engine.split_model(_task(recipe)[0].model)[1])
  assert tr._changed(initial, fsdp)   # training moved the parameters
  split = _assert_rule(state.params, DEVICES)
  assert split >= 10 and split < len(jax.tree.leaves(state.params))
  assert _assert_rule(state.opt_state, DEVICES) > 0   # the trained parameters' moments
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(repl_state.params))
  if recipe == "carot":
    assert _assert_rule(state.teacher, DEVICES) == split
    _assert_close(tr._flat(parallel.to_host(state.teacher)),
                  tr._flat(parallel.to_host(repl_state.teacher)), 1e-6)
  if recipe == "backdoor_peft":
    assert any("/adapter/" in k for k in tr._changed(initial, fsdp))


def test_tensor_parallel_rule_splits_heads_and_hidden_units():
  axis = layers.tensor_axis
  assert axis("vision_model/layers/self_attn/q_proj/kernel") == -1      # (L, D, D): by heads
  assert axis("text_model/layers/self_attn/v_proj/bias/.value") == -1
  assert axis("vision_model/layers/self_attn/out_proj/kernel") == -2    # by its inputs
  assert axis("vision_model/layers/self_attn/out_proj/bias") is None    # added after the sum
  assert axis("params/vision_model/layers/mlp/fc1/kernel") == -1        # a flat kept path
  assert axis("vision_model/layers/mlp/fc2/kernel") == -2
  assert axis("vision_model/layers/adapter/down/kernel") is None
  assert axis("head/kernel") is None and axis("visual_projection/kernel") is None
  assert parallel.tensor_spec((2, 64, 128), 2, -1) == P(None, None, "model")
  assert parallel.tensor_spec((2, 128, 64), 2, -2) == P(None, "model")
  assert parallel.tensor_spec((2, 64, 30), 4, -1) == P()                # 30 % 4: kept whole
  assert parallel.tensor_spec((64, 64), 1, -1) == P()
  # FSDP on top: the largest axis the model split leaves whole
  assert fsdp_spec((768, 3072), 4, P(None, "model")) == P("data", "model")
  assert fsdp_spec((12, 3072, 768), 4, P(None, "model")) == P(None, "model", "data")
  with pytest.raises(InputError, match="model_parallel: expected a positive divisor of the 8 "
                     "devices, found 3"):
    make_mesh(jax.devices()[:1] * 8, model=3)


def _assert_tensor_rule(tree, model: int) -> int:
  """Every leaf that ``layers.tensor_axis`` names is split ``model`` ways on that axis, the
  others not over ``model``; returns how many are split."""
  split = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name, spec = parallel.key_path(path), tuple(x.sharding.spec)
    axis = layers.tensor_axis(name)
    if axis is None:
      assert "model" not in spec, name
      continue
    split += 1
    assert spec[axis % x.ndim] == "model", (name, spec)
    shard = x.addressable_shards[0].data.shape
    assert shard[axis] * model == x.shape[axis] // (
        parallel.axis_size(x.sharding.mesh, "data") if "data" == spec[axis % x.ndim] else 1)
  return split


@needs_devices(DEVICES)
@pytest.mark.parametrize("how", ["replicated", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_tensor_parallel_training_equals_replicated_training(tmp_path, how):
  """``train.model_parallel=2`` on 8 devices (a 4 × 2 mesh; attention heads and MLP units
  split in two inside the scanned blocks, alone or under FSDP): loss curve and final parameters
  within 1e-6 relative of replicated training (float32); q/k/v, out_proj, fc1 and fc2 of both
  towers (and their AdamW moments) are placed as ``layers.tensor_axis`` says."""
  replicated, _ = _fit("finetune", "replicated", tmp_path / "replicated")
  split, state = _fit("finetune", how, tmp_path / "tp", model_parallel=2)
  assert tr._losses(tmp_path / "tp") == pytest.approx(tr._losses(tmp_path / "replicated"),
                                                      rel=1e-6, abs=0)
  _assert_close(split, replicated, 1e-6)
  assert dict(state.params["head"]["kernel"].sharding.mesh.shape) == {"data": 4, "model": 2}
  # two towers × (q, k, v: kernel and bias; out_proj kernel; fc1 kernel and bias; fc2 kernel)
  assert _assert_tensor_rule(state.params, 2) == 2 * 10
  # AdamW moments (mu, nu) of the trained ones: the image tower's, less the frozen key bias
  assert _assert_tensor_rule(state.opt_state, 2) == 2 * 9
  if how == "fsdp":
    assert any("data" in tuple(x.sharding.spec) and "model" in tuple(x.sharding.spec)
               for x in jax.tree.leaves(state.params))


def test_model_parallel_not_dividing_the_devices_is_a_config_error(tmp_path):
  config = tr._engine_config(recipes.finetune(), 2)
  config.model_parallel = len(jax.devices()) + 1
  clip = tr._clip()
  task = recipes.classifier_task(clip, LinearHead.from_zeroshot(tr._zeroshot_head(clip)), config)
  with pytest.raises(ConfigError, match=f"train.model_parallel: expected a divisor of the "
                     f"{len(jax.devices())} devices, found {len(jax.devices()) + 1}"):
    engine.fit(task.model, task.loss_fn, config, tr._data, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


class _Interrupted(Exception):
  pass


def _stopping_at(step_to_stop):
  def data(start):
    for step, batch in enumerate(tr._data(start), start + 1):
      if step == step_to_stop:
        raise _Interrupted
      yield batch
  return data


def _abstract_state(mesh, how: str):
  """The finetune task's train state as ShapeDtypeStructs placed on ``mesh`` as ``how`` says."""
  task, config = _task("finetune")
  params = engine.split_model(task.model)[1]
  tx, _ = make_optimizer(config.optimizer, params, config.total_steps)
  abstract = jax.eval_shape(lambda p: create_train_state(p, tx, config.seed), params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                      parallel.shardings(abstract, mesh, how, layers.tensor_axis))


@needs_devices(DEVICES)
def test_checkpoint_written_on_8_devices_resumes_on_4(tmp_path):
  """Step 2's FSDP checkpoint of 8 devices restores bit for bit into 4 devices' FSDP placement
  (and into one device's replicated one, and a 4 × 2 tensor-parallel one), and the run resumed
  there on 4 devices ends where the uninterrupted 8-device run ends (loss curve and parameters
  within 1e-6 relative)."""
  with pytest.raises(_Interrupted):
    _fit("finetune", "fsdp", tmp_path / "run", data=_stopping_at(3), checkpoint_every=2)
  whole, _ = _fit("finetune", "fsdp", tmp_path / "whole", checkpoint_every=2)
  four = make_mesh(jax.devices()[:4])
  like_four = _abstract_state(four, "fsdp")
  like_one = _abstract_state(make_mesh(jax.devices()[:1]), "replicated")
  like_tensor = _abstract_state(make_mesh(model=2), "fsdp")   # 4 × 2, tensor parallel
  checkpoints = Checkpointer(str(tmp_path / "run" / "checkpoints"), 2)
  assert checkpoints.all_steps() == [2]
  on_four, on_one = checkpoints.restore(2, like_four), checkpoints.restore(2, like_one)
  on_tensor = checkpoints.restore(2, like_tensor)
  checkpoints.close()
  assert _assert_tensor_rule(on_tensor.params, 2) == 2 * 10
  for a, b in zip(jax.tree.leaves(parallel.to_host(on_tensor)),
                  jax.tree.leaves(parallel.to_host(on_one))):
    np.testing.assert_array_equal(a, b)
  assert int(on_four.step) == 2
  assert _assert_rule(on_four.params, 4) >= 10 and _assert_rule(on_four.opt_state, 4) >= 10
  for a, b in zip(jax.tree.leaves(parallel.to_host(on_four)),
                  jax.tree.leaves(parallel.to_host(on_one))):
    np.testing.assert_array_equal(a, b)
  resumed, state = _fit("finetune", "fsdp", tmp_path / "run", mesh=four, checkpoint_every=2)
  assert int(state.step) == 4 and state.params["head"]["kernel"].sharding.mesh.size == 4
  steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4]   # steps 3-4 on the 4 devices
  assert tr._losses(tmp_path / "run") == pytest.approx(tr._losses(tmp_path / "whole"), rel=1e-6)
  _assert_close(resumed, whole, 1e-6)


# ------------------------------------------------- two processes × 4 devices reading their shards

_SHARDS, _BATCH, _IMAGES = 2, 16, 40


def _numbered_images():
  """A tf.data.Dataset of 40 32-px images: example i coloured as class i % 4, plus noise."""
  from glajax.data.pipeline import tf  # noqa  (TensorFlow: only in the tests that read data)
  rng = np.random.default_rng(0)
  labels = np.arange(_IMAGES) % tr.CLASSES
  images = np.clip(128 + 60 * tr._COLORS[labels] + 30 * rng.normal(size=(_IMAGES, 32, 32, 3)),
                   0, 255).astype(np.uint8)
  return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})


def _pipeline_data(mesh):
  from glajax.data import pipeline  # noqa  (TensorFlow: only in the tests that read data)

  def data(start):
    return pipeline.train_batches(_numbered_images(), batch_size=_BATCH, seed=0, image_size=32,
                                  start_step=start, shards=_SHARDS, shuffle_buffer=_IMAGES,
                                  mesh=mesh)
  return data


def _child_main(workdir, model_parallel=1):
  """One of the two processes: FSDP fine-tuning on its own shard of the data (with
  ``model_parallel`` > 1, tensor-parallel groups inside each process)."""
  mesh = make_mesh(model=model_parallel)
  params, _ = _fit("finetune", "fsdp", workdir, mesh=mesh, data=_pipeline_data(mesh),
                   checkpoint_every=2, model_parallel=model_parallel)
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "params.npz"), **params)


@pytest.mark.slow
@needs_devices(DEVICES)
@needs_cpu("two processes × 4 virtual CPU devices with gloo collectives")
@pytest.mark.parametrize("model_parallel", [1, 2])
def test_two_processes_fsdp_with_their_own_shards_equal_one_process(tmp_path, model_parallel):
  workdir = str(tmp_path / "two")
  two_jax_processes("test_train_sharding", f"_child_main({workdir!r}, {model_parallel})")
  mesh = make_mesh()
  want, _ = _fit("finetune", "fsdp", tmp_path / "one", mesh=mesh, data=_pipeline_data(mesh),
                 checkpoint_every=2)
  with np.load(os.path.join(workdir, "params.npz")) as f:
    got = {k: f[k] for k in f.files}
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert tr._losses(tmp_path / "one") == pytest.approx(tr._losses(workdir), rel=1e-5)

"""The engine on a small stand-in NNX model: training, mesh invariance, accumulation, optimiser
groups, the teacher hook, the final-step guard, checkpoints (resume, SIGKILL, unfinalised saves), NaN stop,
and two processes with jax.distributed."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax.errors import ConfigError, TrainingError
from glajax.train import engine, losses
from glajax.train.checkpoint import Checkpointer
from glajax.parallel import make_mesh
from glajax.parallel import key_path
from conftest import needs_cpu, needs_devices, two_jax_processes

DIM, CLASSES, BATCH = 8, 4, 16
_CENTERS = np.random.default_rng(123).normal(size=(CLASSES, DIM)).astype(np.float32) * 2


class _MLP(nnx.Module):

  def __init__(self, dtype=jnp.float32):
    rngs = nnx.Rngs(0)
    self.body = nnx.Linear(DIM, 16, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.head = nnx.Linear(16, CLASSES, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.body(x)))


def _loss(model, batch, rng, teacher=None):
  del rng, teacher
  logits = model(batch["image"]).astype(jnp.float32)
  accuracy = (logits.argmax(-1) == batch["label"]).mean()
  return losses.cross_entropy(logits, batch["label"]), {"accuracy": accuracy}


def _batch(step, nan_at=None):
  rng = np.random.default_rng(step)
  label = rng.integers(0, CLASSES, BATCH).astype(np.int32)
  image = (_CENTERS[label] + rng.normal(size=(BATCH, DIM))).astype(np.float32)
  if step == nan_at:
    image[0, 0] = np.nan
  return {"image": image, "label": label}


class _Interrupted(Exception):
  pass


def _data(nan_at=None, delay=0.0, stop_after=None):
  """Global batch of step s, sliced to this process's share."""
  n, i = jax.process_count(), jax.process_index()

  def batches(start):
    step = start
    while True:
      step += 1
      if step == stop_after:
        raise _Interrupted
      if delay:
        time.sleep(delay)
      yield jax.tree.map(lambda x: np.array_split(x, n)[i], _batch(step, nan_at))

  return batches


def _config(total=8, **overrides):
  config = engine.default_config()
  config.total_steps = total
  config.log_every = 2
  config.checkpoint_every = 0
  config.progress = False
  config.optimizer.learning_rate = 0.05
  config.optimizer.warmup_steps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def _params(model):
  return jax.tree.map(np.asarray, engine.split_model(model)[1])


def _assert_params_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol, atol), a, b)


def test_loss_falls_and_metrics_are_logged(tmp_path):
  model, state = engine.fit(_MLP(), _loss, _config(total=30), _data(), str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == list(range(2, 31, 2))
  assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
  assert {"accuracy", "learning_rate", "examples_per_s"} <= set(lines[0])
  assert int(state.step) == 30
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))


def test_metrics_go_through_clu_writers_and_a_finished_run_says_it_is_reused(tmp_path, capsys):
  """TensorBoard events (clu.metric_writers) beside metrics.jsonl; W&B asked for without wandb
  installed is a ConfigError naming train.wandb; a finished run is reused with one line."""
  pytest.importorskip("clu.metric_writers")
  engine.fit(_MLP(), _loss, _config(total=4, tensorboard=True), _data(), str(tmp_path),
             name="unit: mlp")
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  from tensorboard.backend.event_processing import event_accumulator  # noqa  (test only)
  accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  accumulator.Reload()
  tags = accumulator.Tags()["tensors"] + accumulator.Tags()["scalars"]
  assert {"loss", "learning_rate", "examples_per_s"} <= set(tags)
  capsys.readouterr()
  engine.fit(_MLP(), _loss, _config(total=4, tensorboard=True), _data(), str(tmp_path),
             name="unit: mlp")
  assert "unit: mlp: finished run reused (4 steps)" in capsys.readouterr().out
  if importlib.util.find_spec("wandb") is None:
    with pytest.raises(ConfigError, match="train.wandb"):
      engine.fit(_MLP(), _loss, _config(total=4, wandb=True), _data(), str(tmp_path / "w"))


def test_bfloat16_compute_keeps_float32_params(tmp_path):
  model, state = engine.fit(_MLP(jnp.bfloat16), _loss, _config(total=4), _data(), str(tmp_path))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert model.body.kernel[...].dtype == jnp.float32
  assert model(jnp.ones((2, DIM))).dtype == jnp.bfloat16


@needs_devices(2)
def test_one_device_equals_all_devices(tmp_path):
  """The same run on one device and on as many of the devices present as divide the batch."""
  devices = jax.devices()[:max(d for d in range(1, jax.device_count() + 1) if BATCH % d == 0)]
  one, _ = engine.fit(_MLP(), _loss, _config(), _data(), str(tmp_path / "one"),
                      mesh=make_mesh(jax.devices()[:1]))
  eight, _ = engine.fit(_MLP(), _loss, _config(), _data(), str(tmp_path / "eight"),
                        mesh=make_mesh(devices))
  _assert_params_close(_params(one), _params(eight))
  assert not np.allclose(_params(one)["head"]["kernel"], _params(_MLP())["head"]["kernel"])


def test_gradient_accumulation_equals_full_batch(tmp_path):
  full, _ = engine.fit(_MLP(), _loss, _config(), _data(), str(tmp_path / "full"))
  accum, _ = engine.fit(_MLP(), _loss, _config(accum_steps=4), _data(), str(tmp_path / "acc"))
  _assert_params_close(_params(full), _params(accum))


def test_frozen_params_and_group_learning_rates_match_plain_sgd(tmp_path):
  config = _config(total=1)
  config.optimizer.update(name="sgd", momentum=0.0, weight_decay=0.0, warmup_steps=0,
                          schedule="constant", grad_clip_norm=0.0, learning_rate=0.1,
                          trainable=("head",), groups=({"name": "bias", "pattern": "bias$",
                                                        "lr_scale": 0.5},))
  init = _params(_MLP())
  trained, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path))
  got = _params(trained)

  def reference_loss(params):
    return _loss(nnx.merge(nnx.graphdef(_MLP()), params), _batch(1), None)[0]

  grads = jax.grad(reference_loss)(init)
  _assert_params_close(got["body"], init["body"], 0, 0)          # frozen: bit-for-bit
  np.testing.assert_allclose(got["head"]["kernel"],
                             init["head"]["kernel"] - 0.1 * grads["head"]["kernel"], 1e-5, 1e-6)
  np.testing.assert_allclose(got["head"]["bias"],
                             init["head"]["bias"] - 0.05 * grads["head"]["bias"], 1e-5, 1e-6)


class _WithSpare(_MLP):
  """_MLP with a parameter the loss never reads."""

  def __init__(self, spare: float):
    super().__init__()
    self.spare = nnx.Param(jnp.full((3,), spare, jnp.float32))


def test_the_finiteness_check_reads_the_trained_parameters_only(tmp_path):
  """A frozen parameter is never updated, so the step's ``finite`` skips it (``trained``): a
  NaN in a frozen parameter that the loss never reads trains as if it were 0, and the same NaN
  checked (``trained`` None) or trained stops the run."""
  def config(trainable):
    c = _config(total=3)
    c.optimizer.trainable = trainable
    return c

  model, _ = engine.fit(_WithSpare(np.nan), _loss, config(("body", "head")), _data(),
                        str(tmp_path / "frozen"))
  clean, _ = engine.fit(_WithSpare(0.0), _loss, config(("body", "head")), _data(),
                        str(tmp_path / "clean"))
  assert np.isnan(np.asarray(model.spare[...])).all()
  _assert_params_close(_params(model)["head"], _params(clean)["head"], 0, 0)
  with pytest.raises(TrainingError, match="at step 1"):
    engine.fit(_WithSpare(np.nan), _loss, config((".*",)), _data(), str(tmp_path / "trained"))

  mesh = make_mesh(jax.devices()[:1])
  graphdef, params, rest = engine.split_model(_WithSpare(np.nan))
  tx, _ = engine.make_optimizer(config(("body", "head")).optimizer, params, 3)
  state = engine.create_train_state(params, tx, 0, False)
  batch = jax.tree.map(jnp.asarray, _batch(1))
  trained = {"body": {"kernel": True, "bias": True}, "head": {"kernel": True, "bias": True},
             "spare": False}
  assert engine.trained_leaves(params, config(("body", "head")), _WithSpare(0.0)) == trained
  finite = [bool(engine.make_train_step(graphdef, _loss, tx, mesh, trained=t)(
      jax.tree.map(jnp.copy, state), rest, batch)[1]["finite"]) for t in (trained, None)]
  assert finite == [True, False]


def test_teacher_hook_is_carot_ema_after_each_update(tmp_path):
  """The recipe's teacher update runs inside the step, after the optimiser update of 0-based
  step k, with k itself: CaRot's EMA (every 2 steps, k = 0 included) against a NumPy loop."""
  import functools
  total, every = 10, 2   # the momentum ramps over the first 0.2 * 10 = 2 steps
  config = _config(total=total, checkpoint_every=1, keep_checkpoints=total)
  update = functools.partial(losses.carot_teacher_update, total_steps=total, every=every)
  _, state = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path), teacher_update=update)
  ck = Checkpointer(str(tmp_path / "checkpoints"), 1, keep=total)
  student = {s: jax.tree.map(np.asarray, ck.restore(s, state).params)
             for s in range(1, total + 1)}
  ck.close()
  want = _params(_MLP())   # the teacher starts as the initial student
  for k in range(total):
    if k % every == 0:
      m = 0.05 + (0.9 - 0.05) * k / (0.2 * total) if k < 0.2 * total else 0.9
      want = jax.tree.map(lambda t, p: m * t + (1 - m) * p, want, student[k + 1])
  _assert_params_close(jax.tree.map(np.asarray, state.teacher), want)
  _assert_params_close(jax.tree.map(np.asarray, state.params), student[total])


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
  config = _config(total=10, checkpoint_every=4, keep_checkpoints=2)
  whole, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path / "whole"))
  with pytest.raises(_Interrupted):
    engine.fit(_MLP(), _loss, config, _data(stop_after=7), str(tmp_path / "resumed"))
  ck = Checkpointer(str(tmp_path / "resumed" / "checkpoints"), 4, keep=2)
  assert ck.all_steps() == [4]
  ck.close()
  resumed, state = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path / "resumed"))
  _assert_params_close(_params(whole), _params(resumed), 0, 0)
  ck = Checkpointer(str(tmp_path / "resumed" / "checkpoints"), 4, keep=2)
  assert ck.all_steps() == [8, 10]   # keep-last-2
  ck.close()
  steps = [json.loads(l)["step"] for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert steps == [2, 4, 6, 6, 8, 10]   # steps 5-6 ran twice, from the step-4 checkpoint


def test_unfinalised_checkpoint_directory_is_ignored(tmp_path):
  config = _config(total=8, checkpoint_every=2)
  with pytest.raises(_Interrupted):
    engine.fit(_MLP(), _loss, config, _data(stop_after=6), str(tmp_path))
  ckdir = tmp_path / "checkpoints"
  # A save of step 6 that a kill interrupted: Orbax's not yet renamed temporary directory.
  partial = ckdir / "6.orbax-checkpoint-tmp"
  partial.mkdir()
  (partial / "_CHECKPOINT_METADATA").write_text("{}")
  ck = Checkpointer(str(ckdir), 2)
  assert ck.latest_step() == 4 and ck.all_steps() == [2, 4]
  ck.close()
  resumed, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path))
  # Orbax removed the stale temporary directory (in the background, awaited by the next save).
  assert not partial.exists() and (ckdir / "6").is_dir()
  direct, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path / "direct"))
  _assert_params_close(_params(resumed), _params(direct), 0, 0)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = _config(total=10, checkpoint_every=2, log_every=1)
  with pytest.raises(TrainingError, match=r"loss: expected a finite value and finite parameters,"
                     r" found loss nan at step 5.*last good checkpoint is step 4"):
    engine.fit(_MLP(), _loss, config, _data(nan_at=5), str(tmp_path))
  ck = Checkpointer(str(tmp_path / "checkpoints"), 2)
  assert ck.all_steps() == [2, 4]
  _, like = engine.fit(_MLP(), _loss, _config(total=1), _data(), str(tmp_path / "like"))
  restored = ck.restore(4, like)
  ck.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored.params)))


def test_divergence_on_the_last_step_returns_no_model(tmp_path):
  """A NaN that enters at the final update is caught (the guard checks the updated parameters
  too), so no diverged model reaches an export; the last good checkpoint stays."""
  config = _config(total=6, checkpoint_every=2, log_every=100)
  with pytest.raises(TrainingError, match=r"at step 6 of the run .*nothing was exported.*"
                     r"last good checkpoint is step 4"):
    engine.fit(_MLP(), _loss, config, _data(nan_at=6), str(tmp_path))
  ck = Checkpointer(str(tmp_path / "checkpoints"), 2)
  assert ck.all_steps() == [2, 4]
  ck.close()


def test_last_step_is_always_checkpointed_and_reused(tmp_path):
  config = _config(total=4, checkpoint_every=0)
  first, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path))
  ck = Checkpointer(str(tmp_path / "checkpoints"), 0)
  assert ck.all_steps() == [4]
  ck.close()
  again, _ = engine.fit(_MLP(), _loss, config, _data(stop_after=1), str(tmp_path))  # no step runs
  _assert_params_close(_params(first), _params(again), 0, 0)


def _child_main(workdir, total, every, delay):
  """Entry point of the subprocess runs below (SIGKILL, jax.distributed)."""
  config = _config(total=total, checkpoint_every=every)
  model, _ = engine.fit(_MLP(), _loss, config, _data(delay=delay), workdir)
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "params.npz"), **_flat(_params(model)))


def _child(code):
  return subprocess.Popen(
      [sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
       f"import test_train_engine as t; {code}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _saved_params(workdir):
  with np.load(os.path.join(workdir, "params.npz")) as f:
    return {k: f[k] for k in f.files}


def _flat(params):
  return {key_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(tmp_path):
  workdir = str(tmp_path / "killed")
  proc = _child(f"t._child_main({workdir!r}, 12, 4, 0.3)")
  deadline = time.time() + 120
  while not os.path.isdir(os.path.join(workdir, "checkpoints", "4")):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), 4)
  assert 4 in ck.all_steps() and 12 not in ck.all_steps()
  ck.close()
  resumed, _ = engine.fit(_MLP(), _loss, _config(total=12, checkpoint_every=4), _data(), workdir)
  direct, _ = engine.fit(_MLP(), _loss, _config(total=12, checkpoint_every=4), _data(),
                         str(tmp_path / "direct"))
  _assert_params_close(_params(resumed), _params(direct), 0, 0)


@pytest.mark.slow
@needs_cpu("two processes × 4 virtual CPU devices with gloo collectives")
def test_two_processes_with_jax_distributed_equal_one_process(tmp_path):
  workdir = str(tmp_path / "two")
  two_jax_processes("test_train_engine", f"_child_main({workdir!r}, 8, 4, 0)", timeout=300)
  one, _ = engine.fit(_MLP(), _loss, _config(total=8), _data(), str(tmp_path / "one"))
  want = _flat(_params(one))
  got = _saved_params(workdir)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], 1e-5, 1e-6)


def test_corrupted_latest_checkpoint_resumes_from_the_one_before(tmp_path):
  """An interrupted run whose newest checkpoint is damaged resumes from the previous one (the
  damaged step set aside, not deleted) and ends equal to the uninterrupted run."""
  import shutil
  config = _config(total=10, checkpoint_every=2, keep_checkpoints=5)
  whole, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path / "whole"))
  with pytest.raises(_Interrupted):
    engine.fit(_MLP(), _loss, config, _data(stop_after=7), str(tmp_path / "resumed"))
  checkpoints = tmp_path / "resumed" / "checkpoints"
  shutil.rmtree(checkpoints / "6" / "default")  # the newest save lost its data
  resumed, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path / "resumed"))
  _assert_params_close(_params(whole), _params(resumed), 0, 0)
  assert any(name.startswith("corrupt-6-") for name in os.listdir(checkpoints))
  steps = [json.loads(l)["step"] for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert steps == [2, 4, 6, 6, 8, 10]  # steps 5-6 ran again, from the step-4 checkpoint


def _wobbly_score(record=None):
  """A score of the model that rises and falls along training, with ties (one decimal)."""
  def score(model):
    kernel = np.asarray(model.head.kernel[...])
    if record is not None:
      record.append(_params(model))
    return round(float(np.cos(1e3 * kernel.sum())), 1)
  return score


def _dassl_best_val(scores, params):
  """Dassl ``engine/trainer.py``: ``after_epoch`` keeps ``model-best`` when ``curr_result >
  self.best_result`` (from −inf); ``after_train`` deploys it."""
  best_result, best = -np.inf, None
  for curr_result, current in zip(scores, params):
    if curr_result > best_result:
      best_result, best = curr_result, current
  return best_result, best


def test_best_selection_returns_dassls_best_val_epoch(tmp_path):
  record = []
  select = engine.BestSelection(_wobbly_score(record), every=3)
  model, _ = engine.fit(_MLP(), _loss, _config(total=15), _data(), str(tmp_path), select=select)
  assert [s for s, _ in select.history] == [3, 6, 9, 12, 15]
  scores = [score for _, score in select.history]
  best_score, best_params = _dassl_best_val(scores, record)
  assert select.chosen == (3 * (scores.index(best_score) + 1), best_score)
  assert len(set(scores)) < len(scores) or select.chosen[0] != 15  # a tie or an earlier best
  _assert_params_close(_params(model), best_params, 0, 0)
  last, _ = engine.fit(_MLP(), _loss, _config(total=15), _data(), str(tmp_path / "last"))
  if select.chosen[0] != 15:
    assert not np.array_equal(_params(model)["head"]["kernel"], _params(last)["head"]["kernel"])


def test_best_selection_survives_a_resume(tmp_path):
  config = _config(total=15, checkpoint_every=4, keep_checkpoints=2)
  whole_select = engine.BestSelection(_wobbly_score(), every=3)
  whole, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path / "whole"),
                        select=whole_select)
  with pytest.raises(_Interrupted):
    engine.fit(_MLP(), _loss, config, _data(stop_after=11), str(tmp_path / "resumed"),
               select=engine.BestSelection(_wobbly_score(), every=3))
  select = engine.BestSelection(_wobbly_score(), every=3)
  resumed, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path / "resumed"),
                          select=select)
  assert [s for s, _ in select.history] == [9, 12, 15]  # resumed from step 8
  assert select.chosen == whole_select.chosen
  _assert_params_close(_params(whole), _params(resumed), 0, 0)
  again = engine.BestSelection(_wobbly_score(), every=3)  # a finished run: reused, same choice
  reused, _ = engine.fit(_MLP(), _loss, config, _data(), str(tmp_path / "resumed"), select=again)
  assert again.history == [] and again.chosen == whole_select.chosen
  _assert_params_close(_params(whole), _params(reused), 0, 0)


def test_best_selection_needs_an_epoch_length(tmp_path):
  with pytest.raises(ConfigError, match="steps_per_epoch"):
    engine.fit(_MLP(), _loss, _config(total=4), _data(), str(tmp_path),
               select=engine.BestSelection(_wobbly_score()))


def test_best_selection_keeps_the_first_of_equal_scores(tmp_path):
  record = []
  select = engine.BestSelection(lambda model: record.append(_params(model)) or 0.5, every=2)
  model, _ = engine.fit(_MLP(), _loss, _config(total=6), _data(), str(tmp_path), select=select)
  assert select.chosen == (2, 0.5)
  _assert_params_close(_params(model), record[0], 0, 0)

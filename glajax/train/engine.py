"""The fine-tuning engine: a jitted, donated train step over a device mesh, and the training loop.

A recipe gives a model (an NNX module), a loss ``loss_fn(model, teacher, batch, rng) -> (loss,
metrics)`` and a config; the engine splits the model with ``nnx.split`` at the jit boundary (pure
state pytrees in, ``nnx.merge`` inside), replicates params and optimiser state over the ``data``
mesh axis, shards batches on their leading axis, accumulates gradients over micro-batches with a
scan, updates the EMA teacher, checkpoints with Orbax, logs JSON lines and caches eval logits.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from glajax.errors import ConfigError, TrainingError, bad_argument
from glajax.train import losses
from glajax.train.checkpoint import Checkpointer
from glajax.train.mesh import DATA_AXIS, data_sharding, make_mesh, replicated, shard_batch
from glajax.train.state import TrainState, create_train_state, make_optimizer

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


def default_config() -> ml_collections.ConfigDict:
  """The engine's settings; recipes override ``optimizer`` and the step counts."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      total_steps=1000,
      accum_steps=1,           # micro-batches per optimiser step (scanned; same global batch)
      log_every=50,
      checkpoint_every=500,    # 0: no periodic checkpoints
      keep_checkpoints=3,
      eval_every=0,            # 0: evaluate only at the end
      progress=True,
      tensorboard=True,        # when tensorboard is installed
      optimizer=dict(name="adamw", learning_rate=3e-5, weight_decay=0.1, b1=0.9, b2=0.999,
                     eps=1e-8, momentum=0.9, nesterov=False, warmup_steps=500,
                     schedule="cosine", grad_clip_norm=1.0, trainable=(".*",), groups=()),
      teacher=dict(enabled=False, every=500, start=0.05, end=0.9, warmup_fraction=0.2),
  ))


def split_model(model: nnx.Module):
  """(graphdef, params, rest): the NNX graph and two pure dicts, the ``nnx.Param``s and the rest."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _microbatches(batch, accum_steps: int, mesh):
  """(B, ...) -> (k, B/k, ...), micro-batch i = rows i, i+k, i+2k, ... so each stays sharded."""
  spec = NamedSharding(mesh, P(None, DATA_AXIS))

  def split(x):
    if x.shape[0] % accum_steps:
      raise bad_argument("batch", f"a leading axis divisible by accum_steps={accum_steps}",
                         f"shape {x.shape}")
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spec)

  return jax.tree.map(split, batch)


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation, mesh, *,
                    accum_steps: int = 1, teacher_config=None, total_steps: int = 1):
  """``step(state, rest, batch) -> (state, metrics)``: jitted, ``state`` donated, params
  replicated and ``batch`` sharded on ``data``. With a teacher, every ``teacher.every`` steps
  θ_t ← m·θ_t + (1 − m)·θ_s with CaRot's momentum m(step)."""
  if accum_steps < 1:
    raise bad_argument("accum_steps", "a positive integer", accum_steps, ConfigError)
  if teacher_config is not None and teacher_config.enabled and teacher_config.every < 1:
    raise bad_argument("teacher.every", "a positive number of steps", teacher_config.every,
                       ConfigError)

  def loss_of(params, rest, teacher, batch, rng):
    model = nnx.merge(graphdef, params, rest)
    teacher_model = None if teacher is None else nnx.merge(graphdef, teacher, rest)
    loss, metrics = loss_fn(model, teacher_model, batch, rng)
    return loss, dict(metrics)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step(state: TrainState, rest, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      (loss, metrics), grads = grad_fn(state.params, rest, state.teacher, batch, rng)
    else:
      def accumulate(carry, micro):
        i, micro_batch = micro
        out, g = grad_fn(state.params, rest, state.teacher, micro_batch,
                         jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (out, g)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          grad_fn, state.params, rest, state.teacher,
          jax.tree.map(lambda x: x[: x.shape[0] // accum_steps], batch), rng))
      micro = (jnp.arange(accum_steps), _microbatches(batch, accum_steps, mesh))
      ((loss, metrics), grads), _ = jax.lax.scan(accumulate, zeros, micro)
      loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_step = state.step + 1
    teacher = state.teacher
    if teacher is not None:
      momentum = losses.teacher_momentum(new_step, total_steps, teacher_config.start,
                                         teacher_config.end, teacher_config.warmup_fraction)
      teacher = jax.lax.cond(new_step % teacher_config.every == 0,
                             lambda t: losses.ema_update(t, params, momentum), lambda t: t,
                             teacher)
    state = state.replace(params=params, opt_state=opt_state, teacher=teacher, step=new_step)
    return state, {"loss": loss, **metrics}

  repl, data = replicated(mesh), data_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, repl, data), out_shardings=(repl, repl),
                 donate_argnums=0)


def _put_replicated(tree, mesh):
  """Fresh global copies of host values on every device of ``mesh`` (works across processes)."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def _to_host(tree):
  """Process-local NumPy copies of replicated global arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _global_batch(batch, mesh):
  """Sharded global arrays pass through; this process's NumPy slice is sharded first."""
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
    return batch
  return shard_batch(batch, mesh)


def image_logits(model, batch):
  """The ``logits_fn`` of an image classifier: ``model(batch["image"])``."""
  return model(batch["image"])


@functools.lru_cache(maxsize=32)
def _predict_fn(graphdef, logits_fn, mesh):
  """The jitted ``logits_fn`` of one model structure on one mesh, compiled once and reused by
  every evaluation (e.g. each WiSE-FT α) of a model with that structure."""
  repl, data = replicated(mesh), data_sharding(mesh)
  return jax.jit(lambda p, r, b: logits_fn(nnx.merge(graphdef, p, r), b).astype(jnp.float32),
                 in_shardings=(repl, repl, data), out_shardings=data)


def evaluate_logits(model: nnx.Module, logits_fn, batches, mesh=None):
  """(logits, labels) as NumPy over every batch, padding rows (``mask`` == 0) dropped.

  ``logits_fn(model, batch) -> (B, C)`` runs jitted with the batch sharded on ``data``.
  """
  mesh = make_mesh() if mesh is None else mesh
  graphdef, params, rest = split_model(model)
  predict = _predict_fn(graphdef, logits_fn, mesh)
  all_logits, all_labels = [], []
  for batch in batches:
    batch = _global_batch(batch, mesh)
    logits = multihost_utils.process_allgather(predict(params, rest, batch), tiled=True)
    labels = multihost_utils.process_allgather(batch["label"], tiled=True)
    keep = (multihost_utils.process_allgather(batch["mask"], tiled=True).astype(bool)
            if "mask" in batch else np.ones(len(labels), bool))
    all_logits.append(np.asarray(logits)[keep])
    all_labels.append(np.asarray(labels)[keep].astype(np.int32))
  if not all_logits:
    raise bad_argument("batches", "at least one evaluation batch", "none")
  return np.concatenate(all_logits), np.concatenate(all_labels)


def save_npz(path: str, **arrays) -> None:
  """Writes ``arrays`` to ``path`` (.npz) through a temporary file and a rename: never
  half-written."""
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def save_logits(path: str, logits, labels, metadata: Mapping) -> None:
  """Writes ``logits``, ``labels`` and JSON ``metadata`` to ``path`` (.npz) atomically."""
  save_npz(path, logits=np.asarray(logits, np.float32), labels=np.asarray(labels, np.int32),
           metadata=np.asarray(json.dumps(dict(metadata))))


class _MetricsLog:
  """JSON lines in ``metrics.jsonl`` (+ TensorBoard when installed), written by process 0."""

  def __init__(self, workdir: str, tensorboard: bool):
    self._active = jax.process_index() == 0
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a") if self._active else None
    self._tb = None
    if self._active and tensorboard and importlib.util.find_spec("tensorboard") is not None:
      from flax.metrics.tensorboard import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self._active:
      return
    self._file.write(json.dumps({"step": step, **metrics}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.scalar(name, value, step)

  def close(self):
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def fit(model: nnx.Module, loss_fn: LossFn, config, data: Callable[[int], Iterator],
        workdir: str, *, mesh=None, evaluators: Mapping | None = None,
        eval_model: Callable | None = None, export: Callable | None = None):
  """Trains ``model`` for ``config.total_steps`` optimiser steps; returns (trained model, state).

  ``data(start_step)`` yields the batches from ``start_step`` on (this process's NumPy slice, or
  global sharded arrays), so a resumed run sees the same data as an uninterrupted one.
  ``evaluators``: name -> (batches_fn, logits_fn); logits are cached every ``eval_every`` steps and
  at the end to ``workdir/logits/<name>_step<k>.npz``; ``eval_model(model)`` turns the trained
  model into the evaluated one first (e.g. a classifier with a rebuilt zero-shot head).
  ``export(model, directory)`` writes the
  final model to ``workdir/final`` (e.g. ``glajax.save_clip``).
  Raises TrainingError on a non-finite loss; checkpoints before that step stay as they were.
  """
  mesh = make_mesh() if mesh is None else mesh
  os.makedirs(workdir, exist_ok=True)
  graphdef, params, rest = split_model(model)
  total = int(config.total_steps)
  tx, schedule = make_optimizer(config.optimizer, params, total)
  state = _put_replicated(create_train_state(params, tx, config.seed, config.teacher.enabled), mesh)
  rest = _put_replicated(rest, mesh)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                              config.keep_checkpoints)
  start = checkpointer.latest_step() or 0
  if start:
    state = checkpointer.restore(start, state)
  step_fn = make_train_step(graphdef, loss_fn, tx, mesh, accum_steps=config.accum_steps,
                            teacher_config=config.teacher, total_steps=total)
  log = _MetricsLog(workdir, config.tensorboard)
  bar = tqdm.tqdm(total=total, initial=start, disable=not config.progress
                  or jax.process_index() != 0, desc="train")
  evaluators = dict(evaluators or {})
  pending, examples, clock = [], 0, time.perf_counter()

  def flush(step):
    nonlocal pending, examples, clock
    if not pending:
      return
    values = jax.device_get(pending)
    for i, metrics in enumerate(values):
      if not np.isfinite(metrics["loss"]):
        last = checkpointer.latest_step()
        raise TrainingError(
            f"loss: expected a finite value, found {float(metrics['loss'])} at step "
            f"{step - len(values) + i + 1}; training stopped, the last good checkpoint is "
            f"{'step ' + str(last) if last else 'none'} in {os.path.join(workdir, 'checkpoints')}")
    elapsed = time.perf_counter() - clock
    summary = {k: float(np.mean([m[k] for m in values])) for k in values[-1]}
    summary["learning_rate"] = float(schedule(step))
    summary["examples_per_s"] = examples / max(elapsed, 1e-9)
    log.write(step, summary)
    bar.set_postfix(loss=f"{summary['loss']:.4f}", img_s=f"{summary['examples_per_s']:.1f}")
    pending, examples, clock = [], 0, time.perf_counter()

  def run_evaluators(step):
    os.makedirs(os.path.join(workdir, "logits"), exist_ok=True)
    evaluated = nnx.merge(graphdef, state.params, rest)
    if eval_model is not None:
      evaluated = eval_model(evaluated)
    for name, (batches_fn, logits_fn) in evaluators.items():
      logits, labels = evaluate_logits(evaluated, logits_fn, batches_fn(), mesh)
      if jax.process_index() == 0:
        save_logits(os.path.join(workdir, "logits", f"{name}_step{step}.npz"), logits, labels,
                    {"name": name, "step": step, "workdir": os.path.abspath(workdir)})

  try:
    batches = data(start)
    for step in range(start + 1, total + 1):
      try:
        batch = _global_batch(next(batches), mesh)
      except StopIteration:
        raise bad_argument("data", f"batches up to step {total}", f"the end at step {step - 1}",
                           ConfigError) from None
      state, metrics = step_fn(state, rest, batch)
      pending.append(metrics)
      examples += jax.tree.leaves(batch)[0].shape[0]
      bar.update(1)
      save_due = config.checkpoint_every > 0 and step % config.checkpoint_every == 0
      eval_due = config.eval_every > 0 and step % config.eval_every == 0
      if step % config.log_every == 0 or save_due or eval_due or step == total:
        flush(step)
      if save_due:
        checkpointer.save(step, state)
      if eval_due and step != total:
        run_evaluators(step)
    flush(total)
    if total > start and config.checkpoint_every > 0:
      checkpointer.save(total, state, force=True)
    if evaluators:
      run_evaluators(total)
  finally:
    bar.close()
    log.close()
    checkpointer.close()
  model = nnx.merge(graphdef, _to_host(state.params), _to_host(rest))
  if export is not None and jax.process_index() == 0:
    export(model, os.path.join(workdir, "final"))
  return model, state

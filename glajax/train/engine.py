"""The fine-tuning engine: a jitted, donated train step over a device mesh, and the training loop.

A recipe gives a model (an NNX module), a loss ``loss_fn(model, batch, rng) -> (loss, metrics)``
and a config; the engine splits the model with ``nnx.split`` at the jit boundary (pure state
pytrees in, ``nnx.merge`` inside), places params, optimiser state and the rest of the model's
state on the mesh as ``config.sharding`` says (``"replicated"``, or ``"fsdp"``: sharded over the
``data`` axis by ``glajax.parallel.fsdp_spec``) and, with ``config.model_parallel`` > 1, the
arrays ``layers.tensor_axis`` names split over the mesh's ``model`` axis (tensor parallelism),
shards batches on their leading axis and
accumulates gradients over micro-batches with a scan. BatchNorm (``config.batch_stats``): in
``"train"`` mode the loss runs the model with batch statistics and the step carries the updated
running statistics in the train state (:func:`make_train_step`); ``"frozen"`` keeps the running
ones. Everything else is a hook: logging and the
non-finite guard (:class:`MetricsLog`), checkpoints (:class:`CheckpointHook`), a recipe's second
copy of the parameters updated inside the step (``teacher_update``, CaRot's EMA teacher: the loss
then receives the teacher model as its fourth argument) and the best-validation model
(:class:`BestSelection`).
"""
from __future__ import annotations

import hashlib
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
from jax.sharding import NamedSharding, PartitionSpec as P

from glajax.errors import ConfigError, TrainingError, bad_argument
from glajax.evaluate import global_batch, set_batch_norm, split_model
from glajax.models import layers
from glajax.schema import Field
from glajax import parallel
from glajax.parallel import DATA_AXIS, data_sharding, is_primary, make_mesh, replicated
from glajax.train.checkpoint import Checkpointer
from glajax.train.state import (FROZEN, SCHEDULES, WARMUPS, TrainState, create_train_state,
                                make_optimizer, param_labels)

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
# (teacher params, params after the update, 0-based step k) -> new teacher params
TeacherUpdate = Callable[[dict, dict, jax.Array], dict]
# BatchNorm in training: "train" (batch statistics, running ones updated: torch's model.train())
# or "frozen" (running statistics, kept as loaded: model.eval()).
BATCH_STATS = ("train", "frozen")


def default_config() -> ml_collections.ConfigDict:
  """The engine's settings; recipes override ``optimizer`` and the step counts."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      total_steps=1000,
      sharding="replicated",   # or "fsdp": params, gradients, optimiser state sharded (parallel)
      model_parallel=1,        # devices per tensor-parallel group (the mesh's ``model`` axis)
      accum_steps=1,           # micro-batches per optimiser step (scanned; same global batch)
      batch_stats="train",     # BatchNorm: "train" or "frozen" (BATCH_STATS; recipes set theirs)
      log_every=50,
      checkpoint_every=500,    # 0: no periodic checkpoints
      keep_checkpoints=3,
      progress=True,
      tensorboard=True,        # TensorBoard through clu.metric_writers, when installed
      wandb=False,             # also Weights & Biases (needs `pip install wandb`; WANDB_PROJECT)
      optimizer=dict(name="adamw", learning_rate=3e-5, weight_decay=0.1, b1=0.9, b2=0.999,
                     eps=1e-8, momentum=0.9, nesterov=False, warmup_steps=500,
                     schedule="cosine", grad_clip_norm=1.0, trainable=(".*",), groups=()),
  ))


_STEP = Field("int", 0)
# The keys of ``default_config`` this engine reads, as ``glajax.schema`` declares them.
FIELDS = {
    "seed": Field("int", 0), "total_steps": Field("int"), "accum_steps": Field("int", 1),
    "sharding": Field("choice", choices=parallel.SHARDINGS, result=False),
    "model_parallel": Field("int", 1, result=False),
    "batch_stats": Field("choice", choices=BATCH_STATS),
    "log_every": Field("int", 1, result=False), "checkpoint_every": Field("int", 0, result=False),
    "keep_checkpoints": Field("int", 1, result=False), "progress": Field("bool", result=False),
    "tensorboard": Field("bool", result=False), "wandb": Field("bool", result=False),
    "optimizer.name": Field("choice", choices=("adamw", "sgd")),
    "optimizer.learning_rate": Field("positive", 0), "optimizer.weight_decay": Field("float", 0),
    "optimizer.b1": Field("float", 0, 1), "optimizer.b2": Field("float", 0, 1),
    "optimizer.eps": Field("positive", 0), "optimizer.momentum": Field("float", 0, 1),
    "optimizer.nesterov": Field("bool"), "optimizer.warmup_steps": _STEP,
    "optimizer.warmup_epochs": Field("int", 0, optional=True),
    "optimizer.warmup": Field("choice", choices=WARMUPS),
    "optimizer.warmup_lr": Field("float", 0, optional=True),
    "optimizer.schedule": Field("choice", choices=SCHEDULES),
    "optimizer.steps_per_epoch": _STEP, "optimizer.grad_clip_norm": Field("float", 0),
    "optimizer.trainable": Field("any"), "optimizer.groups": Field("any"),
}


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


def _gradients(grad_fn, state: TrainState, rest, batch, rng, accum_steps: int, mesh,
               param_shardings):
  """((loss, metrics), grads, batch_stats) of the step's batch: loss, metrics and gradients
  averaged over ``accum_steps`` scanned micro-batches, the BatchNorm statistics (if trained)
  updated by each micro-batch in turn, as torch's forward passes over them would; gradients are
  constrained to ``param_shardings`` as they are made (under FSDP: reduce-scattered, so the
  accumulator is sharded too)."""

  def grads_of(stats, micro_batch, micro_rng):
    (loss, (metrics, stats)), grads = grad_fn(state.params, stats, rest, state.teacher,
                                              micro_batch, micro_rng)
    return (loss, metrics), jax.lax.with_sharding_constraint(grads, param_shardings), stats

  if accum_steps == 1:
    return grads_of(state.batch_stats, batch, rng)

  def accumulate(carry, micro):
    (total, stats), (i, micro_batch) = carry, micro
    out, grads, stats = grads_of(stats, micro_batch, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, total, (out, grads)), stats), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      grads_of, state.batch_stats, jax.tree.map(lambda x: x[: x.shape[0] // accum_steps], batch),
      rng)[:2])
  zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], param_shardings))
  micro = (jnp.arange(accum_steps), _microbatches(batch, accum_steps, mesh))
  (total, stats), _ = jax.lax.scan(accumulate, (zeros, state.batch_stats), micro)
  out, grads = jax.tree.map(lambda x: x / accum_steps, total)
  return out, grads, stats


def _with_batch_stats(rest, batch_stats):
  """``rest`` (a model's non-parameter state) with its BatchNorm statistics replaced by
  ``batch_stats`` (a sub-tree of it; None: ``rest`` as it is)."""
  if batch_stats is None:
    return rest
  if not isinstance(batch_stats, dict):
    return batch_stats
  return {**rest, **{k: _with_batch_stats(rest[k], v) for k, v in batch_stats.items()}}


def _trained_batch_stats(model, config) -> dict | None:
  """The model's BatchNorm statistics (a pure dict) when ``config.batch_stats`` trains them;
  None when they are frozen or the model has none (then the train state holds nothing more)."""
  if config.get("batch_stats", "train") != "train":
    return None
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  return stats if jax.tree.leaves(stats) else None


def _eval_model(graphdef, params, batch_stats, rest):
  """The model of ``params``, the trained ``batch_stats`` (or None) and ``rest``, its BatchNorm
  in eval mode (running statistics)."""
  return set_batch_norm(nnx.merge(graphdef, params, _with_batch_stats(rest, batch_stats)),
                        train=False)


def _finite(loss, params, batch_stats, trained) -> jax.Array:
  """Whether ``loss``, the ``trained`` leaves of ``params`` (None: all) and ``batch_stats`` are
  all finite."""
  if trained is not None:
    params = jax.tree.map(lambda x, t: x if t else None, params, trained)
  return jnp.isfinite(loss) & jnp.all(jnp.asarray(
      [jnp.isfinite(x).all() for x in jax.tree.leaves((params, batch_stats))]))


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation, mesh, *,
                    accum_steps: int = 1, teacher_update: TeacherUpdate | None = None,
                    shardings=None, trained=None):
  """``step(state, rest, batch) -> (state, metrics)``: jitted, ``state`` donated, ``batch``
  sharded on ``data``, ``state`` and ``rest`` placed as ``shardings`` (a pair of pytrees like
  them, from ``parallel.shardings``; None: replicated) says, in and out. Parameters (the
  teacher's too) and ``rest`` are gathered where the loss starts, except, when some parameter
  is split (FSDP), a tower's stacked blocks, gathered block by block in its scan
  (``layers.gather``); gradients, the optimiser update and the new state keep their shardings.
  ``metrics["finite"]`` says whether the loss, every trained parameter and every statistic
  are finite; ``trained`` is a pytree of bools like the parameters (None: all trained; ``fit``
  passes ``trained_leaves``): a frozen parameter is never updated, so the step does not read it
  again. With ``teacher_update``, the teacher is updated right after the optimiser update of
  0-based step k = ``state.step``.

  BatchNorm: with ``state.batch_stats`` (a sub-tree of ``rest``'s state), the loss runs the model
  in train mode on them (``layers.BatchNorm``: batch statistics of the global batch, SyncBN's;
  running ones updated with torch's momentum and unbiased variance) and the step returns them
  updated; without, in eval mode on ``rest``'s running statistics. The teacher always runs in
  eval mode on ``rest``'s (the statistics it was copied with: CaRot's ``teacher_enc`` is a copy
  of the eval-mode model made before ``model.train()``, its EMA over ``parameters()`` alone)."""
  if accum_steps < 1:
    raise bad_argument("train.accum_steps", "a positive integer", accum_steps, ConfigError)
  repl = replicated(mesh)
  state_shardings, rest_shardings = (repl, repl) if shardings is None else shardings
  param_shardings = repl if shardings is None else state_shardings.params
  by_block = not all(s.is_fully_replicated for s in jax.tree.leaves(param_shardings))

  def loss_of(params, batch_stats, rest, teacher, batch, rng):
    model = set_batch_norm(nnx.merge(graphdef, params, _with_batch_stats(rest, batch_stats)),
                           train=batch_stats is not None)
    layers.gather(model, mesh, by_block)
    if teacher is None:
      loss, metrics = loss_fn(model, batch, rng)
    else:
      teacher_model = layers.gather(_eval_model(graphdef, teacher, None, rest), mesh, by_block)
      loss, metrics = loss_fn(model, batch, rng, teacher_model)
    if batch_stats is not None:
      batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return loss, (dict(metrics), batch_stats)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step(state: TrainState, rest, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads, batch_stats = _gradients(grad_fn, state, rest, batch, rng,
                                                     accum_steps, mesh, param_shardings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    teacher = state.teacher
    if teacher_update is not None:
      teacher = teacher_update(teacher, params, state.step)
    finite = _finite(loss, params, batch_stats, trained)
    state = state.replace(params=params, opt_state=opt_state, teacher=teacher,
                          batch_stats=batch_stats, step=state.step + 1)
    return state, {"loss": loss, **metrics, "finite": finite}

  return jax.jit(step, in_shardings=(state_shardings, rest_shardings, data_sharding(mesh)),
                 out_shardings=(state_shardings, repl), donate_argnums=0)


def param_groups(model) -> dict[str, str]:
  """The model's parameter groups (``<group>`` in ``optimizer.trainable``), if it names any."""
  groups = getattr(model, "param_groups", None)
  return dict(groups()) if callable(groups) else {}


def _initial_state(params, batch_stats, rest, tx, config, mesh, with_teacher: bool):
  """(step 0's train state, ``rest``, their shardings) on ``mesh``, placed as ``config.sharding``
  says; the optimiser state and the teacher are made on the devices, already in their
  shardings (never whole on one device)."""

  def init(params, batch_stats):
    return create_train_state(params, tx, config.seed, with_teacher, batch_stats)

  how = config.get("sharding", "replicated")
  state_shardings = parallel.shardings(jax.eval_shape(init, params, batch_stats), mesh, how,
                                       layers.tensor_axis)
  rest_shardings = parallel.shardings(rest, mesh, how, layers.tensor_axis)
  params = parallel.put(params, state_shardings.params)
  batch_stats = parallel.put(batch_stats, state_shardings.batch_stats)
  state = jax.jit(init, out_shardings=state_shardings, donate_argnums=(0, 1))(params,
                                                                              batch_stats)
  return state, parallel.put(rest, rest_shardings), (state_shardings, rest_shardings)


class _WandbWriter:
  """The ``clu.metric_writers.MetricWriter`` calls the engine makes, sent to Weights & Biases.
  The run id is derived from the run directory, so a resumed run continues its W&B run."""

  def __init__(self, workdir: str, name: str, config):
    import wandb  # noqa  (optional: only when train.wandb asks for it)
    run_id = hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]
    self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "glajax"), name=name,
                           id=run_id, resume="allow", dir=workdir,
                           config=json.loads(config.to_json_best_effort()))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=step)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self._run.finish()


def _tensorboard_writer(logdir: str):
  """clu's TensorBoard ``SummaryWriter`` (TensorFlow kept off the accelerators), or None when
  clu, TensorBoard or TensorFlow is not installed."""
  try:
    # TensorFlow first through glajax's input pipelines, which keep it off the GPUs.
    from glajax.data import preprocess  # noqa  (imports TensorFlow: only when a writer is asked)
    from clu import metric_writers  # noqa  (imports TensorFlow and TensorBoard: only when asked)
  except ImportError:
    return None
  del preprocess
  return metric_writers.SummaryWriter(logdir)


def _metric_writers(workdir: str, config, name: str) -> list:
  """The metric writers ``config`` asks for: TensorBoard (``tensorboard``, in
  ``workdir/tensorboard``, when installed) and Weights & Biases (``wandb``; raises a ConfigError
  when ``wandb`` is not installed)."""
  writers = []
  if config.get("tensorboard", False):
    tensorboard = _tensorboard_writer(os.path.join(workdir, "tensorboard"))
    if tensorboard is not None:
      writers.append(tensorboard)
  if config.get("wandb", False):
    if importlib.util.find_spec("wandb") is None:
      raise bad_argument("train.wandb", "the wandb package installed (pip install wandb)",
                         "no module named wandb; set train.wandb=False or install it",
                         ConfigError)
    writers.append(_WandbWriter(workdir, name, config))
  return writers


class MetricsLog:
  """The logging hook: JSON lines in ``metrics.jsonl``, the same scalars through
  ``clu.metric_writers`` (TensorBoard; Weights & Biases when ``wandb`` is set) and a progress bar
  labelled ``name`` with images/s, written by process 0 every ``log_every`` steps; also the
  non-finite guard, which raises a TrainingError naming the step before anything of that step is
  saved or exported. A finished run reused, or a run resumed, says so in one line."""

  def __init__(self, workdir: str, config, schedule, start: int, checkpoints: Checkpointer,
               name: str = "train"):
    self._active = is_primary()
    self._workdir, self._schedule, self._checkpoints = workdir, schedule, checkpoints
    self._every = max(int(config.log_every), 1)
    total = int(config.total_steps)
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a") if self._active else None
    self._writers = _metric_writers(workdir, config, name) if self._active else []
    if self._active and start > 0:
      print(f"{name}: " + (f"finished run reused ({total} steps) from {workdir}" if start >= total
                           else f"resuming at step {start} of {total} from {workdir}"),
            flush=True)
    self._bar = tqdm.tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True,
                          disable=not config.progress or not self._active or start >= total)
    self._pending, self._examples, self._clock = [], 0, time.perf_counter()

  def after_step(self, step: int, metrics, examples: int, flush: bool) -> None:
    self._pending.append(metrics)
    self._examples += examples
    self._bar.update(1)
    if flush or step % self._every == 0:
      self.flush(step)

  def flush(self, step: int) -> None:
    """Checks and writes the pending steps' metrics (the first non-finite one raises)."""
    if not self._pending:
      return
    values = jax.device_get(self._pending)
    for i, metrics in enumerate(values):
      if not metrics.pop("finite"):
        self._raise_non_finite(step - len(values) + i + 1, float(metrics["loss"]))
    elapsed = time.perf_counter() - self._clock
    summary = {k: float(np.mean([m[k] for m in values])) for k in values[-1]}
    summary["learning_rate"] = float(self._schedule(step))
    summary["examples_per_s"] = self._examples / max(elapsed, 1e-9)
    if self._active:
      self._file.write(json.dumps({"step": step, **summary}) + "\n")
      self._file.flush()
      for writer in self._writers:
        writer.write_scalars(step, summary)
    self._bar.set_postfix({"loss": f"{summary['loss']:.4f}",
                           "images/s": f"{summary['examples_per_s']:.0f}"})
    self._pending, self._examples, self._clock = [], 0, time.perf_counter()

  def _raise_non_finite(self, step: int, loss: float):
    last = self._checkpoints.latest_step()
    what = (f"loss {loss}" if not np.isfinite(loss)
            else f"non-finite parameters after the update (loss {loss})")
    raise TrainingError(
        f"loss: expected a finite value and finite parameters, found {what} at step {step} "
        f"of the run in {self._workdir}; training stopped and nothing was exported; the last "
        f"good checkpoint is {'step ' + str(last) if last else 'none'} in "
        f"{os.path.join(self._workdir, 'checkpoints')}")

  def close(self):
    self._bar.close()
    if self._file is not None:
      self._file.close()
    for writer in self._writers:
      writer.flush()
      writer.close()


def _flat(params) -> dict:
  """{'a/b/kernel': leaf} of a nested params dict."""
  return {parallel.key_path(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


class BestSelection:
  """The best-validation hook (Dassl's ``TEST.FINAL_MODEL "best_val"``: ``engine/trainer.py``
  ``after_epoch`` tests on the validation split after every epoch and saves ``model-best`` when
  ``curr_result > self.best_result``; ``after_train`` loads it).

  After every ``every`` optimiser steps (None: one epoch, ``optimizer.steps_per_epoch``),
  ``score(model)`` (a float, higher is better; the model's BatchNorm in eval mode) of the model
  so far; the trainable parameters (and trained BatchNorm statistics) of the first best score
  are kept and ``fit`` returns them in place of the last ones. They ride in the checkpoints, so
  a resumed run selects what an uninterrupted one does. ``history`` holds (step, score) of the
  epochs this invocation evaluated; ``chosen`` the kept (step, score).
  """

  def __init__(self, score: Callable[[nnx.Module], float], every: int | None = None):
    self.score, self.every = score, every
    self.history: list[tuple[int, float]] = []
    self.chosen: tuple[int, float] | None = None

  def period(self, config) -> int:
    every = self.every or config.optimizer.get("steps_per_epoch", 0)
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
      raise bad_argument("select.every (or train.optimizer.steps_per_epoch)",
                         "a positive number of steps between evaluations", repr(every),
                         ConfigError)
    return int(every)

  @staticmethod
  def initial(params, config, aliases: dict | None = None, batch_stats=None) -> dict:
    """Nothing kept yet: score −∞, the trainable leaves and the trained BatchNorm statistics
    (if any) as they are (``aliases``: the model's parameter groups, for ``<group>``
    patterns)."""
    labels = _flat(param_labels(params, config.optimizer.trainable,
                                config.optimizer.get("groups", ()), aliases))
    kept = {"score": np.float32(-np.inf), "step": np.int32(0),
            "params": {p: x for p, x in _flat(params).items() if labels[p] != FROZEN}}
    return kept if batch_stats is None else {**kept, "batch_stats": batch_stats}

  def update(self, kept: dict, step: int, model, state: TrainState, mesh) -> dict:
    score = float(np.float32(self.score(model)))  # as the checkpoints hold it
    self.history.append((step, score))
    if not score > float(np.asarray(kept["score"].addressable_data(0))):
      return kept
    flat = _flat(state.params)
    fresh = {"score": np.float32(score), "step": np.int32(step)}
    fresh = parallel.put(fresh, parallel.shardings(fresh, mesh))
    fresh["params"] = {p: jnp.copy(flat[p]) for p in kept["params"]}
    if "batch_stats" in kept:
      fresh["batch_stats"] = jax.tree.map(jnp.copy, state.batch_stats)
    return fresh

  def best(self, state: TrainState, kept: dict):
    """(params, batch_stats) of ``state`` with the kept leaves in place (the last ones if no
    epoch was scored)."""
    step = int(np.asarray(kept["step"].addressable_data(0)))
    if step == 0:
      return state.params, state.batch_stats
    self.chosen = (step, float(np.asarray(kept["score"].addressable_data(0))))
    leaves = kept["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaves.get(parallel.key_path(path), leaf), state.params)
    return params, kept.get("batch_stats", state.batch_stats)


def _checked_config(config) -> int:
  """The run's step count, after the engine settings that would fail late are checked."""
  for key, lo in (("total_steps", 1), ("accum_steps", 1), ("model_parallel", 1), ("log_every", 1),
                  ("checkpoint_every", 0), ("keep_checkpoints", 1)):
    value = config.get(key, 1) if key == "model_parallel" else config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
      raise bad_argument(f"train.{key}", f"an integer >= {lo}", repr(value), ConfigError)
  for key, options in (("sharding", parallel.SHARDINGS), ("batch_stats", BATCH_STATS)):
    if config.get(key, options[0]) not in options:
      raise bad_argument(f"train.{key}", f"one of {', '.join(options)}", repr(config.get(key)),
                         ConfigError)
  return int(config.total_steps)


def _mesh(mesh, model: int):
  """``mesh`` (default: every device), re-shaped to a ``model`` axis of ``model`` devices
  (``train.model_parallel``) if it has another."""
  devices = jax.devices() if mesh is None else list(mesh.devices.flat)
  if mesh is not None and parallel.axis_size(mesh, parallel.MODEL_AXIS) == model:
    return mesh
  if len(devices) % model:
    raise bad_argument("train.model_parallel", f"a divisor of the {len(devices)} devices",
                       model, ConfigError)
  return make_mesh(devices, model)


def _initial_kept(select: BestSelection | None, params, batch_stats, config, model, mesh):
  """The best-validation state before any epoch (None without ``select``), its leaves placed
  as the parameters of their shapes are (``config.sharding``)."""
  if select is None:
    return None
  kept = select.initial(params, config, param_groups(model), batch_stats)
  return parallel.put(kept, parallel.shardings(kept, mesh, config.get("sharding", "replicated"),
                                               layers.tensor_axis))


def _resume(checkpoints: Checkpointer, state: TrainState, kept):
  """(start step, state, kept) of the newest checkpoint that restores, or (0, ``state``,
  ``kept``) as given."""
  start, restored = checkpoints.restore_latest(state if kept is None else (state, kept))
  if restored is None:
    return 0, state, kept
  return (start, *restored) if kept is not None else (start, restored, None)


def trained_leaves(params, config, model):
  """Whether each parameter of ``model`` is trained (``make_train_step``'s ``trained``): its
  optimiser label (``param_labels`` of ``config.optimizer``) is not ``FROZEN``."""
  return jax.tree.map(lambda label: label != FROZEN, param_labels(
      params, config.optimizer.get("trainable", (".*",)), config.optimizer.get("groups", ()),
      param_groups(model)))


def fit(model: nnx.Module, loss_fn: LossFn, config, data: Callable[[int], Iterator],
        workdir: str, *, mesh=None, teacher_update: TeacherUpdate | None = None,
        select: BestSelection | None = None, name: str = "train"):
  """Trains ``model`` for ``config.total_steps`` optimiser steps; returns (trained model, state).

  ``data(start_step)`` yields the batches from ``start_step`` on (this process's NumPy slice, or
  global sharded arrays), so a resumed run sees the same data as an uninterrupted one. Resumes
  from the newest checkpoint in ``workdir/checkpoints`` that restores, written on any number of
  devices under either ``config.sharding`` (the state is restored into this run's placement;
  the returned state keeps it, the returned model holds host copies). Raises TrainingError when
  the loss or the parameters stop being finite (the final update included), so a diverged model
  is never returned; checkpoints before that step stay as they were. The last step is always
  checkpointed (``checkpoint_every`` = 0 turns off the periodic ones only), so a finished run
  is reused, not retrained. ``select`` (:class:`BestSelection`) makes it return the
  best-scoring epoch's parameters instead of the last ones. ``name`` labels the progress bar.
  ``config.batch_stats="train"`` trains a model's BatchNorm statistics with it
  (:func:`make_train_step`); the returned model's BatchNorm is in eval mode.
  """
  total = _checked_config(config)
  mesh = _mesh(mesh, config.get("model_parallel", 1))
  os.makedirs(workdir, exist_ok=True)
  graphdef, params, rest = split_model(model)
  batch_stats = _trained_batch_stats(model, config)
  tx, schedule = make_optimizer(config.optimizer, params, total, param_groups(model))
  state, rest, shardings = _initial_state(params, batch_stats, rest, tx, config, mesh,
                                          teacher_update is not None)
  checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                             config.keep_checkpoints)
  period = 0 if select is None else select.period(config)
  kept = _initial_kept(select, params, batch_stats, config, model, mesh)
  start, state, kept = _resume(checkpoints, state, kept)
  step_fn = make_train_step(graphdef, loss_fn, tx, mesh, accum_steps=config.accum_steps,
                            teacher_update=teacher_update, shardings=shardings,
                            trained=trained_leaves(params, config, model))
  log = MetricsLog(workdir, config, schedule, start, checkpoints, name)
  try:
    batches = data(start)
    for step in range(start + 1, total + 1):
      try:
        batch = global_batch(next(batches), mesh)
      except StopIteration:
        raise bad_argument("data", f"batches up to step {total}", f"the end at step {step - 1}",
                           ConfigError) from None
      state, metrics = step_fn(state, rest, batch)
      every = config.checkpoint_every
      scored = select is not None and step % period == 0
      save_due = (every > 0 and step % every == 0) or step == total  # the last step: always
      log.after_step(step, metrics, jax.tree.leaves(batch)[0].shape[0],
                     flush=save_due or scored)
      if scored:  # after the flush: a non-finite model is never scored
        kept = select.update(kept, step, _eval_model(graphdef, state.params, state.batch_stats,
                                                     rest), state, mesh)
      if save_due:  # after the flush: a non-finite step is never saved
        checkpoints.save(step, state if kept is None else (state, kept), force=True)
    log.flush(total)
  finally:
    log.close()
    checkpoints.close()
  params, batch_stats = select.best(state, kept) if select else (state.params, state.batch_stats)
  return _eval_model(graphdef, *parallel.to_host((params, batch_stats, rest))), state

"""The train state and the Optax optimiser of every recipe (schedule, clipping, freezing, groups).

Parameters are a pure nested dict of float32 arrays (``nnx.split`` then ``to_pure_dict``), so the
state is a plain pytree that jit, Optax and Orbax all take as is.
"""
from __future__ import annotations

import re

import flax.struct
import jax
import jax.numpy as jnp
import optax

from glajax.errors import ConfigError, bad_argument

FROZEN = "frozen"


@flax.struct.dataclass
class TrainState:
  """params, opt_state, EMA teacher params (or None), step (int32 scalar) and rng (a PRNG key)."""
  params: dict
  opt_state: optax.OptState
  teacher: dict | None
  step: jax.Array
  rng: jax.Array


def create_train_state(params, tx: optax.GradientTransformation, seed: int,
                       with_teacher: bool = False) -> TrainState:
  """Step 0: the optimiser initialised on ``params``; the teacher (if any) starts as ``params``."""
  return TrainState(params=params, opt_state=tx.init(params),
                    teacher=jax.tree.map(jnp.array, params) if with_teacher else None,
                    step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed))


def param_path(path) -> str:
  """'a/b/0/kernel' for a key path of a nested params dict."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_labels(params, trainable=(".*",), groups=()):
  """The optimiser group of every leaf: ``'frozen'`` unless a ``trainable`` regex matches its path,
  else the name of the first group whose ``pattern`` matches, else ``'default'``."""
  trainable = [re.compile(p) for p in trainable]
  groups = [(g["name"], re.compile(g["pattern"])) for g in groups]

  def label(path, _):
    name = param_path(path)
    if not any(p.search(name) for p in trainable):
      return FROZEN
    return next((g for g, p in groups if p.search(name)), "default")

  labels = jax.tree_util.tree_map_with_path(label, params)
  if all(lab == FROZEN for lab in jax.tree.leaves(labels)):
    raise bad_argument("optimizer.trainable", "patterns matching at least one parameter path",
                       list(map(lambda p: p.pattern, trainable)), ConfigError)
  return labels


def learning_rate_schedule(config, total_steps: int):
  """Linear warmup from 0 over ``warmup_steps``, then cosine to 0 at ``total_steps`` or constant."""
  lr, warmup = config.learning_rate, config.get("warmup_steps", 0)
  schedule = config.get("schedule", "cosine")
  if schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
  else:
    raise bad_argument("optimizer.schedule", "'cosine' or 'constant'", repr(schedule), ConfigError)
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _base_optimizer(config, learning_rate, weight_decay):
  name = config.get("name", "adamw")
  if name == "adamw":
    return optax.adamw(learning_rate, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                       eps=config.get("eps", 1e-8), weight_decay=weight_decay)
  if name == "sgd":
    # PyTorch's SGD: the decay wd·θ is added to the gradient before momentum.
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=config.get("momentum", 0.9),
                                 nesterov=config.get("nesterov", False)))
  raise bad_argument("optimizer.name", "'adamw' or 'sgd'", repr(name), ConfigError)


def make_optimizer(config, params, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                 callable]:
  """The recipe's optimiser and its learning-rate schedule.

  config: ``name`` ('adamw' | 'sgd'), ``learning_rate``, ``weight_decay``, ``warmup_steps``,
  ``schedule``, ``grad_clip_norm`` (0: none), ``b1``, ``b2``, ``eps``, ``momentum``,
  ``trainable`` (regexes of trained parameter paths, the rest frozen) and ``groups`` (dicts with
  ``name``, ``pattern``, ``lr_scale``, ``weight_decay``; per-group learning rate and decay).
  Frozen gradients are zeroed before clipping, so the global norm counts trained parameters only
  and XLA drops the frozen parameters' gradient computation.
  """
  schedule = learning_rate_schedule(config, total_steps)
  groups = tuple(dict(g) for g in config.get("groups", ()))
  labels = param_labels(params, tuple(config.get("trainable", (".*",))), groups)
  weight_decay = config.get("weight_decay", 0.0)
  transforms = {FROZEN: optax.set_to_zero(),
                "default": _base_optimizer(config, schedule, weight_decay)}
  for g in groups:
    scale = g.get("lr_scale", 1.0)
    transforms[g["name"]] = _base_optimizer(config, lambda s, scale=scale: scale * schedule(s),
                                            g.get("weight_decay", weight_decay))
  frozen = jax.tree.map(lambda lab: lab == FROZEN, labels)
  clip = config.get("grad_clip_norm", 0.0)
  tx = optax.chain(optax.masked(optax.set_to_zero(), frozen),
                   optax.clip_by_global_norm(clip) if clip else optax.identity(),
                   optax.multi_transform(transforms, labels))
  return tx, schedule

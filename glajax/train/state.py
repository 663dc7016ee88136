"""The train state and the Optax optimiser of every recipe (schedule, clipping, freezing, groups).

Parameters are a pure nested dict of float32 arrays (``nnx.split`` then ``to_pure_dict``), so the
state is a plain pytree that jit, Optax and Orbax all take as is. A tower's blocks are one
stacked leaf per parameter (``models.layers.Blocks``); patterns match each block's own name
(``…/layers/{i}/…``), so freezing some blocks of a stack is per block.
"""
from __future__ import annotations

import numbers
import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from glajax.errors import ConfigError, bad_argument
from glajax.models import checkpoints
from glajax.parallel import key_path

FROZEN = "frozen"


@flax.struct.dataclass
class TrainState:
  """params, opt_state, EMA teacher params (or None), step (int32 scalar), rng (a PRNG key) and
  the BatchNorm running statistics being trained (a pure dict of the model's ``nnx.BatchStat``
  leaves, or None: the model has none, or they are frozen)."""
  params: dict
  opt_state: optax.OptState
  teacher: dict | None
  step: jax.Array
  rng: jax.Array
  batch_stats: dict | None = None


def create_train_state(params, tx: optax.GradientTransformation, seed: int,
                       with_teacher: bool = False, batch_stats: dict | None = None
                       ) -> TrainState:
  """Step 0: the optimiser initialised on ``params``; the teacher (if any) starts as ``params``;
  ``batch_stats`` (if any) as given."""
  return TrainState(params=params, opt_state=tx.init(params),
                    teacher=jax.tree.map(jnp.array, params) if with_teacher else None,
                    step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed),
                    batch_stats=batch_stats)


def resolve_patterns(key: str, patterns, aliases: dict | None = None) -> list[re.Pattern]:
  """Compiled regexes of ``patterns``; an entry ``<group>`` stands for the model's parameter
  group of that name (``aliases``: the model's ``param_groups()``, e.g. ``<image>`` = the image
  tower and its projection); an unknown group or a bad regex raises, naming ``key``."""
  aliases = aliases or {}
  out = []
  for pattern in patterns:
    if isinstance(pattern, str) and pattern.startswith("<") and pattern.endswith(">"):
      if pattern[1:-1] not in aliases:
        raise bad_argument(key, f"regexes or parameter groups of the model "
                           f"({', '.join(f'<{g}>' for g in aliases) or 'none'})", repr(pattern),
                           ConfigError)
      pattern = aliases[pattern[1:-1]]
    try:
      out.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise bad_argument(key, "regular expressions", f"{pattern!r} ({e})", ConfigError) from None
  return out


def param_labels(params, trainable=(".*",), groups=(), aliases: dict | None = None):
  """The optimiser group of every leaf: ``'frozen'`` unless a ``trainable`` pattern matches its
  path, else the name of the first group whose ``pattern`` matches, else ``'default'``. Patterns
  may name the model's parameter groups as ``<group>`` (``aliases``). A stacked leaf's label is
  that of its trained blocks (see :func:`frozen_blocks`)."""
  return _labels(params, trainable, groups, aliases)[0]


def frozen_blocks(params, trainable=(".*",), groups=(), aliases: dict | None = None
                  ) -> dict[str, np.ndarray]:
  """Path -> (L,) bool array of the frozen blocks, for each stacked leaf (``…/layers/<name>``,
  L blocks) that patterns train only some blocks of: each block is matched by its own name
  ``…/layers/{i}/<name>``, as when the blocks were separate leaves."""
  return _labels(params, trainable, groups, aliases)[1]


def _labels(params, trainable, groups, aliases):
  """(labels, frozen blocks) of :func:`param_labels` and :func:`frozen_blocks`."""
  trainable = resolve_patterns("optimizer.trainable", trainable, aliases)
  groups = [(g["name"], resolve_patterns("optimizer.groups", [g["pattern"]], aliases)[0])
            for g in groups]
  partial = {}

  def label_of(name):
    if not any(p.search(name) for p in trainable):
      return FROZEN
    return next((g for g, p in groups if p.search(name)), "default")

  def label(path, leaf):
    name = key_path(path)
    labels = [label_of(n) for n in checkpoints.block_names(name, leaf) or [name]]
    trained = sorted(set(labels) - {FROZEN})
    if len(trained) > 1:
      raise bad_argument("optimizer.groups", "one group for all the trained blocks of a stacked "
                         "parameter (a tower's blocks are one stacked leaf)",
                         f"groups {trained} for the blocks of {name}", ConfigError)
    if trained and FROZEN in labels:
      partial[name] = np.array([lab == FROZEN for lab in labels])
    return trained[0] if trained else FROZEN

  labels = jax.tree_util.tree_map_with_path(label, params)
  if all(lab == FROZEN for lab in jax.tree.leaves(labels)):
    raise bad_argument("optimizer.trainable", "patterns matching at least one parameter path",
                       list(map(lambda p: p.pattern, trainable)), ConfigError)
  return labels, partial


def _zero_frozen_blocks(frozen: dict[str, np.ndarray]) -> optax.GradientTransformation:
  """Sets the frozen blocks' slices of the updates of stacked leaves (``frozen``: path -> (L,)
  bool) to 0."""

  def update(updates, state, params=None):
    del params

    def zero(path, u):
      mask = frozen.get(key_path(path))
      if mask is None:
        return u
      return jnp.where(mask.reshape((-1,) + (1,) * (u.ndim - 1)), jnp.zeros_like(u), u)

    return jax.tree_util.tree_map_with_path(zero, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


SCHEDULES = ("cosine", "epoch_cosine", "constant")
WARMUPS = ("linear", "linear_from_zero", "constant")


def _count(config, key: str) -> int:
  value = config.get(key, 0)
  if value is None:
    return 0
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise bad_argument(f"optimizer.{key}", "an int >= 0", repr(value), ConfigError)
  return int(value)


def learning_rate_schedule(config, total_steps: int):
  """The learning rate of 0-based optimiser step k (an Optax schedule of the update count).

  Warmup over the first W steps (``warmup_steps``, or ``warmup_epochs`` · ``steps_per_epoch``):

  * ``warmup="linear"`` (the default): lr·(k + 1)/W, WiSE-FT's and CaRot's ``cosine_lr``
    (mlfoundations/wise-ft ``src/models/utils.py`` ``_warmup_lr``; MLAI-Yonsei/CaRot the same);
  * ``"constant"``: ``warmup_lr`` throughout, Dassl's ``ConstantWarmupScheduler``
    (``dassl/optim/lr_scheduler.py``; GLA's ``WARMUP_TYPE: "constant"``, ``WARMUP_CONS_LR: 1e-5``);
  * ``"linear_from_zero"``: lr·k/W (glajax's earlier warmup, first step at lr 0).

  Then ``schedule``:

  * ``"cosine"``: lr·½(1 + cos(π(k − W)/(total − W))) per step, ``cosine_lr``'s decay;
  * ``"epoch_cosine"``: ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max = E)`` stepped once
    per epoch, E = ⌈total/steps_per_epoch⌉ epochs: lr·½(1 + cos(π·e/E)) for the whole epoch
    e = ⌊(k − W)/steps_per_epoch⌋ counted from the end of the warmup (LIFT ``trainer.py``; Dassl
    ``build_lr_scheduler`` with its default ``WARMUP_RECOUNT=True``, where T_max = MAX_EPOCH
    includes the warmup epochs, so the last epoch stays above 0);
  * ``"constant"``: lr.

  Per-epoch schedules need ``steps_per_epoch`` (``recipes.set_total_steps`` sets it from the
  number of training examples); without it this raises a ``ConfigError``.
  """
  lr = config.learning_rate
  schedule = config.get("schedule", "cosine")
  warmup = config.get("warmup", "linear")
  if schedule not in SCHEDULES:
    raise bad_argument("optimizer.schedule", f"one of {SCHEDULES}", repr(schedule), ConfigError)
  if warmup not in WARMUPS:
    raise bad_argument("optimizer.warmup", f"one of {WARMUPS}", repr(warmup), ConfigError)
  warmup_steps, warmup_epochs = _count(config, "warmup_steps"), _count(config, "warmup_epochs")
  steps_per_epoch = _count(config, "steps_per_epoch")
  if warmup_steps and warmup_epochs:
    raise bad_argument("optimizer.warmup_steps", "0 when warmup_epochs is set (one warmup)",
                       f"warmup_steps={warmup_steps}, warmup_epochs={warmup_epochs}", ConfigError)
  if (schedule == "epoch_cosine" or warmup_epochs) and not steps_per_epoch:
    raise bad_argument("optimizer.steps_per_epoch",
                       "a positive int for a per-epoch schedule (recipes.set_total_steps sets it)",
                       config.get("steps_per_epoch"), ConfigError)
  total = int(total_steps)
  if total < 1:
    raise bad_argument("total_steps", "a positive number of steps", total, ConfigError)
  num_warmup = warmup_steps or warmup_epochs * steps_per_epoch
  epochs = -(-total // steps_per_epoch) if steps_per_epoch else 0
  warmup_lr = config.get("warmup_lr", 1e-5)
  decay_steps = max(total - num_warmup, 1)

  def rate(count):
    k = jnp.asarray(count, jnp.int32)
    kf = k.astype(jnp.float32)
    if warmup == "linear":
      ramp = lr * (kf + 1.0) / max(num_warmup, 1)
    elif warmup == "linear_from_zero":
      ramp = lr * kf / max(num_warmup, 1)
    else:
      ramp = jnp.full_like(kf, warmup_lr)
    after = jnp.maximum(k - num_warmup, 0)
    if schedule == "cosine":
      progress = jnp.minimum(after, decay_steps).astype(jnp.float32) / decay_steps
      decay = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif schedule == "epoch_cosine":
      epoch = (after // steps_per_epoch).astype(jnp.float32)
      decay = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    else:
      decay = jnp.full_like(kf, lr)
    return jnp.where(k < num_warmup, ramp, decay).astype(jnp.float32)

  return rate


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


def make_optimizer(config, params, total_steps: int, aliases: dict | None = None
                   ) -> tuple[optax.GradientTransformation, callable]:
  """The recipe's optimiser and its learning-rate schedule.

  config: ``name`` ('adamw' | 'sgd'), ``learning_rate``, ``weight_decay``, the schedule's keys
  (``schedule``, ``warmup``, ``warmup_steps`` or ``warmup_epochs``, ``warmup_lr``,
  ``steps_per_epoch``: see ``learning_rate_schedule``), ``grad_clip_norm`` (0: none), ``b1``, ``b2``, ``eps``, ``momentum``,
  ``trainable`` (regexes of trained parameter paths, or ``<group>`` for the model's parameter
  groups ``aliases``; the rest frozen) and ``groups`` (dicts with
  ``name``, ``pattern``, ``lr_scale``, ``weight_decay``; per-group learning rate and decay).
  Frozen gradients are zeroed before clipping, so the global norm counts trained parameters only
  and XLA drops the frozen parameters' gradient computation; the frozen blocks of a stacked
  parameter (:func:`frozen_blocks`) have their gradients zeroed before clipping and their
  updates (weight decay included) after the optimiser.
  """
  schedule = learning_rate_schedule(config, total_steps)
  groups = tuple(dict(g) for g in config.get("groups", ()))
  labels, blocks = _labels(params, tuple(config.get("trainable", (".*",))), groups, aliases)
  weight_decay = config.get("weight_decay", 0.0)
  transforms = {FROZEN: optax.set_to_zero(),
                "default": _base_optimizer(config, schedule, weight_decay)}
  for g in groups:
    scale = g.get("lr_scale", 1.0)
    transforms[g["name"]] = _base_optimizer(config, lambda s, scale=scale: scale * schedule(s),
                                            g.get("weight_decay", weight_decay))
  frozen = jax.tree.map(lambda lab: lab == FROZEN, labels)
  clip = config.get("grad_clip_norm", 0.0)
  chain = [optax.masked(optax.set_to_zero(), frozen),
           optax.clip_by_global_norm(clip) if clip else optax.identity(),
           optax.multi_transform(transforms, labels)]
  if blocks:
    chain = [chain[0], _zero_frozen_blocks(blocks), *chain[1:], _zero_frozen_blocks(blocks)]
  tx = optax.chain(*chain)
  return tx, schedule

"""Absent-class calibration (Mai et al., "Fine-Tuning is Fine, if Calibrated", NeurIPS 2024).

A model fine-tuned on the seen classes S keeps its features for the absent classes U; one bias
γ added to the absent classes' logits, z'_c = z_c + γ·1[c ∈ U], brings them back. ``absent`` is
a (C,) boolean mask of U, never empty nor full (checked when concrete).

For sample i let δ_i = max_{c∈S} z_ic − max_{c∈U} z_ic: for γ > δ_i it is predicted absent,
for γ < δ_i seen. Sorting the δ_i gives every distinct prediction pattern γ can produce; the
γ search functions below sweep all of them exactly (``_sweep``), in float32, jittable.

The authors' curve (OSU-MLB/Fine-Tuning-Is-Fine-If-Calibrated ``py/util/evaluate.py``
``_get_curve_results``) walks from γ = 0 upwards and downwards, recording the pattern after each
flip: every pattern except the one γ = 0 itself gives (the interval between the largest negative
and the smallest positive δ), which is recorded, at γ = 0, only when it is the all-seen or the
all-absent pattern (no δ ≤ 0, or no δ ≥ 0). ``_official_points`` marks that curve.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from glajax.errors import bad_argument
from glajax.methods import _checks


def _inputs(logits, labels, absent):
  logits = _checks.logits_array("logits", logits)
  labels = _checks.labels_array("labels", labels, *logits.shape)
  absent = _checks.mask_array("absent", absent, logits.shape[1])
  return logits.astype(jnp.float32), labels, absent


def apply_gamma(logits, absent, gamma) -> jax.Array:
  """z'_ic = z_ic + γ·1[c ∈ U] (float32)."""
  logits = _checks.logits_array("logits", logits)
  absent = _checks.mask_array("absent", absent, logits.shape[1])
  _checks.real_scalar("gamma", gamma)
  return logits.astype(jnp.float32) + jnp.asarray(gamma, jnp.float32) * absent


def alg_gamma(logits, labels, absent) -> jax.Array:
  """ALG: γ = mean_i [mean_{c∈S, c≠y_i} z_ic] − mean_i [mean_{c∈U} z_ic].

  Computed on the fine-tuning training data, whose labels must all be seen classes (checked
  when concrete); needs |S| ≥ 2.
  """
  logits, labels, absent = _inputs(logits, labels, absent)
  _checks.nonempty("logits", logits)
  values = _checks.concrete(labels), _checks.concrete(absent)
  if values[1] is not None and (~values[1]).sum() < 2:
    raise bad_argument("absent", "at least 2 seen classes (ALG averages the seen classes other "
                       "than the label)", f"{int((~values[1]).sum())} seen of {values[1].size}")
  if values[0] is not None and values[1] is not None and values[1][values[0]].any():
    raise bad_argument("labels", "labels of seen classes only (fine-tuning training data)",
                       f"{int(values[1][values[0]].sum())} samples of absent classes")
  num_seen = logits.shape[1] - jnp.sum(absent)
  seen_sum = jnp.sum(jnp.where(absent, 0.0, logits), axis=-1)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  seen_others = (seen_sum - label_logit) / (num_seen - 1)
  absent_mean = jnp.sum(jnp.where(absent, logits, 0.0), axis=-1) / jnp.sum(absent)
  return jnp.mean(seen_others) - jnp.mean(absent_mean)


def seen_absent_accuracies(logits, labels, absent) -> dict[str, jax.Array]:
  """Acc_{Y/Y}, Acc_{S/Y}, Acc_{U/Y}, Acc_{S/S}, Acc_{U/U} (Mai et al.).

  Acc_{A/B}: accuracy on test samples whose label is in A, predicting among the classes B
  (Y = all, S = seen, U = absent). Keys ``acc_y_y``, ``acc_s_y``, ``acc_u_y``, ``acc_s_s``,
  ``acc_u_u``; NaN when no test sample has a label in A.
  """
  return _accuracies(*_inputs(logits, labels, absent))


@jax.jit
def _accuracies(logits, labels, absent):
  label_absent = absent[labels]
  hit_all = jnp.argmax(logits, axis=-1) == labels
  hit_seen = jnp.argmax(jnp.where(absent, -jnp.inf, logits), axis=-1) == labels
  hit_absent = jnp.argmax(jnp.where(absent, logits, -jnp.inf), axis=-1) == labels

  def mean_over(hits, rows):
    return jnp.sum(hits & rows) / jnp.sum(rows)

  return {"acc_y_y": jnp.mean(hit_all), "acc_s_y": mean_over(hit_all, ~label_absent),
          "acc_u_y": mean_over(hit_all, label_absent),
          "acc_s_s": mean_over(hit_seen, ~label_absent),
          "acc_u_u": mean_over(hit_absent, label_absent)}


@jax.jit
def _sweep(logits, labels, absent):
  """Every prediction pattern γ can produce, in increasing γ.

  Returns, for k = 0..N flips (the k samples with smallest δ predicted absent, ties of δ
  flipped together), the number of correct seen-label and absent-label samples, the counts of
  seen-label and absent-label samples, and a γ strictly inside the interval producing it.
  """
  seen_logits = jnp.where(absent, -jnp.inf, logits)
  absent_logits = jnp.where(absent, logits, -jnp.inf)
  delta = jnp.max(seen_logits, axis=-1) - jnp.max(absent_logits, axis=-1)
  label_absent = absent[labels]
  seen_hit = ~label_absent & (jnp.argmax(seen_logits, axis=-1) == labels)
  absent_hit = label_absent & (jnp.argmax(absent_logits, axis=-1) == labels)
  order = jnp.argsort(delta)
  sorted_delta = delta[order]
  zero = jnp.zeros((1,), jnp.int32)
  lost_seen = jnp.concatenate([zero, jnp.cumsum(seen_hit[order])])
  gained_absent = jnp.concatenate([zero, jnp.cumsum(absent_hit[order])])
  group_end = jnp.concatenate([zero, jnp.searchsorted(sorted_delta, sorted_delta, side="right")])
  seen_correct = jnp.sum(seen_hit) - lost_seen[group_end]
  absent_correct = gained_absent[group_end]
  padded = jnp.concatenate([sorted_delta[:1] - 2.0, sorted_delta, sorted_delta[-1:] + 2.0])
  gamma = 0.5 * (padded[group_end] + padded[group_end + 1])
  return (seen_correct, absent_correct, jnp.sum(~label_absent), jnp.sum(label_absent), gamma)


@jax.jit
def _official_points(logits, labels, absent):
  """``_sweep`` plus the authors' curve: (seen_correct, absent_correct, num_seen, num_absent,
  γ, on_curve), γ set to 0 for the all-seen / all-absent pattern when that is the one at γ = 0."""
  seen_correct, absent_correct, num_seen, num_absent, gamma = _sweep(logits, labels, absent)
  delta = (jnp.max(jnp.where(absent, -jnp.inf, logits), axis=-1)
           - jnp.max(jnp.where(absent, logits, -jnp.inf), axis=-1))
  sorted_delta = jnp.sort(delta)
  num = delta.shape[0]
  zero = jnp.zeros((1,), jnp.int32)
  flipped = jnp.concatenate([zero, jnp.searchsorted(sorted_delta, sorted_delta, side="right")])
  lower = jnp.where(flipped > 0, sorted_delta[jnp.maximum(flipped - 1, 0)], -jnp.inf)
  upper = jnp.where(flipped < num, sorted_delta[jnp.minimum(flipped, num - 1)], jnp.inf)
  at_zero = (lower < 0) & (upper > 0)
  on_curve = ~at_zero | (flipped == 0) | (flipped == num)
  gamma = jnp.where(at_zero, 0.0, gamma)
  return seen_correct, absent_correct, num_seen, num_absent, gamma, on_curve


def oracle_gamma(logits, labels, absent) -> jax.Array:
  """The γ maximising Acc_{Y/Y} on the given (test) data, by an exact sweep of all flips."""
  seen_correct, absent_correct, _, _, gamma = _sweep(*_inputs(logits, labels, absent))
  return gamma[jnp.argmax(seen_correct + absent_correct)]


def ausuc(logits, labels, absent, return_curve: bool = False, curve: str = "official"):
  """Area under the seen–unseen accuracy curve (Chao et al., 2016; Mai et al., 2024).

  Sweeps γ over every value where some sample's prediction flips between seen and absent
  classes plus ±∞, collects (Acc_{S/Y}, Acc_{U/Y}) and integrates Acc_{U/Y} over Acc_{S/Y}
  with the trapezoid rule (the points are already sorted by seen accuracy). ``curve="official"``
  (the default) keeps the authors' points (``py/util/evaluate.py``: ``_get_curve_results``, then
  ``sklearn.metrics.auc`` on the curve sorted by seen accuracy), which leave out the pattern at
  γ = 0 unless it is all-seen or all-absent (see the module docstring); ``curve="all"`` keeps
  every pattern. Needs test samples of both seen and absent classes. ``return_curve`` adds a
  dict with ``seen``, ``absent``, ``gamma`` and ``on_curve`` (N+1,) arrays in increasing γ (a
  left-out point repeats its lower-γ neighbour, so the arrays keep their shape).
  """
  _checks.choice("curve", curve, ("official", "all"))
  logits, labels, absent = _inputs(logits, labels, absent)
  values = _checks.concrete(labels), _checks.concrete(absent)
  if values[0] is not None and values[1] is not None:
    label_absent = values[1][values[0]]
    if label_absent.all() or not label_absent.any():
      raise bad_argument("labels", "test samples of both seen and absent classes",
                         f"{int(label_absent.sum())} of {label_absent.size} absent-class samples")
  seen_correct, absent_correct, num_seen, num_absent, gamma, on_curve = _official_points(
      logits, labels, absent)
  if curve == "all":
    gamma = _sweep(logits, labels, absent)[4]
    on_curve = jnp.ones_like(on_curve)
  keep = jax.lax.cummax(jnp.where(on_curve, jnp.arange(on_curve.shape[0]), 0))
  seen = (seen_correct / num_seen)[keep]
  unseen = (absent_correct / num_absent)[keep]
  area = jnp.sum((seen[:-1] - seen[1:]) * (unseen[:-1] + unseen[1:]) / 2.0)
  if return_curve:
    return area, {"seen": seen, "absent": unseen, "gamma": gamma[keep], "on_curve": on_curve}
  return area


def pcv_gamma(splits: Sequence[tuple], infeasible: str = "skip") -> jax.Array:
  """PCV γ (Mai et al.): per pseudo split, the γ maximising overall accuracy subject to the
  pseudo-absent accuracy being at least the source model's; averaged over the splits.

  Each split is ``(logits, labels, pseudo_absent, source_absent_accuracy)``: the logits (N, C_S)
  of the model fine-tuned on the pseudo-seen half of S, on held-out data of the classes S, their
  labels, the (C_S,) mask of the pseudo-absent half, and the source (pre-fine-tuning) model's
  Acc_{U/Y} on the pseudo-absent samples (e.g. ``seen_absent_accuracies(...)["acc_u_y"]``).

  As the authors' ``evaluate_better_calibration`` (``py/util/evaluate.py``): the candidates are
  the points of their curve (``_get_curve_results``; γ = 0's own pattern is not one, see the
  module docstring), and ``compute_best_idx_for_better_calibration`` takes the first maximum
  of the overall accuracy along the curve sorted by seen accuracy, i.e. among equally good γ
  the one of lowest seen accuracy: the largest γ (also among points of equal seen accuracy,
  whose order ``torch.argsort`` leaves unspecified). A split where no γ meets the constraint is
  skipped (``infeasible="skip"``, the official ``continue``); with none left this raises when
  the inputs are concrete and gives NaN under ``jit``. ``infeasible="max_absent"`` instead takes
  that split's γ of highest pseudo-absent accuracy (glajax's earlier rule).
  """
  _checks.choice("infeasible", infeasible, ("skip", "max_absent"))
  splits = list(splits)
  if not splits:
    raise bad_argument("splits", "at least one pseudo split", "an empty sequence")
  gammas, usable = [], []
  for index, split in enumerate(splits):
    if len(split) != 4:
      raise bad_argument(f"splits[{index}]", "(logits, labels, pseudo_absent, "
                         "source_absent_accuracy)", f"a {len(split)}-tuple")
    logits, labels, pseudo_absent, source_accuracy = split
    seen_correct, absent_correct, _, num_absent, gamma, on_curve = _official_points(
        *_inputs(logits, labels, pseudo_absent))
    absent_accuracy = absent_correct / num_absent
    feasible = on_curve & (absent_accuracy >= jnp.asarray(source_accuracy, jnp.float32))
    score = jnp.where(feasible, seen_correct + absent_correct, -1)
    best = feasible & (score == jnp.max(score))
    chosen = jnp.max(jnp.where(best, gamma, -jnp.inf))
    if infeasible == "max_absent":
      fallback = jnp.where(on_curve, absent_accuracy, -1.0)
      chosen = jnp.where(jnp.any(feasible), chosen, gamma[jnp.argmax(fallback)])
      gammas.append(chosen)
      usable.append(jnp.asarray(True))
    else:
      gammas.append(jnp.where(jnp.any(feasible), chosen, 0.0))
      usable.append(jnp.any(feasible))
  gammas, usable = jnp.stack(gammas), jnp.stack(usable)
  count = _checks.concrete(usable)
  if count is not None and not count.any():
    raise bad_argument("splits", "at least one split where some γ keeps the pseudo-absent "
                       "accuracy at the source model's", f"none of {len(splits)} splits")
  return jnp.sum(jnp.where(usable, gammas, 0.0)) / jnp.sum(usable)

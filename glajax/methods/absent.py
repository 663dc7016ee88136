"""Absent-class calibration (Mai et al., "Fine-Tuning is Fine, if Calibrated", NeurIPS 2024).

A model fine-tuned on the seen classes S keeps its features for the absent classes U; one bias
γ added to the absent classes' logits, z'_c = z_c + γ·1[c ∈ U], brings them back. ``absent`` is
a (C,) boolean mask of U, never empty nor full (checked when concrete).

For sample i let δ_i = max_{c∈S} z_ic − max_{c∈U} z_ic: for γ > δ_i it is predicted absent,
for γ < δ_i seen. Sorting the δ_i gives every distinct prediction pattern γ can produce; the
γ search functions below sweep all of them exactly (``_sweep``), in float32, jittable.
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
  return logits.astype(jnp.float32) + jnp.asarray(gamma, jnp.float32) * absent


def alg_gamma(logits, labels, absent) -> jax.Array:
  """ALG: γ = mean_i [mean_{c∈S, c≠y_i} z_ic] − mean_i [mean_{c∈U} z_ic].

  Computed on the fine-tuning training data, whose labels must all be seen classes (checked
  when concrete); needs |S| ≥ 2.
  """
  logits, labels, absent = _inputs(logits, labels, absent)
  values = _checks.concrete(labels), _checks.concrete(absent)
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


def oracle_gamma(logits, labels, absent) -> jax.Array:
  """The γ maximising Acc_{Y/Y} on the given (test) data, by an exact sweep of all flips."""
  seen_correct, absent_correct, _, _, gamma = _sweep(*_inputs(logits, labels, absent))
  return gamma[jnp.argmax(seen_correct + absent_correct)]


def ausuc(logits, labels, absent, return_curve: bool = False):
  """Area under the seen–unseen accuracy curve (Chao et al., 2016; Mai et al., 2024).

  Sweeps γ over every value where some sample's prediction flips between seen and absent
  classes plus ±∞, collects (Acc_{S/Y}, Acc_{U/Y}) and integrates Acc_{U/Y} over Acc_{S/Y}
  with the trapezoid rule (the points are already sorted by seen accuracy). Needs test samples
  of both seen and absent classes. ``return_curve`` adds a dict with ``seen``, ``absent`` and
  ``gamma`` (N+1,) arrays.
  """
  logits, labels, absent = _inputs(logits, labels, absent)
  values = _checks.concrete(labels), _checks.concrete(absent)
  if values[0] is not None and values[1] is not None:
    label_absent = values[1][values[0]]
    if label_absent.all() or not label_absent.any():
      raise bad_argument("labels", "test samples of both seen and absent classes",
                         f"{int(label_absent.sum())} of {label_absent.size} absent-class samples")
  seen_correct, absent_correct, num_seen, num_absent, gamma = _sweep(logits, labels, absent)
  seen = seen_correct / num_seen
  unseen = absent_correct / num_absent
  area = jnp.sum((seen[:-1] - seen[1:]) * (unseen[:-1] + unseen[1:]) / 2.0)
  if return_curve:
    return area, {"seen": seen, "absent": unseen, "gamma": gamma}
  return area


def pcv_gamma(splits: Sequence[tuple]) -> jax.Array:
  """PCV γ (Mai et al.): per pseudo split, the γ maximising overall accuracy subject to the
  pseudo-absent accuracy being at least the source model's; averaged over the splits.

  Each split is ``(logits, labels, pseudo_absent, source_absent_accuracy)``: the logits (N, C_S)
  of the model fine-tuned on the pseudo-seen half of S, on held-out data of the classes S, their
  labels, the (C_S,) mask of the pseudo-absent half, and the source (pre-fine-tuning) model's
  Acc_{U/Y} on the pseudo-absent samples (e.g. ``seen_absent_accuracies(...)["acc_u_y"]``).
  Every γ pattern is swept exactly; when no γ meets the constraint the one with the highest
  pseudo-absent accuracy is taken.
  """
  splits = list(splits)
  if not splits:
    raise bad_argument("splits", "at least one pseudo split", "an empty sequence")
  gammas = []
  for index, split in enumerate(splits):
    if len(split) != 4:
      raise bad_argument(f"splits[{index}]", "(logits, labels, pseudo_absent, "
                         "source_absent_accuracy)", f"a {len(split)}-tuple")
    logits, labels, pseudo_absent, source_accuracy = split
    seen_correct, absent_correct, _, num_absent, gamma = _sweep(
        *_inputs(logits, labels, pseudo_absent))
    absent_accuracy = absent_correct / num_absent
    feasible = absent_accuracy >= jnp.asarray(source_accuracy, jnp.float32)
    score = jnp.where(feasible, seen_correct + absent_correct, -1)
    best = jnp.where(jnp.any(feasible), jnp.argmax(score), jnp.argmax(absent_accuracy))
    gammas.append(gamma[best])
  return jnp.mean(jnp.stack(gammas))

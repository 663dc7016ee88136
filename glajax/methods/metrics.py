"""Accuracy metrics: top-k, per-class and group accuracies, evaluation-set logit maps
(ImageNet-R/A subsets, ObjectNet), the average over distribution shifts and effective
robustness. Jittable unless stated; float32."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glajax.errors import bad_argument
from glajax.methods import _checks

MANY_SHOT_MIN, FEW_SHOT_MAX = 100, 20   # many: > 100 training images, few: < 20


def _inputs(logits, labels):
  logits = _checks.logits_array("logits", logits)
  _checks.nonempty("logits", logits)
  labels = _checks.labels_array("labels", labels, *logits.shape)
  return logits.astype(jnp.float32), labels


def accuracy(logits, labels, k: int = 1) -> jax.Array:
  """Top-k accuracy: mean_i 1[y_i among the k largest logits of z_i]."""
  logits, labels = _inputs(logits, labels)
  k = _checks.positive_int("k", k)
  if k > logits.shape[1]:
    raise bad_argument("k", f"an int in [1, {logits.shape[1]}]", repr(k))
  _, top = jax.lax.top_k(logits, k)
  return jnp.mean(jnp.any(top == labels[:, None], axis=-1))


def per_class_accuracy(logits, labels) -> jax.Array:
  """(C,) top-1 accuracy of each class's test samples; NaN for a class with none."""
  logits, labels = _inputs(logits, labels)
  num_classes = logits.shape[1]
  hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  counts = jnp.bincount(labels, length=num_classes)
  return jnp.bincount(labels, weights=hits, length=num_classes) / counts


def _group_means(class_accuracy, groups: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Mean of the per-class accuracies within each boolean class mask (NaN classes skipped)."""
  valid = ~jnp.isnan(class_accuracy)
  values = jnp.where(valid, class_accuracy, 0.0)
  return {name: jnp.sum(jnp.where(mask & valid, values, 0.0)) / jnp.sum(mask & valid)
          for name, mask in groups.items()}


def group_accuracy(logits, labels, train_counts) -> dict[str, jax.Array]:
  """Long-tail group accuracies: ``many`` (> 100 training images), ``medium`` (20–100),
  ``few`` (< 20) and ``all``, each the mean per-class accuracy over the group's classes that
  have test samples (NaN for an empty group)."""
  logits, labels = _inputs(logits, labels)
  train_counts = jnp.asarray(train_counts)
  _checks.same_shape("train_counts", train_counts, (logits.shape[1],))
  return _group_means(per_class_accuracy(logits, labels), count_groups(train_counts))


def count_groups(train_counts) -> dict[str, jax.Array]:
  """The (C,) class masks of the long-tail groups: ``many`` (> 100 training images), ``medium``
  (20–100), ``few`` (< 20), ``all``."""
  train_counts = jnp.asarray(train_counts)
  return {"many": train_counts > MANY_SHOT_MIN,
          "medium": (train_counts >= FEW_SHOT_MAX) & (train_counts <= MANY_SHOT_MIN),
          "few": train_counts < FEW_SHOT_MAX, "all": jnp.ones(train_counts.shape[0], bool)}


def prior_groups(log_prior) -> dict[str, jax.Array]:
  """The (C,) class masks of GLA's head / medium / tail thirds of the classes sorted by a (log)
  prior, descending (⌊C/3⌋, ⌊C/3⌋, the rest), and ``all``."""
  log_prior = jnp.asarray(log_prior, jnp.float32)
  num_classes = log_prior.shape[0]
  rank = jnp.argsort(jnp.argsort(-log_prior))
  third = num_classes // 3
  return {"head": rank < third, "medium": (rank >= third) & (rank < 2 * third),
          "tail": rank >= 2 * third, "all": jnp.ones(num_classes, bool)}


def group_accuracy_by_prior(logits, labels, log_prior,
                            average: str = "samples") -> dict[str, jax.Array]:
  """GLA's head / medium / tail split (BeierZhu/GLA ``Code.zip``, ``src/gla.py``
  ``breakdown_accuracy``): classes sorted by a (log) prior, descending; the first ⌊C/3⌋ are
  ``head``, the next ⌊C/3⌋ ``medium``, the rest ``tail`` (333/333/334 for C = 1000; the
  official code hard-codes ``n_sub = 1000 // 3``); plus ``all``.

  ``average="samples"`` (the default, as the official ``compute_accuracy`` on the test samples
  whose label is in the group): each group's top-1 accuracy over its samples.
  ``average="classes"``: the mean per-class accuracy over the group's classes that have test
  samples (glajax's earlier definition). NaN for a group without test samples.
  """
  logits, labels = _inputs(logits, labels)
  log_prior = _checks.logits_array("log_prior", log_prior, ndim=1)
  num_classes = logits.shape[1]
  _checks.same_shape("log_prior", log_prior, (num_classes,))
  _checks.choice("average", average, ("samples", "classes"))
  groups = prior_groups(log_prior)
  if average == "classes":
    return _group_means(per_class_accuracy(logits, labels), groups)
  hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {name: jnp.sum(jnp.where(mask[labels], hits, 0.0)) / jnp.sum(mask[labels])
          for name, mask in groups.items()}


def restrict_logits(logits, class_indices) -> jax.Array:
  """Logits of a class subset, in the subset's order: z[:, class_indices] (e.g. ImageNet-R/A's
  200 ImageNet classes). Indices must be distinct and in range (checked when concrete)."""
  logits = _checks.logits_array("logits", logits)
  class_indices = jnp.asarray(class_indices)
  values = _checks.concrete(class_indices)
  if (class_indices.ndim != 1 or not class_indices.size
      or not jnp.issubdtype(class_indices.dtype, jnp.integer)):
    raise bad_argument("class_indices", "a non-empty 1-D integer array",
                       f"{class_indices.dtype}{list(class_indices.shape)}")
  if values is not None and (values.min() < 0 or values.max() >= logits.shape[1]
                             or len(set(values.tolist())) != values.size):
    raise bad_argument("class_indices", f"distinct indices in [0, {logits.shape[1]})",
                       f"range [{values.min()}, {values.max()}], {values.size} indices")
  return logits[:, class_indices]


def objectnet_logits(logits, mapping: Sequence[Sequence[int]]) -> jax.Array:
  """ObjectNet logits: for ObjectNet class k, max_{c ∈ mapping[k]} z_c over its mapped
  ImageNet classes. ``mapping`` is static (a list of non-empty index lists, one per class)."""
  logits = _checks.logits_array("logits", logits)
  mapping = [list(indices) for indices in mapping]
  if not mapping or any(not indices for indices in mapping):
    raise bad_argument("mapping", "one non-empty list of ImageNet indices per class",
                       f"{sum(not m for m in mapping)} empty of {len(mapping)}")
  flat = np.concatenate([np.asarray(m) for m in mapping])
  if flat.min() < 0 or flat.max() >= logits.shape[1]:
    raise bad_argument("mapping", f"indices in [0, {logits.shape[1]})",
                       f"range [{flat.min()}, {flat.max()}]")
  width = max(len(m) for m in mapping)
  index = np.array([m + [m[0]] * (width - len(m)) for m in mapping])   # pad with a duplicate
  return jnp.max(logits.astype(jnp.float32)[:, index], axis=-1)


def average_shift_accuracy(accuracies: Mapping[str, float] | Sequence[float]) -> jax.Array:
  """Unweighted mean accuracy over distribution-shift test sets (WiSE-FT's 'avg shifts')."""
  values = list(accuracies.values()) if isinstance(accuracies, Mapping) else list(accuracies)
  if not values:
    raise bad_argument("accuracies", "at least one accuracy", "none")
  return jnp.mean(jnp.asarray(values, jnp.float32))


def _logit(p):
  return jnp.log(p) - jnp.log1p(-p)


def effective_robustness(id_accuracy, ood_accuracy, baseline_id, baseline_ood) -> jax.Array:
  """Effective robustness (Taori et al., NeurIPS 2020).

  Fit logit(acc_ood) = a · logit(acc_id) + b by least squares over baseline models
  (logit(p) = log p − log(1 − p), accuracies in (0, 1)); then
  ER = acc_ood − sigmoid(a · logit(acc_id) + b): the OOD accuracy above the baseline trend.
  """
  baseline_id = jnp.asarray(baseline_id, jnp.float32)
  baseline_ood = jnp.asarray(baseline_ood, jnp.float32)
  if baseline_id.ndim != 1 or baseline_id.shape != baseline_ood.shape or baseline_id.size < 2:
    raise bad_argument("baseline_id, baseline_ood", "two 1-D arrays of the same length >= 2",
                       f"shapes {baseline_id.shape}, {baseline_ood.shape}")
  for name, value in (("id_accuracy", id_accuracy), ("ood_accuracy", ood_accuracy),
                      ("baseline_id", baseline_id), ("baseline_ood", baseline_ood)):
    _checks.in_range(name, value, 1e-7, 1 - 1e-7)
  x, y = _logit(baseline_id), _logit(baseline_ood)
  slope = jnp.sum((x - x.mean()) * (y - y.mean())) / jnp.sum((x - x.mean()) ** 2)
  intercept = y.mean() - slope * x.mean()
  predicted = jax.nn.sigmoid(slope * _logit(jnp.asarray(id_accuracy, jnp.float32)) + intercept)
  return jnp.asarray(ood_accuracy, jnp.float32) - predicted

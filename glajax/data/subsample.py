"""Index-level subsampling (pure NumPy, seeded): long-tailed, k-shot and seen/absent class splits.

Indices are positions in a split (``pipeline.read_labels`` order); pass them to
``pipeline.train_batches(indices=...)``. Every function draws from
``np.random.default_rng(seed)`` only (the long-tailed subset: the official code's
``np.random.seed(seed)`` generator), so a seed fixes the selection on every machine.
"""
from __future__ import annotations

import os

import numpy as np

from glajax.errors import DatasetError, bad_argument


def _labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
    raise bad_argument("labels", "a 1-D array of integer labels >= 0",
                       f"shape {labels.shape}, dtype {labels.dtype}")
  return labels


def long_tail_counts(num_classes: int, n_max: float, imbalance_ratio: float) -> np.ndarray:
  """n_c = int(n_max · (1/ratio)^(c/(C−1))), c = 0..C−1: the CIFAR-LT profile (Cao et al.,
  NeurIPS 2019) as Pre-train-Imbalance / LIFT ``datasets/cifar100.py``
  ``IMBALANCECIFAR100.get_img_num_per_cls`` computes it (``imb_factor`` = 1/ratio: 0.1, 0.02,
  0.01 for IR10, IR50, IR100); class 0 keeps n_max, the last class n_max / ratio."""
  if imbalance_ratio < 1:
    raise bad_argument("imbalance_ratio", "a ratio >= 1 (n_max / n_min)", imbalance_ratio)
  factor = 1.0 / imbalance_ratio
  return np.asarray([int(n_max * factor ** (c / max(num_classes - 1.0, 1.0)))
                     for c in range(num_classes)], np.int64)


def long_tail_indices(labels, imbalance_ratio: float, seed: int, order=None) -> np.ndarray:
  """Sorted indices of a long-tailed subset of ``labels``, drawn as the official code draws
  CIFAR-100-LT (``IMBALANCECIFAR100.gen_imbalanced_data``): ``np.random.seed(seed)``, then for
  each class c in label order its examples' positions (in the dataset's own order) shuffled by
  ``np.random.shuffle`` and the first n_c kept (:func:`long_tail_counts`, n_max the smallest
  class's size, so every class can provide its count).

  ``order`` (N,): each row's position in the dataset's own order (TFDS stores CIFAR shuffled;
  ``pipeline.read_order`` reads it), so the same images are drawn as from the original files;
  None: the rows' order is the dataset's.
  """
  labels = _labels(labels)
  num_classes = int(labels.max()) + 1
  sizes = np.bincount(labels, minlength=num_classes)
  if sizes.min() == 0:
    raise bad_argument("labels", "every class 0..C-1 present",
                       f"classes {np.flatnonzero(sizes == 0)[:5].tolist()} missing", DatasetError)
  counts = long_tail_counts(num_classes, float(sizes.min()), imbalance_ratio)
  if counts[-1] == 0:
    raise bad_argument("imbalance_ratio", f"at most {sizes.min()} (the smallest class's size, "
                       "so the rarest class keeps an example)", imbalance_ratio, DatasetError)
  rows = np.arange(len(labels))
  if order is not None:
    order = np.asarray(order)
    if order.shape != labels.shape or not np.array_equal(np.sort(order), rows):
      raise bad_argument("order", f"a permutation of 0..{len(labels) - 1}", order, DatasetError)
    rows = np.argsort(order)  # rows[j]: the row at position j of the dataset's own order
  source = labels[rows]
  rng = np.random.RandomState(seed)  # the legacy global generator np.random.seed(seed) sets
  chosen = []
  for c in range(num_classes):
    positions = np.where(source == c)[0]
    rng.shuffle(positions)
    chosen.append(positions[:counts[c]])
  return np.sort(rows[np.concatenate(chosen)])


def k_shot_indices(labels, k: int, seed: int, val_k: int = 0):
  """(train, val) sorted indices: per class, k training and val_k validation examples drawn
  without replacement, so the two sets are disjoint. A class with fewer than k + val_k
  examples raises a DatasetError."""
  labels = _labels(labels)
  if k < 1 or val_k < 0:
    raise bad_argument("k, val_k", "k >= 1 and val_k >= 0", (k, val_k))
  rng = np.random.default_rng(seed)
  train, val = [], []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < k + val_k:
      raise bad_argument("k", f"at most the size of every class (k + val_k = {k + val_k})",
                         f"class {c} with {len(members)} examples", DatasetError)
    draw = rng.permutation(members)
    train.append(draw[:k])
    val.append(draw[k:k + val_k])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def holdout_indices(labels, fraction: float, seed: int):
  """(kept, held_out) sorted positions into ``labels``: per class, a seeded random
  round(fraction · n_c) of its n_c examples are held out, at least one and never all of them
  (a class with a single example keeps it)."""
  labels = _labels(labels)
  if not 0 < fraction < 1:
    raise bad_argument("fraction", "a fraction in (0, 1)", fraction)
  rng = np.random.default_rng(seed)
  kept, held_out = [], []
  for c in np.unique(labels):
    draw = rng.permutation(np.flatnonzero(labels == c))
    count = min(max(1, round(fraction * len(draw))), len(draw) - 1)
    held_out.append(draw[:count])
    kept.append(draw[count:])
  return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held_out))


def class_subset(num_classes: int, num_seen: int, seed: int):
  """(seen, absent) boolean masks of shape (C,): ``num_seen`` classes drawn at random are seen
  during fine-tuning, the rest absent (Mai et al., NeurIPS 2024)."""
  if not 0 < num_seen <= num_classes:
    raise bad_argument("num_seen", f"in [1, {num_classes}]", num_seen)
  seen = np.zeros(num_classes, bool)
  seen[np.random.default_rng(seed).choice(num_classes, num_seen, replace=False)] = True
  return seen, ~seen


def indices_in_classes(labels, classes_mask) -> np.ndarray:
  """Sorted indices of the examples whose class is set in ``classes_mask`` (C,) bool."""
  labels = _labels(labels)
  return np.flatnonzero(np.asarray(classes_mask, bool)[labels])


def read_split_list(path: str | os.PathLike):
  """A published split list (ImageNet-LT / Places-LT / iNaturalist-2018 lines
  ``relative/path label``) -> (paths, labels int32); a leading "/" of a path is dropped."""
  if not os.path.isfile(path):
    raise bad_argument("split list", "a file of 'relative/path label' lines", f"no file {path}",
                       DatasetError)
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  paths, labels = [], []
  for number, line in enumerate(lines, 1):
    fields = line.rsplit(maxsplit=1)
    if len(fields) != 2 or not fields[1].isdigit():
      raise bad_argument(f"{os.path.basename(path)} line {number}", "'relative/path label'",
                         repr(line), DatasetError)
    paths.append(fields[0].lstrip("/"))
    labels.append(int(fields[1]))
  return paths, np.asarray(labels, np.int32)

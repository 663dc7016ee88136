"""Bootstrap intervals over test rows, and paired differences measured on the same rows.

A resample draws N of the N rows with replacement; the statistic is computed on each of B
resamples and the interval is the percentile interval [q_{(1−level)/2}, q_{(1+level)/2}] of the B
values (Efron & Tibshirani, An Introduction to the Bootstrap, 1993, §13.3). A paired difference
is one statistic of both models' columns on the same resampled rows, e.g.
acc_A − acc_B = mean_i (c_Ai − c_Bi), so what the two models share cancels in the difference.
Several test sets (``groups``) are resampled each on its own (a stratified bootstrap), e.g. for
the mean accuracy over distribution shifts.

Logits are reduced to per-row summaries first (:func:`row_summaries`: correct, confidence), so
a resample costs O(N), not O(N·C); resamples are drawn and evaluated inside one jitted
``lax.map`` from one key. The library's statistics (the ``*_of`` functions) are sums over rows,
so a resample is also a row-count vector w (w_i = times row i was drawn) and every statistic of
all B resamples is a (B, N) @ (N, ·) product (:func:`resample_counts`); a statistic with a
``weighted(counts, *groups)`` method is evaluated that way, on the same resamples.

    rows = M.row_summaries(logits, labels)
    acc = M.bootstrap(key, M.accuracy_of, rows)                  # Interval(estimate, low, high)
    both = {"a": M.row_summaries(za, y), "b": M.row_summaries(zb, y)}
    gain = M.bootstrap(key, lambda r: M.accuracy_of(r["a"]) - M.accuracy_of(r["b"]), both)
    gain.excludes_zero
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from glajax.errors import bad_argument
from glajax.methods import _checks
from glajax.methods.calibrate import _equal_width_bin, _top_label

DEFAULT_SAMPLES = 1000
DEFAULT_LEVEL = 0.95


class Interval(NamedTuple):
  """A statistic on the data (``estimate``) and its bootstrap percentile interval."""
  estimate: float
  low: float
  high: float

  @property
  def excludes_zero(self) -> bool:
    """Whether the interval lies wholly above or wholly below 0 (an effect that "appears")."""
    return bool(self.low > 0 or self.high < 0)


def row_summaries(logits, labels) -> dict[str, jax.Array]:
  """Per-row {"correct": 1[argmax z_i = y_i], "confidence": max softmax(z_i)} (float32) and
  "label" (int32), each (N,): all that accuracy, top-label ECE and per-class or per-group
  accuracies need of each row."""
  logits = _checks.logits_array("logits", logits)
  _checks.nonempty("logits", logits)
  labels = _checks.labels_array("labels", labels, *logits.shape)
  confidence, correct = _top_label(logits.astype(jnp.float32), labels)
  return {"correct": correct, "confidence": confidence, "label": jnp.asarray(labels, jnp.int32)}


def _weighted_sum(weights, values) -> jax.Array:
  """Σ_i w_i v_i over the row axis: ``weights`` (..., N), ``values`` (N, ...) -> (..., ...)."""
  return jnp.tensordot(weights, values, axes=1, precision=jax.lax.Precision.HIGHEST)


def accuracy_of(rows, weights=None) -> jax.Array:
  """mean_i correct_i of :func:`row_summaries` rows; with row ``weights`` (..., N) (resample
  counts), Σ_i w_i correct_i / Σ_i w_i for each leading index."""
  if weights is None:
    return jnp.mean(rows["correct"])
  return _weighted_sum(weights, rows["correct"]) / jnp.sum(weights, -1)


def class_mean_accuracy_of(rows, classes, weights=None) -> jax.Array:
  """The mean over the classes of the boolean mask ``classes`` (C,) that have rows of their
  per-class accuracy Σ_{i: y_i = c} correct_i / n_c (long-tail group accuracies); NaN if none.
  With row ``weights`` (..., N): n_c and the sums weighted, for each leading index."""
  classes = jnp.asarray(classes, bool)
  num_classes = classes.shape[0]
  if weights is None:
    hits = jax.ops.segment_sum(rows["correct"], rows["label"], num_classes)
    counts = jax.ops.segment_sum(jnp.ones_like(rows["correct"]), rows["label"], num_classes)
  else:
    onehot = jax.nn.one_hot(rows["label"], num_classes, dtype=jnp.float32)
    hits = _weighted_sum(weights, onehot * rows["correct"][:, None])
    counts = _weighted_sum(weights, onehot)
  present = classes & (counts > 0)
  return (jnp.sum(jnp.where(present, hits / jnp.maximum(counts, 1), 0.0), -1)
          / jnp.sum(present, -1))


def subset_accuracy_of(rows, classes, weights=None) -> jax.Array:
  """The accuracy over the rows whose label is in the boolean mask ``classes`` (C,) (GLA's
  head/medium/tail over samples, Acc_{S/Y} and Acc_{U/Y}); NaN if none. With row ``weights``
  (..., N): Σ_{i inside} w_i correct_i / Σ_{i inside} w_i, for each leading index."""
  inside = jnp.asarray(classes, bool)[rows["label"]]
  if weights is None:
    return jnp.sum(jnp.where(inside, rows["correct"], 0.0)) / jnp.sum(inside)
  inside = inside.astype(jnp.float32)
  return _weighted_sum(weights, inside * rows["correct"]) / _weighted_sum(weights, inside)


def ece_of(rows, num_bins: int = 15, weights=None) -> jax.Array:
  """Top-label ECE Σ_b |Σ_{i∈b} (correct_i − confidence_i)| / N (equal-width bins, as
  ``M.ece``) of :func:`row_summaries` rows. With row ``weights`` (..., N):
  Σ_b |Σ_{i∈b} w_i (correct_i − confidence_i)| / Σ_i w_i, for each leading index."""
  bins = _equal_width_bin(rows["confidence"], num_bins)
  if weights is None:
    gap = jax.ops.segment_sum(rows["correct"] - rows["confidence"], bins, num_bins)
    return jnp.sum(jnp.abs(gap)) / rows["correct"].shape[0]
  onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)
  gap = _weighted_sum(weights, onehot * (rows["correct"] - rows["confidence"])[:, None])
  return jnp.sum(jnp.abs(gap), -1) / jnp.sum(weights, -1)


def resample_counts(key, sizes: tuple[int, ...], num_samples: int) -> list[jax.Array]:
  """For each group of ``sizes``, (num_samples, N_g) float32: how many times each row is drawn
  in each resample of :func:`resample_indices` (the same resamples), kept for the next call with
  the same key, sizes and B (a run's intervals all share its key and its test sets)."""
  key_data = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                        else key)
  return list(_counts(key_data.tobytes(), str(key_data.dtype), key_data.shape,
                      tuple(int(n) for n in sizes), int(num_samples)))


@functools.lru_cache(maxsize=16)
def _counts(key_bytes, dtype, shape, sizes, num_samples):
  key = jnp.asarray(np.frombuffer(key_bytes, dtype).reshape(shape))
  return tuple(_bincount_rows(index, n) for index, n in
               zip(resample_indices(key, sizes, num_samples), sizes))


@functools.partial(jax.jit, static_argnames="n")
def _bincount_rows(index, n: int):
  return jax.vmap(lambda i: jnp.bincount(i, length=n))(index).astype(jnp.float32)


def resample_indices(key, sizes: tuple[int, ...], num_samples: int) -> list[jax.Array]:
  """The row indices of every resample: for each group of ``sizes``, (num_samples, N_g) int32
  drawn uniformly with replacement (what :func:`bootstrap` draws from the same key)."""
  keys = jax.random.split(key, num_samples)
  return [jax.vmap(lambda k, g=g, n=n: jax.random.randint(jax.random.fold_in(k, g), (n,), 0, n))(
      keys) for g, n in enumerate(sizes)]


@functools.partial(jax.jit, static_argnames="statistic")
def _weighted(statistic, counts, groups):
  ones = tuple(jnp.ones((1, c.shape[1]), c.dtype) for c in counts)   # the rows as they are
  return statistic.weighted(ones, *groups)[0], statistic.weighted(counts, *groups)


@functools.partial(jax.jit, static_argnames=("statistic", "num_samples", "batch_size"))
def _samples(key, groups, statistic, num_samples: int, batch_size: int):
  sizes = tuple(jax.tree.leaves(g)[0].shape[0] for g in groups)

  def one(k):
    picked = [jax.tree.map(lambda x, g=g, n=n: x[jax.random.randint(jax.random.fold_in(k, g),
                                                                      (n,), 0, n)], group)
              for g, (group, n) in enumerate(zip(groups, sizes))]
    return statistic(*picked)

  return jax.lax.map(one, jax.random.split(key, num_samples), batch_size=batch_size)


def _check_groups(groups) -> None:
  if not groups:
    raise bad_argument("groups", "at least one pytree of per-row arrays", "none")
  for i, group in enumerate(groups):
    leaves = jax.tree.leaves(group)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if not leaves or len(sizes) != 1 or None in sizes or 0 in sizes:
      raise bad_argument(f"groups[{i}]", "arrays sharing one non-empty leading (row) axis",
                         [np.shape(x) for x in leaves][:5])


def bootstrap(key, statistic: Callable, *groups, num_samples: int = DEFAULT_SAMPLES,
              level: float = DEFAULT_LEVEL, batch_size: int = 100) -> Interval:
  """``statistic(*groups)`` and its percentile interval over ``num_samples`` resamples.

  Args:
    key: a JAX PRNG key; the same key gives the same resamples (and intervals).
    statistic: a jittable function of the groups returning a scalar (e.g. :func:`accuracy_of`);
      it is a static argument, so pass the same function object to reuse the compilation. If
      it has a ``weighted(counts, *groups)`` method returning the (B,) statistic of the rows
      weighted by each group's (B, N_g) resample counts (:func:`resample_counts`), that is used.
    groups: pytrees of (N_g, ...) arrays; each group's rows are resampled on their own.
    num_samples: B resamples. level: the interval's coverage (0.95: the 2.5 and 97.5
      percentiles). batch_size: resamples evaluated together (memory ~ batch_size · N).
  """
  _check_groups(groups)
  num_samples = _checks.positive_int("num_samples", num_samples, 2)
  if not (isinstance(level, (float, int)) and not isinstance(level, bool) and 0 < level < 1):
    raise bad_argument("level", "a coverage in (0, 1)", repr(level))
  groups = tuple(jax.tree.map(jnp.asarray, g) for g in groups)
  batch_size = _checks.positive_int("batch_size", batch_size)
  if hasattr(statistic, "weighted"):   # every resample at once, as row counts
    counts = resample_counts(key, tuple(jax.tree.leaves(g)[0].shape[0] for g in groups),
                             num_samples)
    estimate, samples = _weighted(statistic, tuple(counts), groups)
    estimate = float(estimate)
  else:
    estimate = float(statistic(*groups))
    samples = _samples(key, groups, statistic, num_samples, batch_size)
  low, high = np.quantile(np.asarray(samples, np.float64), [(1 - level) / 2, (1 + level) / 2])
  return Interval(estimate, float(low), float(high))

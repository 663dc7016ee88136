"""Bootstrap intervals (``glajax.methods.uncertainty``): the same resamples recomputed with NumPy,
the summaries against ``M.accuracy`` / ``M.ece``, and coverage on simulated paired predictions
with a known accuracy difference."""
import jax
import numpy as np
import pytest

from glajax import GlajaxError
from glajax import methods as M
from glajax.methods import uncertainty


def _logits(n=300, c=7, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n).astype(np.int32)
  logits = rng.normal(size=(n, c)).astype(np.float32) * 2
  logits[np.arange(n), labels] += rng.normal(1.0, 1.0, n).astype(np.float32)
  return logits, labels


def test_summaries_give_the_methods_metrics():
  logits, labels = _logits()
  rows = M.row_summaries(logits, labels)
  np.testing.assert_allclose(float(M.accuracy_of(rows)), float(M.accuracy(logits, labels)),
                             atol=1e-7)
  for bins in (10, 15):
    np.testing.assert_allclose(float(M.ece_of(rows, bins)), float(M.ece(logits, labels, bins)),
                               atol=1e-6)


def _numpy_ece(confidence, correct, bins):
  index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
  gap = np.bincount(index, weights=correct - confidence, minlength=bins)
  return np.abs(gap).sum() / len(correct)


def test_intervals_equal_numpy_on_the_same_resamples():
  """The interval is the 2.5/97.5 percentiles of the statistic on the resamples that
  ``resample_indices`` lists: recomputed here in float64 NumPy."""
  za, labels = _logits(seed=1)
  zb, _ = _logits(seed=2)
  rows = {"a": M.row_summaries(za, labels), "b": M.row_summaries(zb, labels)}
  shift, shift_labels = _logits(n=120, seed=3)
  key = jax.random.PRNGKey(7)
  diff = lambda r, s: (M.ece_of(r["a"], 10) - M.ece_of(r["b"], 10)
                       + 0.5 * M.accuracy_of(s))
  got = M.bootstrap(key, diff, rows, M.row_summaries(shift, shift_labels), num_samples=500)
  index, shift_index = map(np.asarray, uncertainty.resample_indices(key, (300, 120), 500))
  host = jax.tree.map(lambda x: np.asarray(x, np.float64), rows)
  shift_correct = np.asarray(M.row_summaries(shift, shift_labels)["correct"], np.float64)
  values = [_numpy_ece(host["a"]["confidence"][i], host["a"]["correct"][i], 10)
            - _numpy_ece(host["b"]["confidence"][i], host["b"]["correct"][i], 10)
            + 0.5 * shift_correct[j].mean() for i, j in zip(index, shift_index)]
  low, high = np.quantile(values, [0.025, 0.975])
  np.testing.assert_allclose([got.low, got.high], [low, high], atol=2e-6)
  expected = (_numpy_ece(host["a"]["confidence"], host["a"]["correct"], 10)
              - _numpy_ece(host["b"]["confidence"], host["b"]["correct"], 10)
              + 0.5 * shift_correct.mean())
  np.testing.assert_allclose(got.estimate, expected, atol=2e-6)
  assert got.low <= got.estimate <= got.high
  again = M.bootstrap(key, diff, rows, M.row_summaries(shift, shift_labels), num_samples=500)
  assert again == got                                        # a key fixes the resamples


def _paired_difference(c):
  return jax.numpy.mean(c["a"] - c["b"])


# One row's (A correct, B correct): both 0.60, A only 0.12, B only 0.06, neither 0.22, so
# acc_A = 0.72, acc_B = 0.66 and the true difference is 0.06; the models share most of their
# errors, as two fine-tunings of one model do.
_JOINT = {(1, 1): 0.60, (1, 0): 0.12, (0, 1): 0.06, (0, 0): 0.22}
_TRUE_DIFFERENCE = 0.06


def test_paired_interval_covers_a_known_difference():
  """400 simulated test sets of 1 000 rows drawn from ``_JOINT``: the 95 % paired interval
  covers the true difference in 93–97 % of them, and excludes zero in most (the effect is
  resolvable at this size)."""
  rng = np.random.default_rng(0)
  outcomes = np.asarray(list(_JOINT), np.float32)
  covered, excludes_zero = 0, 0
  for rep in range(400):
    rows = outcomes[rng.choice(len(outcomes), size=1000, p=list(_JOINT.values()))]
    interval = M.bootstrap(jax.random.PRNGKey(rep), _paired_difference,
                           {"a": rows[:, 0], "b": rows[:, 1]}, num_samples=1000)
    covered += interval.low <= _TRUE_DIFFERENCE <= interval.high
    excludes_zero += interval.excludes_zero
  assert 0.93 <= covered / 400 <= 0.97, covered / 400
  assert excludes_zero / 400 > 0.9


@pytest.mark.parametrize("call, match", [
    (lambda: M.bootstrap(jax.random.PRNGKey(0), M.accuracy_of), "groups"),
    (lambda: M.bootstrap(jax.random.PRNGKey(0), M.accuracy_of,
                         {"correct": np.ones(3), "confidence": np.ones(4)}), r"groups\[0\]"),
    (lambda: M.bootstrap(jax.random.PRNGKey(0), M.accuracy_of,
                         {"correct": np.ones(3)}, level=1.5), "level"),
    (lambda: M.bootstrap(jax.random.PRNGKey(0), M.accuracy_of,
                         {"correct": np.ones(3)}, num_samples=1), "num_samples"),
    (lambda: M.row_summaries(np.zeros((0, 3)), np.zeros(0, np.int32)), "logits"),
])
def test_bad_input(call, match):
  with pytest.raises(GlajaxError, match=match):
    call()


def test_weighted_statistics_equal_numpy_on_explicit_row_counts():
  """Each ``*_of`` statistic with row weights (..., N) equals NumPy on the rows repeated as the
  weights say (float64), under jit, for a batch of count vectors."""
  logits, labels = _logits(n=200, c=7, seed=4)
  rows = M.row_summaries(logits, labels)
  counts = np.stack([np.bincount(np.random.default_rng(s).integers(0, 200, 200), minlength=200)
                     for s in range(5)]).astype(np.float32)
  classes = np.asarray([1, 0, 1, 1, 0, 0, 1], bool)
  host = {k: np.asarray(v) for k, v in rows.items()}
  for w, got in zip(counts, np.asarray(jax.jit(lambda r, w: jax.numpy.stack([
      M.accuracy_of(r, w), M.ece_of(r, 10, w), M.class_mean_accuracy_of(r, classes, w),
      M.subset_accuracy_of(r, classes, w)], -1))(rows, counts))):
    rep = np.repeat(np.arange(200), w.astype(int))
    correct = host["correct"][rep].astype(np.float64)
    label = host["label"][rep]
    inside = classes[label]
    per_class = [correct[label == c].mean() for c in range(7) if classes[c] and (label == c).any()]
    expected = [correct.mean(), _numpy_ece(host["confidence"][rep].astype(np.float64), correct,
                                           10),
                np.mean(per_class), correct[inside].mean()]
    np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("metric, paired", [("accuracy", False), ("ece", True),
                                            ("class_mean", True), ("subset", False)])
def test_row_count_path_equals_the_resampling_path(metric, paired):
  """A statistic with a ``weighted`` method (the experiments' ``MeanOver``) gives the interval
  that resampling the rows gives, on the same resamples (``resample_counts`` are the bincounts
  of ``resample_indices``), over two stratified groups."""
  from glajax.experiments.kinds.common import MeanOver  # noqa  (the library's own statistic)
  za, labels = _logits(n=300, seed=5)
  zb, _ = _logits(n=300, seed=6)
  zc, shift_labels = _logits(n=120, seed=7)
  zd, _ = _logits(n=120, seed=8)
  statistic = MeanOver(metric, 10, paired=paired,
                       classes=(True, False, True, True, False, True, False)
                       if metric in ("class_mean", "subset") else ())
  if paired:
    groups = ({"before": M.row_summaries(za, labels), "after": M.row_summaries(zb, labels)},
              {"before": M.row_summaries(zc, shift_labels),
               "after": M.row_summaries(zd, shift_labels)})
  else:
    groups = (M.row_summaries(za, labels), M.row_summaries(zc, shift_labels))
  key = jax.random.PRNGKey(3)
  fast = M.bootstrap(key, statistic, *groups, num_samples=400)
  slow = M.bootstrap(key, lambda *g: statistic(*g), *groups, num_samples=400)
  np.testing.assert_allclose(fast, slow, atol=2e-6)
  index = uncertainty.resample_indices(key, (300, 120), 400)
  for counts, i, n in zip(uncertainty.resample_counts(key, (300, 120), 400), index, (300, 120)):
    np.testing.assert_array_equal(counts, np.stack([np.bincount(r, minlength=n)
                                                    for r in np.asarray(i)]))


def test_equal_accuracies_give_an_exact_zero_that_is_no_effect():
  """Two models right on the same rows (different confidences): the paired accuracy difference
  is exactly 0 in the estimate and every resample (row counts sum exactly), so no rounding
  residue reads as an effect."""
  from glajax.experiments.kinds.common import MeanOver  # noqa  (the library's own statistic)
  za, labels = _logits(n=257, seed=9)
  rows = {"before": M.row_summaries(za, labels), "after": M.row_summaries(za * 3.7, labels)}
  interval = M.bootstrap(jax.random.PRNGKey(1), MeanOver("accuracy", paired=True), rows)
  assert tuple(interval) == (0.0, 0.0, 0.0) and not interval.excludes_zero

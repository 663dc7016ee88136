"""Index-level subsampling: long-tail profile, k-shot counts, class subsets, split lists."""
import numpy as np
import pytest

from glajax import DatasetError
from glajax.data import subsample


def _balanced(num_classes=10, per_class=100, seed=0):
  return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def test_long_tail_profile_is_exponential():
  labels = _balanced()
  chosen = subsample.long_tail_indices(labels, imbalance_ratio=100, seed=0)
  counts = np.bincount(labels[chosen], minlength=10)
  expected = [int(100 * 100 ** (-c / 9)) for c in range(10)]  # CIFAR-10-LT: 100, 59, ..., 1
  np.testing.assert_array_equal(counts, expected)
  assert counts[0] / counts[-1] == 100
  assert len(np.unique(chosen)) == len(chosen) and np.all(np.diff(chosen) > 0)
  np.testing.assert_array_equal(chosen, subsample.long_tail_indices(labels, 100, seed=0))
  assert not np.array_equal(chosen, subsample.long_tail_indices(labels, 100, seed=1))
  with pytest.raises(ValueError, match="imbalance_ratio"):
    subsample.long_tail_indices(labels, 0.5, seed=0)
  with pytest.raises(DatasetError, match="imbalance_ratio: expected at most 100"):
    subsample.long_tail_indices(labels, 101, seed=0)


def test_k_shot_train_and_val_are_disjoint_with_exact_counts():
  labels = _balanced(per_class=20)
  train, val = subsample.k_shot_indices(labels, k=16, seed=3, val_k=4)
  np.testing.assert_array_equal(np.bincount(labels[train]), np.full(10, 16))
  np.testing.assert_array_equal(np.bincount(labels[val]), np.full(10, 4))
  assert not set(train) & set(val)
  again = subsample.k_shot_indices(labels, k=16, seed=3, val_k=4)
  np.testing.assert_array_equal(train, again[0])
  with pytest.raises(DatasetError, match="class .* with 20 examples"):
    subsample.k_shot_indices(labels, k=17, seed=0, val_k=4)
  with pytest.raises(ValueError, match="labels"):
    subsample.k_shot_indices(np.zeros((2, 2), int), k=1, seed=0)


def test_holdout_partitions_every_class_by_its_fraction():
  labels = np.concatenate([_balanced(per_class=20), np.full(3, 10), [11]])  # class 10: 3, 11: 1
  kept, held = subsample.holdout_indices(labels, 0.2, seed=5)
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(labels.size))
  expected = np.array([4] * 10 + [1, 0])  # round(0.2·20); at least one of 3; none of a singleton
  np.testing.assert_array_equal(np.bincount(labels[held], minlength=12), expected)
  np.testing.assert_array_equal(held, subsample.holdout_indices(labels, 0.2, seed=5)[1])
  assert not np.array_equal(held, subsample.holdout_indices(labels, 0.2, seed=6)[1])
  with pytest.raises(ValueError, match="fraction: expected a fraction in"):
    subsample.holdout_indices(labels, 1.0, seed=0)


def test_class_subset_masks():
  seen, absent = subsample.class_subset(100, 50, seed=0)
  assert seen.sum() == 50 and np.all(seen ^ absent)
  np.testing.assert_array_equal(seen, subsample.class_subset(100, 50, seed=0)[0])
  labels = _balanced()
  seen, _ = subsample.class_subset(10, 3, seed=1)
  chosen = subsample.indices_in_classes(labels, seen)
  assert set(labels[chosen]) == set(np.flatnonzero(seen)) and len(chosen) == 300
  with pytest.raises(ValueError, match="num_seen"):
    subsample.class_subset(10, 11, seed=0)


def test_read_split_list(tmp_path):
  path = tmp_path / "ImageNet_LT_train.txt"
  path.write_text("train/n01440764/a.JPEG 0\n/train/n01443537/b.JPEG 1\n\n")
  paths, labels = subsample.read_split_list(path)
  assert paths == ["train/n01440764/a.JPEG", "train/n01443537/b.JPEG"]
  np.testing.assert_array_equal(labels, [0, 1])
  path.write_text("train/a.JPEG zero\n")
  with pytest.raises(DatasetError, match="line 1"):
    subsample.read_split_list(path)
  with pytest.raises(DatasetError, match="no file"):
    subsample.read_split_list(tmp_path / "missing.txt")

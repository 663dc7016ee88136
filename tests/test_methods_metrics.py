"""Accuracy metrics, evaluation-set logit maps and effective robustness vs NumPy."""
import chex
import jax.numpy as jnp
import numpy as np

from glajax import GlajaxError
from glajax import methods as M


def _problem(seed, num_samples=300, num_classes=9):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_samples)
  logits = 2.0 * rng.normal(size=(num_samples, num_classes))
  logits[np.arange(num_samples), labels] += 1.5
  return logits.astype(np.float32), labels.astype(np.int32)


def _per_class(logits, labels, num_classes):
  hits = logits.argmax(axis=1) == labels
  return np.array([hits[labels == c].mean() if (labels == c).any() else np.nan
                   for c in range(num_classes)])


def _gla_breakdown_accuracy(logits, labels, q):
  """BeierZhu/GLA Code.zip src/gla.py ``breakdown_accuracy`` (``n_sub = 1000 // 3`` there, the
  class count here) with src/models/eval.py ``compute_accuracy``: sample-level accuracies."""
  import torch  # pylint: disable=import-outside-toplevel
  logits, labels, q = torch.from_numpy(logits), torch.from_numpy(labels).long(), torch.from_numpy(q)

  def find_sub_indices(labels, indices):
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for value in indices:
      mask |= (labels == value)
    return torch.where(mask)[0]

  def compute_accuracy(logits, labels):
    pred = logits.argmax(dim=1, keepdim=True)
    return pred.eq(labels.view_as(pred)).sum().item() / labels.size(0)

  n_sub = len(q) // 3
  _, indices = torch.sort(q, descending=True)
  locs = [find_sub_indices(labels, part) for part in
          (indices[:n_sub], indices[n_sub:2 * n_sub], indices[2 * n_sub:])]
  return [compute_accuracy(logits, labels)] + [compute_accuracy(logits[loc], labels[loc])
                                               for loc in locs]


class MetricsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_top_k_accuracy(self):
    logits, labels = _problem(0)
    for k in (1, 5):
      expected = np.mean([y in np.argsort(-z)[:k] for z, y in zip(logits, labels)])
      np.testing.assert_allclose(self.variant(lambda z, y: M.accuracy(z, y, k=k))(logits, labels),
                                 expected, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_class_and_group_accuracy(self):
    logits, labels = _problem(1)
    labels = np.where(labels == 8, 0, labels).astype(np.int32)   # class 8 has no test sample
    per_class = _per_class(logits, labels, 9)
    np.testing.assert_allclose(self.variant(M.per_class_accuracy)(logits, labels), per_class,
                               atol=1e-6)
    train_counts = np.array([500, 101, 100, 50, 20, 19, 3, 0, 7])
    groups = self.variant(M.group_accuracy)(logits, labels, train_counts)
    expected = {"many": per_class[[0, 1]].mean(), "medium": per_class[[2, 3, 4]].mean(),
                "few": per_class[[5, 6, 7]].mean(), "all": per_class[:8].mean()}
    for key, value in expected.items():
      np.testing.assert_allclose(groups[key], value, atol=1e-6, err_msg=key)

  @chex.variants(with_jit=True, without_jit=True)
  def test_group_accuracy_by_prior_matches_gla_breakdown(self):
    for num_classes, num_samples in ((1000, 4000), (8, 300)):
      logits, labels = _problem(2, num_classes=num_classes, num_samples=num_samples)
      rng = np.random.default_rng(0)
      log_prior = np.log(rng.dirichlet(np.ones(num_classes))).astype(np.float32)
      groups = self.variant(M.group_accuracy_by_prior)(logits, labels, log_prior)
      want = _gla_breakdown_accuracy(logits, labels, np.exp(log_prior))
      for key, value in zip(("all", "head", "medium", "tail"), want):
        np.testing.assert_allclose(groups[key], value, atol=1e-6, err_msg=key)
    # 8 classes: 2 head, 2 medium, 4 tail (np.array_split would give 3/3/2); 1000: 333/333/334.
    order = np.argsort(-log_prior)
    hits = logits.argmax(1) == labels
    np.testing.assert_allclose(groups["tail"], hits[np.isin(labels, order[4:])].mean(), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_group_accuracy_by_prior_class_mean_option(self):
    logits, labels = _problem(2, num_classes=8)
    log_prior = np.log(np.random.default_rng(0).dirichlet(np.ones(8))).astype(np.float32)
    per_class = _per_class(logits, labels, 8)
    order = np.argsort(-log_prior)
    groups = self.variant(lambda z, y, p: M.group_accuracy_by_prior(z, y, p, average="classes"))(
        logits, labels, log_prior)
    for key, classes in zip(("head", "medium", "tail"), (order[:2], order[2:4], order[4:])):
      np.testing.assert_allclose(groups[key], per_class[classes].mean(), atol=1e-6, err_msg=key)

  @chex.variants(with_jit=True, without_jit=True)
  def test_restrict_and_objectnet_logits(self):
    logits, _ = _problem(3)
    indices = np.array([7, 2, 5])
    np.testing.assert_array_equal(self.variant(lambda z: M.restrict_logits(z, indices))(logits),
                                  logits[:, indices])
    mapping = [[0, 4], [8], [1, 2, 3]]
    expected = np.stack([logits[:, m].max(axis=1) for m in mapping], axis=1)
    np.testing.assert_array_equal(self.variant(lambda z: M.objectnet_logits(z, mapping))(logits),
                                  expected)

  def test_average_and_effective_robustness(self):
    np.testing.assert_allclose(M.average_shift_accuracy({"v2": 0.6, "r": 0.7, "a": 0.2}), 0.5,
                               atol=1e-7)
    logit = lambda p: np.log(p / (1 - p))
    baseline_id = np.array([0.5, 0.6, 0.7, 0.8])
    baseline_ood = 1 / (1 + np.exp(-(0.8 * logit(baseline_id) - 0.5)))   # exactly on a line
    expected_trend = 1 / (1 + np.exp(-(0.8 * logit(0.75) - 0.5)))
    np.testing.assert_allclose(
        M.effective_robustness(0.75, 0.6, baseline_id, baseline_ood), 0.6 - expected_trend,
        atol=1e-5)
    np.testing.assert_allclose(
        M.effective_robustness(0.65, float(1 / (1 + np.exp(-(0.8 * logit(0.65) - 0.5)))),
                               baseline_id, baseline_ood), 0.0, atol=1e-5)

  def test_bfloat16_and_errors(self):
    logits, labels = _problem(4)
    np.testing.assert_allclose(M.accuracy(jnp.asarray(logits, jnp.bfloat16), labels),
                               np.mean(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)
                                       .argmax(1) == labels), atol=1e-7)
    with self.assertRaisesRegex(GlajaxError, "k: expected"):
      M.accuracy(logits, labels, k=10)
    with self.assertRaisesRegex(GlajaxError, "train_counts"):
      M.group_accuracy(logits, labels, np.ones(4))
    with self.assertRaisesRegex(GlajaxError, "distinct"):
      M.restrict_logits(logits, [1, 1])
    with self.assertRaisesRegex(GlajaxError, "mapping"):
      M.objectnet_logits(logits, [[0], []])
    with self.assertRaisesRegex(GlajaxError, "mapping"):
      M.objectnet_logits(logits, [[0, 99]])
    with self.assertRaisesRegex(GlajaxError, "baseline"):
      M.effective_robustness(0.5, 0.4, [0.5], [0.4])
    with self.assertRaisesRegex(GlajaxError, "id_accuracy"):
      M.effective_robustness(1.5, 0.4, [0.5, 0.6], [0.4, 0.5])

"""Calibration: temperature scaling and the ECE family (ECE, MCE, adaptive, class-wise), NLL,
Brier and reliability-diagram data. Everything is computed in float32 and is jittable
(``num_bins`` and ``per_batch`` static).

Binning: equal-width bins over (0, 1], bin b = (b/B, (b+1)/B] (lo exclusive, hi inclusive).
ECE (Guo et al., ICML 2017; top-label, L1): Σ_b (n_b/N) · |acc_b − conf_b|.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from glajax.errors import bad_argument
from glajax.methods import _checks

_LOG_BETA_RANGE = (-4.605170185988091, 4.605170185988091)   # T = 1/β in [0.01, 100]


def _inputs(logits, labels):
  logits = _checks.logits_array("logits", logits)
  _checks.nonempty("logits", logits)
  labels = _checks.labels_array("labels", labels, *logits.shape)
  return logits.astype(jnp.float32), labels


def _num_bins(num_bins) -> int:
  return _checks.positive_int("num_bins", num_bins)


@jax.jit
def _top_label(logits, labels):
  probs = jax.nn.softmax(logits, axis=-1)
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return confidence, correct


def _equal_width_bin(values, num_bins):
  """Index of the bin (b/B, (b+1)/B] holding each value (0 and below go to the first bin)."""
  return jnp.clip(jnp.ceil(values * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)


@functools.partial(jax.jit, static_argnames="num_segments")
def _binned(confidence, correct, bins, num_segments):
  counts = jax.ops.segment_sum(jnp.ones_like(confidence), bins, num_segments)
  conf_sum = jax.ops.segment_sum(confidence, bins, num_segments)
  correct_sum = jax.ops.segment_sum(correct, bins, num_segments)
  return counts, conf_sum, correct_sum


def ece(logits, labels, num_bins: int = 15, per_batch: int | None = None) -> jax.Array:
  """Expected calibration error: Σ_b (n_b/N)|acc_b − conf_b|, top-label, equal-width bins.

  ``per_batch=B`` instead averages the ECE of consecutive batches of B samples (the last may
  be smaller) weighted by batch size, Σ_b ECE_b·|b| / N, as CaRot's evaluation does
  (MLAI-Yonsei/CaRot ``src/models/eval.py``: ``tot_ece += ece_metric(prob, y) *
  logits.shape[0]`` per unshuffled batch of ``--batch-size`` 512, then ``tot_ece / n``, with
  torchmetrics' top-label L1 ``MulticlassCalibrationError(n_bins=10)``); the default is the
  whole-dataset ECE.
  """
  logits, labels = _inputs(logits, labels)
  num_bins = _num_bins(num_bins)
  confidence, correct = _top_label(logits, labels)
  bins = _equal_width_bin(confidence, num_bins)
  if per_batch is None:
    _, conf_sum, correct_sum = _binned(confidence, correct, bins, num_bins)
    return jnp.sum(jnp.abs(correct_sum - conf_sum)) / logits.shape[0]
  per_batch = _checks.positive_int("per_batch", per_batch)
  num_batches = -(-logits.shape[0] // per_batch)
  batch = jnp.arange(logits.shape[0]) // per_batch
  _, conf_sum, correct_sum = _binned(confidence, correct, batch * num_bins + bins,
                                     num_batches * num_bins)
  # ECE_b·|b| = Σ_bins |correct − confidence| within batch b, so the weighted mean is a plain sum.
  return jnp.sum(jnp.abs(correct_sum - conf_sum)) / logits.shape[0]


def mce(logits, labels, num_bins: int = 15) -> jax.Array:
  """Maximum calibration error: max over non-empty equal-width bins of |acc_b − conf_b|."""
  logits, labels = _inputs(logits, labels)
  num_bins = _num_bins(num_bins)
  confidence, correct = _top_label(logits, labels)
  counts, conf_sum, correct_sum = _binned(confidence, correct,
                                          _equal_width_bin(confidence, num_bins), num_bins)
  gaps = jnp.abs(correct_sum - conf_sum) / jnp.maximum(counts, 1.0)
  return jnp.max(jnp.where(counts > 0, gaps, 0.0))


def adaptive_ece(logits, labels, num_bins: int = 15) -> jax.Array:
  """Adaptive (equal-mass) ECE: the ECE formula with bins of ⌊N/B⌋ or ⌈N/B⌉ samples each,
  formed by sorting the top-label confidences (sample of rank r goes to bin ⌊r·B/N⌋)."""
  logits, labels = _inputs(logits, labels)
  num_bins = _num_bins(num_bins)
  confidence, correct = _top_label(logits, labels)
  order = jnp.argsort(confidence)
  bins = (jnp.arange(logits.shape[0]) * num_bins) // logits.shape[0]
  _, conf_sum, correct_sum = _binned(confidence[order], correct[order], bins, num_bins)
  return jnp.sum(jnp.abs(correct_sum - conf_sum)) / logits.shape[0]


def classwise_ece(logits, labels, num_bins: int = 15) -> jax.Array:
  """Class-wise ECE (Kull et al., NeurIPS 2019): (1/C) Σ_c Σ_b (n_bc/N)|freq_bc − conf_bc|,
  binning every sample's probability p_ic of every class c into equal-width bins."""
  logits, labels = _inputs(logits, labels)
  num_bins = _num_bins(num_bins)
  num_samples, num_classes = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  is_class = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  segments = _equal_width_bin(probs, num_bins) * num_classes + jnp.arange(num_classes)
  _, conf_sum, hit_sum = _binned(probs.ravel(), is_class.ravel(), segments.ravel(),
                                 num_bins * num_classes)
  return jnp.sum(jnp.abs(hit_sum - conf_sum)) / (num_samples * num_classes)


def nll(logits, labels) -> jax.Array:
  """Negative log-likelihood: mean_i −log softmax(z_i)_{y_i}."""
  logits, labels = _inputs(logits, labels)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def brier(logits, labels) -> jax.Array:
  """Brier score: mean_i Σ_c (p_ic − 1[c = y_i])² (summed over classes, in [0, 2])."""
  logits, labels = _inputs(logits, labels)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.mean(jnp.sum((probs - jax.nn.one_hot(labels, logits.shape[1])) ** 2, axis=-1))


def reliability_diagram(logits, labels, num_bins: int = 15) -> dict[str, jax.Array]:
  """Reliability-diagram data over equal-width bins (b/B, (b+1)/B].

  Returns ``bin_lower``, ``bin_upper``, ``confidence`` (mean top-label confidence),
  ``accuracy`` and ``count`` per bin, each (B,); empty bins have confidence = accuracy = 0.
  """
  logits, labels = _inputs(logits, labels)
  num_bins = _num_bins(num_bins)
  confidence, correct = _top_label(logits, labels)
  counts, conf_sum, correct_sum = _binned(confidence, correct,
                                          _equal_width_bin(confidence, num_bins), num_bins)
  edges = jnp.linspace(0.0, 1.0, num_bins + 1)
  safe = jnp.maximum(counts, 1.0)
  return {"bin_lower": edges[:-1], "bin_upper": edges[1:], "confidence": conf_sum / safe,
          "accuracy": correct_sum / safe, "count": counts.astype(jnp.int32)}


def fit_temperature(logits, labels, num_steps: int = 50) -> jax.Array:
  """Temperature scaling (Guo et al., ICML 2017): T = argmin_T NLL(z/T) on held-out data.

  NLL(βz) is convex in β = 1/T with derivative mean_i (Σ_c p_ic z_ic − z_{i,y_i}), which
  increases with β; ``num_steps`` bisection steps on log β over T ∈ [0.01, 100] find its root
  (the ends when it has none there). Float32, jittable, fixed iteration count.
  """
  logits, labels = _inputs(logits, labels)
  num_steps = _checks.positive_int("num_steps", num_steps)
  label_logits = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]

  def slope(log_beta):
    probs = jax.nn.softmax(jnp.exp(log_beta) * logits, axis=-1)
    return jnp.mean(jnp.sum(probs * logits, axis=-1) - label_logits)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    rising = slope(mid) > 0
    return jnp.where(rising, lo, mid), jnp.where(rising, mid, hi)

  lo, hi = jax.lax.fori_loop(0, num_steps, body, tuple(map(jnp.float32, _LOG_BETA_RANGE)))
  return jnp.exp(-0.5 * (lo + hi))

"""Logit adjustment, the logit-adjusted loss, the GLA ensemble and the backdoor ensemble."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glajax.errors import bad_argument
from glajax.methods import _checks


def _log_prior(name: str, log_prior, num_classes: int) -> jax.Array:
  log_prior = _checks.logits_array(name, log_prior, ndim=1)
  _checks.same_shape(name, log_prior, (num_classes,))
  return log_prior.astype(jnp.float32)


def logit_adjust(logits, log_prior, tau: float = 1.0) -> jax.Array:
  """Post-hoc logit adjustment (Menon et al., ICLR 2021): z − τ · log π. Float32 output."""
  logits = _checks.logits_array("logits", logits)
  _checks.real_number("tau", tau)
  return logits.astype(jnp.float32) - tau * _log_prior("log_prior", log_prior, logits.shape[1])


def logit_adjusted_loss(logits, labels, log_prior, tau: float = 1.0) -> jax.Array:
  """Logit-adjusted cross-entropy (Menon et al.): mean_i CE(z_i + τ · log π_train, y_i).

  Computed in float32 whatever the logits' dtype; jittable (values checked only when concrete).
  """
  logits = _checks.logits_array("logits", logits)
  labels = _checks.labels_array("labels", labels, *logits.shape)
  _checks.real_number("tau", tau)
  shifted = logits.astype(jnp.float32) + tau * _log_prior("log_prior", log_prior,
                                                          logits.shape[1])
  log_probs = jax.nn.log_softmax(shifted, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def gla_ensemble(ft_logits, zs_logits, zs_log_prior, ft_log_prior=None, target_log_prior=None,
                 ft_temperature: float = 1.0) -> jax.Array:
  """GLA ensemble (Zhu et al., NeurIPS 2023): f = (z_ft/T − log π_ft) + (z_zs − log π_p) + log π_t.

  ``ft_log_prior`` (fine-tuning label prior) and ``target_log_prior`` (test prior) default to
  uniform, a constant that changes neither the argmax nor the softmax, so it is left out.
  ``ft_temperature`` T = 1 except for few-shot GLA, which divides z_ft by a searched T.
  Float32 output.
  """
  ft_logits = _checks.logits_array("ft_logits", ft_logits)
  zs_logits = _checks.logits_array("zs_logits", zs_logits)
  _checks.same_shape("zs_logits", zs_logits, ft_logits.shape)
  num_classes = ft_logits.shape[1]
  _checks.in_range("ft_temperature", ft_temperature, 1e-6, float("inf"))
  combined = (ft_logits.astype(jnp.float32) / ft_temperature + zs_logits.astype(jnp.float32)
              - _log_prior("zs_log_prior", zs_log_prior, num_classes))
  if ft_log_prior is not None:
    combined = combined - _log_prior("ft_log_prior", ft_log_prior, num_classes)
  if target_log_prior is not None:
    combined = combined + _log_prior("target_log_prior", target_log_prior, num_classes)
  return combined


def backdoor_ensemble(logits_list) -> jax.Array:
  """Backdoor-adjusted prediction (Chen et al., ICML 2025): Σ_m z_m, i.e. P(c) = 1/M per model.

  ``logits_list`` holds M ≥ 1 (N, C) arrays of equal shape. Float32 output.
  """
  logits_list = list(logits_list)
  if not logits_list:
    raise bad_argument("logits_list", "at least one (N, C) logits array", "an empty list")
  arrays = [_checks.logits_array(f"logits_list[{m}]", z) for m, z in enumerate(logits_list)]
  for m, z in enumerate(arrays[1:], start=1):
    _checks.same_shape(f"logits_list[{m}]", z, arrays[0].shape)
  return sum(z.astype(jnp.float32) for z in arrays)

"""Training losses of the fine-tuning recipes (all pure, jittable, float32 reductions).

* cross-entropy with label smoothing (WiSE-FT recipe, Wortsman et al. 2022);
* logit-adjusted CE(z + τ·log π_train, y) (Menon et al. 2021; from ``glajax.methods``), with
  the backdoor paper's log π_train (:func:`la_log_prior`);
* the symmetric CLIP contrastive loss (FLYP, Goyal et al. 2023) and SigLIP's pairwise sigmoid
  loss (Zhai et al. 2023), each model fine-tuned with the loss it was pre-trained with;
* CaRot's terms (Oh et al., NeurIPS 2024): orthogonality ‖W_vᵀW_v − I‖_F, EMA
  self-distillation L_SD (softmax, and its sigmoid counterpart for SigLIP), and the teacher's
  momentum schedule and update timing (``carot_teacher_update``, from MLAI-Yonsei/CaRot
  ``src/models/carot_loss.py``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glajax.errors import bad_argument
from glajax.models.layers import l2_normalise
from glajax.methods.adjust import logit_adjusted_loss  # CE(z + τ·log π_train, y), Menon et al.

__all__ = ["cross_entropy", "logit_adjusted_loss", "la_log_prior", "contrastive_logits",
           "clip_contrastive_loss", "sigmoid_logits", "sigmoid_loss", "orthogonality_penalty",
           "projection_cross_penalty", "self_distillation_loss", "sigmoid_self_distillation_loss",
           "teacher_momentum", "ema_update", "carot_teacher_update"]


def cross_entropy(logits, labels, label_smoothing: float = 0.0, where=None):
  """Mean CE(z, y) against the smoothed one-hot target (1 − ε)·onehot(y) + ε/C.

  ``where`` (N,) weights rows (e.g. a batch's padding ``mask``): Σ w_i CE_i / max(Σ w_i, 1).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise bad_argument("label_smoothing", "a value in [0, 1)", label_smoothing)
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, targets)
  if where is None:
    return per_example.mean()
  where = where.astype(jnp.float32)
  return (per_example * where).sum() / jnp.maximum(where.sum(), 1.0)


def la_log_prior(counts, eps: float = 1e-9) -> np.ndarray:
  """log(n_c / Σ n + ε), ε = 1e-9, in float32: the logit-adjusted loss's log π_train as
  JiahaoChen1/Pre-train-Imbalance ``models/utils/losses.py`` ``LogitAdjustedLoss`` computes it
  (``torch.log(cls_num_ratio + 1e-9)`` on a float32 tensor; LIFT's has no ε). (C,)."""
  counts = np.asarray(counts, np.float32)
  if counts.ndim != 1 or not np.all(counts >= 0) or not counts.sum() > 0:
    raise bad_argument("counts", "a (C,) array of class counts >= 0 with a positive sum",
                       f"shape {counts.shape}")
  return np.log(counts / counts.sum() + np.float32(eps)).astype(np.float32)


def contrastive_logits(image_features, text_features, logit_scale):
  """CLIP's image→text logits exp(s)·norm(f_img)·norm(f_txt)ᵀ, (B, B); text→image is the .T."""
  return jnp.exp(logit_scale.astype(jnp.float32)) * (
      l2_normalise(image_features.astype(jnp.float32))
      @ l2_normalise(text_features.astype(jnp.float32)).T)


def clip_contrastive_loss(image_features, text_features, logit_scale):
  """FLYP's symmetric CLIP loss: ½[CE(L, arange) + CE(Lᵀ, arange)], L the image→text logits."""
  logits = contrastive_logits(image_features, text_features, logit_scale)
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (cross_entropy(logits, labels) + cross_entropy(logits.T, labels))


def sigmoid_logits(image_features, text_features, logit_scale, logit_bias):
  """SigLIP's pairwise logits exp(t)·norm(f_img)·norm(f_txt)ᵀ + b, (B_img, B_txt)."""
  return (contrastive_logits(image_features, text_features, logit_scale)
          + logit_bias.astype(jnp.float32))


def sigmoid_loss(image_features, text_features, logit_scale, logit_bias):
  """SigLIP's pairwise sigmoid loss over the B × B pairs of a batch:

    L = −(1/B) Σ_ij log σ(z_ij · (exp(t)·cos_ij + b)),  z_ij = +1 if i = j, −1 otherwise,

  t the log-scale, b the bias (both trained). big_vision ``trainers/proj/image_text/siglip.py``
  (``m1_diag1``, ``log_sigmoid``, sum over texts, mean over images); open_clip ``SigLipLoss``.
  Under ``jax.jit`` on a mesh the batch is the global one, the pairs open_clip's
  neighbour exchange sums across ranks.
  """
  logits = sigmoid_logits(image_features, text_features, logit_scale, logit_bias)
  signs = 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def orthogonality_penalty(projection_kernel):
  """CaRot's orthogonality constraint ‖W_vᵀW_v − I‖_F (Frobenius norm, not squared).

  ``projection_kernel`` is the visual projection as a Flax kernel, shape (hidden, projection_dim),
  the layout of OpenCLIP's ``visual.proj`` that CaRot constrains.
  """
  w = projection_kernel.astype(jnp.float32)
  gram = w.T @ w
  return jnp.linalg.norm(gram - jnp.eye(gram.shape[0], dtype=gram.dtype))


def projection_cross_penalty(visual_kernel, text_kernel):
  """‖W_v W_tᵀ‖_F for the (hidden_v, P) and (hidden_t, P) projection kernels (CaRot's scripts)."""
  return jnp.linalg.norm(visual_kernel.astype(jnp.float32) @ text_kernel.astype(jnp.float32).T)


def _soft_cross_entropy(teacher_logits, student_logits):
  """mean_i −Σ_j softmax(t)_ij · log_softmax(s)_ij."""
  return optax.softmax_cross_entropy(student_logits, jax.nn.softmax(teacher_logits)).mean()


def self_distillation_loss(student_image, student_text, student_logit_scale,
                           teacher_image, teacher_text, teacher_logit_scale):
  """CaRot's L_SD: row-mean CE between teacher and student softmaxes, image→text plus text→image.

  Each model uses its own logit scale; the teacher is a constant (its gradient is stopped).
  """
  student = contrastive_logits(student_image, student_text, student_logit_scale)
  teacher = jax.lax.stop_gradient(
      contrastive_logits(teacher_image, teacher_text, teacher_logit_scale))
  return _soft_cross_entropy(teacher, student) + _soft_cross_entropy(teacher.T, student.T)


def sigmoid_self_distillation_loss(student_image, student_text, student_logit_scale,
                                   student_logit_bias, teacher_image, teacher_text,
                                   teacher_logit_scale, teacher_logit_bias):
  """CaRot's L_SD for a model pre-trained with the sigmoid loss (SigLIP): the teacher's pair
  probabilities p_ij = σ(teacher logit_ij) as soft targets of the pairwise loss,

    L = −(1/B) Σ_ij [p_ij log σ(s_ij) + (1 − p_ij) log σ(−s_ij)],

  s the student's ``sigmoid_logits``. CaRot distils the teacher's predictions in the form its
  training loss scores them (CLIP: row-wise softmax distributions, ``self_distillation_loss``);
  under the sigmoid loss each pair is its own Bernoulli prediction, so its targets are the
  teacher's pair probabilities; like CaRot's term, its gradient vanishes where the student
  predicts what the teacher does. Each model uses its own scale and bias; the teacher is a
  constant.
  """
  student = sigmoid_logits(student_image, student_text, student_logit_scale, student_logit_bias)
  teacher = jax.lax.stop_gradient(sigmoid_logits(teacher_image, teacher_text,
                                                 teacher_logit_scale, teacher_logit_bias))
  p = jax.nn.sigmoid(teacher)
  pairs = p * jax.nn.log_sigmoid(student) + (1.0 - p) * jax.nn.log_sigmoid(-student)
  return -jnp.sum(pairs) / student.shape[0]


def teacher_momentum(step, total_steps: int, start: float = 0.05, end: float = 0.9,
                     warmup_fraction: float = 0.2):
  """CaRot's EMA momentum m = start + (end − start)·step/(f·total) while step < f·total, else end."""
  if total_steps <= 0:
    raise bad_argument("total_steps", "a positive number of steps", total_steps)
  ramp_steps = warmup_fraction * total_steps
  ramp = start + (end - start) * jnp.asarray(step, jnp.float32) / ramp_steps
  return jnp.where(step < ramp_steps, ramp, end)


def ema_update(teacher, student, momentum):
  """θ_t ← m·θ_t + (1 − m)·θ_s over every leaf (CaRot's teacher update)."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


def carot_teacher_update(teacher, params, step, *, total_steps: int, every: int = 500,
                         start: float = 0.05, end: float = 0.9, warmup_fraction: float = 0.2):
  """CaRot's EMA teacher after the optimiser update of 0-based step k = ``step``.

  Official timing (MLAI-Yonsei/CaRot ``src/models/carot_loss.py``, defaults from
  ``src/args.py``: ``--ema_up_freq 500 --m_sche_src 0.05 --m_sche_tar 0.9 --m_warm_up 0.2``):
  right after ``optimizer.step()`` of step k = i + epoch·num_batches, if k mod ``every`` = 0
  (k = 0 included) then θ_t ← m(k)·θ_t + (1 − m(k))·θ_s with
  m(k) = start + (end − start)·k / (f·total) while k < f·total, else ``end``
  (``teacher_momentum``); otherwise θ_t is unchanged. ``params`` are the student's parameters
  after that update. Built on ``optax.periodic_update`` and ``optax.incremental_update``; pure
  and jittable (``step`` may be traced). The official loop's extra condition
  ``k == num_batches·epochs`` is never met inside the loop (k ≤ total − 1) and is left out.
  """
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise bad_argument("every", "a positive int number of steps", repr(every))
  if not 0.0 < warmup_fraction:
    raise bad_argument("warmup_fraction", "a fraction > 0 of the training steps",
                       warmup_fraction)
  momentum = teacher_momentum(step, total_steps, start, end, warmup_fraction)
  averaged = jax.tree.map(lambda new, old: new.astype(old.dtype),
                          optax.incremental_update(teacher, params, momentum), teacher)
  return optax.periodic_update(averaged, teacher, step, every)

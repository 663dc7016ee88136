"""Classification heads on image features, and the image classifier that joins a family's model
to one.

* :class:`LinearHead` on L2-normalised projected features, initialised from the zero-shot head
  (WiSE-FT, Wortsman et al. 2022): at initialisation its logits are the zero-shot logits, with
  the model's logit bias where it has one (SigLIP: exp(t)·cos + b); with ``normalize=False`` on
  raw features, as a supervised classifier's own head (torchvision's ``fc``; Mai et al. 2024
  fine-tune an ImageNet ResNet-50 with it).
* :class:`CosineClassifier` with scale 25 on the pre-projection CLS feature, initialised from text
  features mapped back through the visual projection as LIFT does (backdoor adjustment, Chen et
  al. 2025, on shijxcs/LIFT).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from glajax.errors import bad_argument
from glajax.models.family import LinearClassifier
from glajax.models.layers import l2_normalise

COSINE_SCALE = 25.0


def cosine_logits(features, weights, scale: float = COSINE_SCALE):
  """s · norm(f) · norm(W)ᵀ: (N, D) features and (C, D) class weights -> (N, C) float32 logits."""
  features = features.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  return scale * l2_normalise(features) @ l2_normalise(weights).T


def _as_matrix(name, array):
  array = np.asarray(array, np.float32)
  if array.ndim != 2:
    raise bad_argument(name, "a 2-D array", f"shape {array.shape}")
  return array


class LinearHead(nnx.Module):
  """logits = norm(f)·W + b (``normalize``, the default) or f·W + b, W (D, C) float32;
  ``from_zeroshot`` gives the zero-shot logits."""

  def __init__(self, kernel, bias=None, *, normalize: bool = True):
    kernel = _as_matrix("kernel", kernel)
    if bias is not None and np.shape(bias) != kernel.shape[1:]:
      raise bad_argument("bias", f"shape {kernel.shape[1:]} (one per class)", np.shape(bias))
    self.kernel = nnx.Param(jnp.asarray(kernel))
    self.bias = nnx.Param(jnp.zeros(kernel.shape[1], jnp.float32) if bias is None
                          else jnp.asarray(bias, jnp.float32))
    self.normalize = bool(normalize)

  @classmethod
  def from_zeroshot(cls, zeroshot_head, logit_bias=None):
    """W = headᵀ for a (C, D) zero-shot head already scaled by exp(logit_scale); b = the model's
    ``logit_bias`` (a scalar parameter or array: SigLIP's b) for every class, or 0 (None: CLIP).
    """
    kernel = _as_matrix("zeroshot_head", zeroshot_head).T
    if logit_bias is None:
      return cls(kernel)
    bias = np.asarray(logit_bias[...] if isinstance(logit_bias, nnx.Variable) else logit_bias,
                      np.float32)
    if bias.size != 1:
      raise bad_argument("logit_bias", "a scalar (the model's logit bias) or None",
                         f"shape {bias.shape}")
    return cls(kernel, np.full(kernel.shape[1], bias.reshape(()), np.float32))

  def __call__(self, features):
    features = features.astype(jnp.float32)
    if self.normalize:
      features = l2_normalise(features)
    return features @ self.kernel[...] + self.bias[...]

  def as_linear(self) -> tuple[np.ndarray, np.ndarray]:
    """(K (D, C), b (C,)) with logits = g(f)·K + b, g = norm when ``normalize``: the kernel and
    bias themselves."""
    return np.asarray(self.kernel[...], np.float32), np.asarray(self.bias[...], np.float32)


class CosineClassifier(nnx.Module):
  """logits = s · cos(f, w_c) with learned (C, D) weights w and fixed scale s (25)."""

  normalize = True   # as a linear map (``as_linear``), it acts on normalised features

  def __init__(self, weights, scale: float = COSINE_SCALE):
    self.weight = nnx.Param(jnp.asarray(_as_matrix("weights", weights)))
    self.scale = scale

  @classmethod
  def from_text_features(cls, text_features, projection_kernel, scale: float = COSINE_SCALE,
                         init: str = "lift"):
    """Weights from (C, P) text features t_c and the (D, P) visual projection kernel W_v.

    ``init="lift"`` (the default): w_c = normalise(normalise(t_c) @ W_vᵀ), LIFT's
    ``init_head_text_feat`` (shijxcs/LIFT ``trainer.py``: ``text_features = F.normalize(
    encode_text(...)); text_features @ image_encoder.proj.t()``, normalised again; OpenAI's
    ``proj`` is the (D, P) kernel). ``init="pinv"``: w_c = t_c · pinv(W_v), the minimum-norm
    pre-projection vector whose projection is t_c (glajax's earlier initialisation).
    """
    text = _as_matrix("text_features", text_features)
    kernel = _as_matrix("projection_kernel", projection_kernel)
    if text.shape[1] != kernel.shape[1]:
      raise bad_argument("text_features", f"width {kernel.shape[1]} (the projection's output)",
                         f"shape {text.shape}")
    if init == "pinv":
      return cls(text @ np.linalg.pinv(kernel.astype(np.float64)).astype(np.float32), scale)
    if init != "lift":
      raise bad_argument("init", "'lift' or 'pinv'", repr(init))
    return cls(l2_normalise(l2_normalise(text.astype(np.float64)) @ kernel.T.astype(np.float64))
               .astype(np.float32), scale)

  def __call__(self, features):
    return cosine_logits(features, self.weight[...], self.scale)

  def as_linear(self) -> tuple[np.ndarray, np.ndarray]:
    """(K (D, C), b (C,)) with logits = norm(f)·K + b: K = s · norm(W)ᵀ, b = 0."""
    weight = np.asarray(self.weight[...], np.float32)
    return ((self.scale * l2_normalise(weight)).T.astype(np.float32),
            np.zeros(weight.shape[0], np.float32))


class ImageClassifier(nnx.Module):
  """A family's model (``backbone``) with a head: ``features="projected"`` feeds
  ``encode_image`` (WiSE-FT; a supervised classifier's pooled feature), ``"pre_projection"`` the
  pooled ``image_features`` (backdoor adjustment's cosine head)."""

  def __init__(self, backbone, head, features: str = "projected"):
    if features not in ("projected", "pre_projection"):
      raise bad_argument("features", "'projected' or 'pre_projection'", repr(features))
    self.backbone = backbone
    self.head = head
    self.features = features

  def param_groups(self) -> dict[str, str]:
    """The backbone's parameter groups under ``backbone/``, and ``head``."""
    return {**prefixed_groups(self.backbone), "head": r"^head/"}

  def __call__(self, images):
    if self.features == "projected":
      return self.head(self.backbone.encode_image(images))
    return self.head(self.backbone.image_features(images))

  def as_classifier(self) -> LinearClassifier:
    """The classifier as an export writes it (``family.LinearClassifier``)."""
    return LinearClassifier(*self.head.as_linear(), self.features, self.head.normalize)


def prefixed_groups(backbone, prefix: str = "backbone") -> dict[str, str]:
  """``backbone.param_groups()`` for a wrapper that holds the backbone as ``prefix``: each regex
  anchored at ``prefix/`` instead of the root."""
  out = {}
  for name, regex in backbone.param_groups().items():
    out[name] = (f"^{prefix}/" + regex[1:]) if regex.startswith("^") else f"^{prefix}/.*{regex}"
  return out

"""GLA's few-shot prompt tuning: learned residuals on the token embeddings of the class prompts.

Zhu et al. (NeurIPS 2023) tune "template(class name)" prompts with both CLIP encoders frozen: the
prompt's token embeddings e get residuals, e' = e + r_ctx[k] on the k-th context (template) token
and e' = e + r_c on the class-name tokens of class c; both start at zero, so the initial classifier
is the zero-shot one. logits = exp(s) · norm(f_img) · norm(f_txt(e'))ᵀ.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from glajax.errors import bad_argument
from glajax.models.clip.modeling import eos_positions
from glajax.models.layers import l2_normalise
from glajax.models.heads import prefixed_groups


def _token_count(ids: np.ndarray, eos_token_id: int) -> np.ndarray:
  """Tokens between SOT and the pooled EOS of each row."""
  return eos_positions(ids, eos_token_id) - 1


def trim_to_longest(ids, eos_token_id: int) -> np.ndarray:
  """(..., L) ids cut after the last pooled EOS: the text tower is causal and pools at EOS, so
  the tokens after it change nothing, and shorter prompts encode faster."""
  ids = np.asarray(ids, np.int32)
  return ids[..., :int(eos_positions(ids, eos_token_id).max()) + 1]


def tokenize_prompts(tokenizer, classnames, template: str, eos_token_id: int):
  """(ids, context_index, name_mask) of ``template.format(name)`` for every class.

  ids (C, L) are cut after the longest prompt's EOS (the text tower is causal and pools at EOS,
  so the cut changes nothing); context_index (C, L) is k at the k-th template token, else −1;
  name_mask (C, L) marks the class-name tokens.
  """
  if template.count("{}") != 1:
    raise bad_argument("template", "a string with one '{}'", repr(template))
  prefix, suffix = (part.strip() for part in template.split("{}"))
  names = list(classnames)
  ids = np.asarray(tokenizer([template.format(c) for c in names]), np.int32)
  n_name = _token_count(np.asarray(tokenizer(names), np.int32), eos_token_id)
  parts = np.asarray(tokenizer([prefix or "x", suffix or "x"]), np.int32)
  n_prefix, n_suffix = (_token_count(parts, eos_token_id) * [bool(prefix), bool(suffix)])
  n_total = _token_count(ids, eos_token_id)
  bad = np.flatnonzero(n_total != n_prefix + n_name + n_suffix)
  if bad.size:
    raise bad_argument("template", "prompts whose tokens are the template's plus the class name's",
                       f"other tokens for class {names[bad[0]]!r}")
  ids = trim_to_longest(ids, eos_token_id)
  length = ids.shape[1]
  positions = np.arange(length)[None, :]
  name_start = 1 + n_prefix
  name_mask = (positions >= name_start) & (positions < name_start + n_name[:, None])
  prefix_index = np.where((positions >= 1) & (positions < name_start), positions - 1, -1)
  suffix_start = name_start + n_name[:, None]
  suffix_index = np.where((positions >= suffix_start) & (positions < suffix_start + n_suffix),
                          n_prefix + positions - suffix_start, -1)
  context_index = np.maximum(prefix_index, suffix_index).astype(np.int32)
  return ids, context_index, name_mask


class PromptTunedModel(nnx.Module):
  """A frozen model (a family with a text tower pooling at EOS: CLIP) whose class prompts carry
  learned embedding residuals (zero at init)."""

  def __init__(self, backbone, ids, context_index, name_mask):
    ids, context_index = np.asarray(ids, np.int32), np.asarray(context_index, np.int32)
    name_mask = np.asarray(name_mask, bool)
    if not ids.shape == context_index.shape == name_mask.shape or ids.ndim != 2:
      raise bad_argument("ids", "(C, L) ids, context_index and name_mask of one shape",
                         f"{ids.shape}, {context_index.shape}, {name_mask.shape}")
    width = backbone.embed_tokens(jnp.zeros((1, 1), jnp.int32)).shape[-1]
    self.backbone = backbone
    self.ids = nnx.Variable(jnp.asarray(ids))
    self.context_index = nnx.Variable(jnp.asarray(context_index))
    self.name_mask = nnx.Variable(jnp.asarray(name_mask))
    self.context_residual = nnx.Param(jnp.zeros((max(int(context_index.max()) + 1, 1), width)))
    self.name_residual = nnx.Param(jnp.zeros((*ids.shape, width)))

  def text_features(self):
    """(C, D) projected text features of the tuned prompts."""
    ids, index = self.ids[...], self.context_index[...]
    embeds = self.backbone.embed_tokens(ids)
    context = jnp.where((index >= 0)[..., None], self.context_residual[...][jnp.maximum(index, 0)],
                        0.0)
    name = jnp.where(self.name_mask[...][..., None], self.name_residual[...], 0.0)
    embeds = (embeds.astype(jnp.float32) + context + name).astype(embeds.dtype)
    return self.backbone.encode_text(ids, embeds)

  def __call__(self, images=None, image_features=None):
    """(N, C) logits of images, or of ``image_features`` (the image tower is frozen)."""
    if image_features is None:
      image_features = self.backbone.encode_image(images)
    image = l2_normalise(image_features)
    text = l2_normalise(self.text_features())
    return jnp.exp(self.backbone.logit_scale[...].astype(jnp.float32)) * image @ text.T

  def param_groups(self) -> dict[str, str]:
    return prefixed_groups(self.backbone)

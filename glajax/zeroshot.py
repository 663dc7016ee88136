"""The zero-shot classification head of a model with a text tower (CLIP, Radford et al., 2021;
SigLIP), as used by WiSE-FT and GLA.

  w_c = normalise(mean_t normalise(f_text(template_t(class_c))));  W = exp(logit_scale) * stack(w_c)
  logits = normalise(f_image(x)) @ W^T [+ logit_bias]

The model's logit bias (SigLIP's b: σ(logits) are its pairwise match probabilities; None for
CLIP) joins as the head's bias: ``heads.LinearHead.from_zeroshot(W, model.logit_bias)``.
"""
from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from glajax.errors import bad_argument
from glajax.methods import _checks
from glajax.models import registry
from glajax.models.layers import check_token_ids, l2_normalise


def _fill(template: str | Callable[[str], str], classname: str) -> str:
  return template(classname) if callable(template) else template.format(classname)


def _is_template(template) -> bool:
  """A callable, or a format string with exactly one positional field ``{}`` (or ``{0}``)."""
  if callable(template):
    return True
  if not isinstance(template, str):
    return False
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError:  # unbalanced braces
    return False
  return len(fields) == 1 and fields[0] in ("", "0")


def zeroshot_head(model, tokenizer, classnames: Sequence[str],
                  templates: Sequence[str | Callable[[str], str]], *, batch_size: int = 256,
                  show_progress: bool = True, desc: str = "zero-shot head") -> jax.Array:
  """(C, D) float32 zero-shot head, already scaled by exp(logit_scale).

  ``templates`` are format strings with one ``{}`` (OpenAI's "a photo of a {}.") or callables.
  Prompts are encoded in jitted batches of one fixed size (the last one padded), so the text
  tower compiles once; the progress bar is labelled ``desc``.
  """
  for name, value in (("classnames", classnames), ("templates", templates)):
    if isinstance(value, (str, bytes)):  # list("cat") would be the classes c, a, t
      raise bad_argument(name, "a list of str (one per class)" if name == "classnames" else
                         "a list of templates", f"the single str {value!r}; wrap it in a list")
  classnames, templates = list(classnames), list(templates)
  if not classnames or not all(isinstance(c, str) for c in classnames):
    raise bad_argument("classnames", "a non-empty list of str", classnames[:5])
  bad = [t for t in templates if not _is_template(t)]
  if not templates or bad:
    raise bad_argument("templates", "a non-empty list of callables or format strings with "
                       "exactly one '{}'", bad[:5] if bad else "an empty list")
  batch_size = _checks.positive_int("batch_size", batch_size)
  spec = registry.spec_of(model)
  if not spec.has_text:
    raise bad_argument("model", "a model with a text tower (a zero-shot head needs prompts)",
                       f"a {spec.family} model")
  vocab_size = spec.vocab_size
  prompts = [_fill(t, c) for c in classnames for t in templates]
  size = min(batch_size, len(prompts))
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda state, ids: l2_normalise(nnx.merge(graphdef, state).encode_text(ids)))
  embeddings = []
  with tqdm(total=len(prompts), desc=desc, unit=" prompts",
            disable=not show_progress) as bar:
    for start in range(0, len(prompts), size):
      chunk = prompts[start:start + size]
      ids = np.asarray(tokenizer(chunk + chunk[:1] * (size - len(chunk))), np.int32)
      check_token_ids("tokenizer", ids, vocab_size)  # before the jitted encoder, which cannot
      embeddings.append(np.asarray(encode(state, ids))[:len(chunk)])
      bar.update(len(chunk))
  per_prompt = np.concatenate(embeddings).reshape(len(classnames), len(templates), -1)
  weights = l2_normalise(jnp.asarray(per_prompt, jnp.float32).mean(axis=1))
  return weights * jnp.exp(jnp.asarray(model.logit_scale[...], jnp.float32))

"""The zero-shot classification head of CLIP (Radford et al., 2021), as used by WiSE-FT and GLA.

  w_c = normalise(mean_t normalise(f_text(template_t(class_c))));  W = exp(logit_scale) * stack(w_c)
  logits = normalise(f_image(x)) @ W^T
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from glajax.errors import bad_argument


def _fill(template: str | Callable[[str], str], classname: str) -> str:
  return template(classname) if callable(template) else template.format(classname)


def _normalise(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def zeroshot_head(model, tokenizer, classnames: Sequence[str],
                  templates: Sequence[str | Callable[[str], str]], *, batch_size: int = 256,
                  show_progress: bool = True) -> jax.Array:
  """(C, D) float32 zero-shot head, already scaled by exp(logit_scale).

  ``templates`` are format strings with one ``{}`` (OpenAI's "a photo of a {}.") or callables.
  Prompts are encoded in jitted batches of one fixed size (the last one padded), so the text
  tower compiles once.
  """
  classnames, templates = list(classnames), list(templates)
  if not classnames or not all(isinstance(c, str) for c in classnames):
    raise bad_argument("classnames", "a non-empty list of str", classnames[:5])
  if not templates or not all(callable(t) or (isinstance(t, str) and "{}" in t)
                              for t in templates):
    raise bad_argument("templates", "a non-empty list of format strings with '{}' or callables",
                       templates[:5])
  if batch_size < 1:
    raise bad_argument("batch_size", "an int >= 1", batch_size)
  prompts = [_fill(t, c) for c in classnames for t in templates]
  size = min(batch_size, len(prompts))
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda state, ids: _normalise(nnx.merge(graphdef, state).encode_text(ids)))
  embeddings = []
  with tqdm(total=len(prompts), desc="zero-shot head", unit="prompt",
            disable=not show_progress) as bar:
    for start in range(0, len(prompts), size):
      chunk = prompts[start:start + size]
      ids = np.asarray(tokenizer(chunk + chunk[:1] * (size - len(chunk))), np.int32)
      embeddings.append(np.asarray(encode(state, ids))[:len(chunk)])
      bar.update(len(chunk))
  per_prompt = np.concatenate(embeddings).reshape(len(classnames), len(templates), -1)
  weights = _normalise(jnp.asarray(per_prompt, jnp.float32).mean(axis=1))
  return weights * jnp.exp(jnp.asarray(model.logit_scale[...], jnp.float32))

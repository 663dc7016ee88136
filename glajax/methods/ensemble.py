"""WiSE-FT weight-space ensembles and output-space ensembles (Wortsman et al., CVPR 2022)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glajax.errors import bad_argument
from glajax.methods import _checks

_FISHER_FLOOR = 1e-8


def _leaves(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape_dtype(leaf):
  """Shape and dtype as given (not canonicalised: float64 stays float64 without x64)."""
  dtype = getattr(leaf, "dtype", None)
  return tuple(np.shape(leaf)), dtype if dtype is not None else np.asarray(leaf).dtype


def _check_matching(name_0: str, tree_0, name_1: str, tree_1, dtypes: bool = True) -> None:
  """Raises one InputError listing every path whose presence, shape (or dtype) differs."""
  leaves_0, leaves_1 = _leaves(tree_0), _leaves(tree_1)
  problems = [f"{path} only in {name_0}" for path in leaves_0 if path not in leaves_1]
  problems += [f"{path} only in {name_1}" for path in leaves_1 if path not in leaves_0]
  for path in leaves_0.keys() & leaves_1.keys():
    (shape_0, dtype_0), (shape_1, dtype_1) = map(_shape_dtype, (leaves_0[path], leaves_1[path]))
    if shape_0 != shape_1 or (dtypes and dtype_0 != dtype_1):
      problems.append(f"{path}: {dtype_0}{list(shape_0)} vs {dtype_1}{list(shape_1)}")
  if not problems and (jax.tree_util.tree_structure(tree_0)
                       != jax.tree_util.tree_structure(tree_1)):
    problems.append(f"tree structures differ: {jax.tree_util.tree_structure(tree_0)} vs "
                    f"{jax.tree_util.tree_structure(tree_1)}")
  if problems:
    raise bad_argument(name_1, f"a pytree matching {name_0} (same paths, shapes, dtypes)",
                       f"{len(problems)} mismatches: " + "; ".join(sorted(problems)))


def _interpolate_leaf(leaf_0, leaf_1, alpha, fisher_0=None, fisher_1=None):
  leaf_0, leaf_1 = jnp.asarray(leaf_0), jnp.asarray(leaf_1)
  if not jnp.issubdtype(leaf_0.dtype, jnp.floating):
    values_0, values_1 = _checks.concrete(leaf_0), _checks.concrete(leaf_1)
    if values_0 is not None and values_1 is not None and not np.array_equal(values_0, values_1):
      raise bad_argument("params_1", "non-floating leaves equal to params_0's",
                         f"a differing {leaf_0.dtype} leaf")
    return leaf_0
  a, b = leaf_0.astype(jnp.float32), leaf_1.astype(jnp.float32)
  if fisher_0 is None:
    merged = (1.0 - alpha) * a + alpha * b
  else:
    c_0 = (1.0 - alpha) * jnp.maximum(jnp.asarray(fisher_0, jnp.float32), _FISHER_FLOOR)
    c_1 = alpha * jnp.maximum(jnp.asarray(fisher_1, jnp.float32), _FISHER_FLOOR)
    merged = (c_0 * a + c_1 * b) / (c_0 + c_1)
  return merged.astype(leaf_0.dtype)


def wise_ft(params_0, params_1, alpha, *, fisher=None):
  """WiSE-FT: θ_α = (1 − α)·θ_0 + α·θ_1 over every floating leaf of two matching pytrees.

  With ``fisher=(F_0, F_1)`` (pytrees matching the params) it is the Fisher-weighted merge
  (c_0θ_0 + c_1θ_1)/(c_0 + c_1), c_0 = (1−α)·max(F_0, 1e-8), c_1 = α·max(F_1, 1e-8).
  Paths, shapes and dtypes must match exactly (all mismatches are listed in one error); α must
  lie in [0, 1] (checked when concrete). Arithmetic in float32, each leaf cast back to its dtype;
  non-floating leaves must be equal and are returned unchanged. Jittable.
  """
  _check_matching("params_0", params_0, "params_1", params_1)
  _checks.real_scalar("alpha", alpha, 0.0, 1.0)
  alpha = jnp.asarray(alpha, jnp.float32)
  if fisher is None:
    return jax.tree.map(lambda a, b: _interpolate_leaf(a, b, alpha), params_0, params_1)
  if not isinstance(fisher, (tuple, list)) or len(fisher) != 2:
    raise bad_argument("fisher", "a pair (F_0, F_1) of pytrees matching the params",
                       type(fisher).__name__)
  for name, tree in (("fisher[0]", fisher[0]), ("fisher[1]", fisher[1])):
    _check_matching("params_0", params_0, name, tree, dtypes=False)
  return jax.tree.map(lambda a, b, f_0, f_1: _interpolate_leaf(a, b, alpha, f_0, f_1),
                      params_0, params_1, fisher[0], fisher[1])


def output_ensemble(logits_0, logits_1, alpha, space: str = "logits") -> jax.Array:
  """Output-space ensemble: (1−α)·f_0 + α·f_1 (float32).

  ``space="logits"`` mixes logits and returns logits; ``space="probs"`` mixes softmax
  probabilities and returns probabilities.
  """
  logits_0 = _checks.logits_array("logits_0", logits_0)
  logits_1 = _checks.logits_array("logits_1", logits_1)
  _checks.same_shape("logits_1", logits_1, logits_0.shape)
  _checks.choice("space", space, ("logits", "probs"))
  _checks.real_scalar("alpha", alpha, 0.0, 1.0)
  f_0, f_1 = logits_0.astype(jnp.float32), logits_1.astype(jnp.float32)
  if space == "probs":
    f_0, f_1 = jax.nn.softmax(f_0, axis=-1), jax.nn.softmax(f_1, axis=-1)
  return (1.0 - alpha) * f_0 + alpha * f_1

"""Atomic file writes: every file glajax writes appears whole or not at all.

Each writer writes a temporary file beside the target (named with the process id, so two
processes never share one) and renames it over the target; a crash leaves the old file, or none.
Filesystem errors are raised as :class:`~glajax.errors.InputError` naming the path.
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from glajax.errors import InputError


@contextlib.contextmanager
def _filesystem(path: str, what: str):
  """Turns an OSError while writing ``path`` into an InputError that names the path."""
  try:
    yield
  except OSError as e:
    raise InputError(f"{what} {path!r}: expected a writable location, found "
                     f"{type(e).__name__}: {e.strerror or e}") from e


def _tmp(path: str, suffix: str = "") -> str:
  return f"{path}.tmp{os.getpid()}{suffix}"


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename: never half-written."""
  tmp = _tmp(path)
  with _filesystem(path, "writing"):
    try:
      with open(tmp, "w") as f:
        f.write(text)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


def json_default(value):
  """``json.dumps(default=...)`` for NumPy scalars and arrays (and anything with __array__)."""
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, np.floating):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, "__array__"):
    return np.asarray(value).tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_or_none(value):
  """``value`` (nested dicts, lists, arrays, numbers) with NaN and ±inf turned into None, so it
  writes as strict JSON (``write_json(..., allow_nan=False)``)."""
  if isinstance(value, dict):
    return {k: finite_or_none(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return finite_or_none(value.tolist())
  if isinstance(value, (list, tuple)):
    return [finite_or_none(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  return value


def write_json(path: str, value, **kwargs) -> None:
  """``value`` as indented JSON (NumPy values converted), written atomically."""
  write_text(path, json.dumps(value, indent=2, default=json_default, **kwargs))


def save_npz(path: str, **arrays) -> None:
  """Writes ``arrays`` to ``path`` (.npz) through a temporary file and a rename."""
  tmp = _tmp(path, ".npz")
  with _filesystem(path, "writing"):
    try:
      np.savez(tmp, **arrays)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

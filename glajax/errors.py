"""The one error hierarchy of glajax.

Every bad input raises a subclass of :class:`GlajaxError` whose message names the argument,
what was expected and what was found; :func:`bad_argument` builds that message in one place.
"""
from __future__ import annotations


class GlajaxError(Exception):
  """Base class of every error glajax raises on purpose."""


class InputError(GlajaxError, ValueError):
  """An argument has the wrong shape, dtype, range or value."""


class CheckpointError(GlajaxError, ValueError):
  """A checkpoint is missing, incomplete, corrupt or not a CLIP checkpoint."""


class DatasetError(GlajaxError, ValueError):
  """A dataset is unknown, missing, incomplete or corrupt."""


class ConfigError(GlajaxError, ValueError):
  """An experiment config or work directory is invalid."""


class TrainingError(GlajaxError, RuntimeError):
  """Training cannot go on (e.g. a non-finite loss)."""


def bad_argument(argument: str, expected: str, found: object,
                 error: type[GlajaxError] = InputError) -> GlajaxError:
  """Returns ``error("<argument>: expected <expected>, found <found>")`` for ``raise``."""
  return error(f"{argument}: expected {expected}, found {found}")

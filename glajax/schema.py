"""How a part of glajax declares the config keys it owns: each key's type, range or choices,
whether ``None`` is allowed, and whether it changes results.

The engine declares its keys, each recipe its own, the experiment base its own and each
experiment kind its section, next to the code that reads them; ``glajax.experiments.config``
checks a config against the declarations of the parts it names (its kind, its recipes) and
leaves the keys that do not change results out of a work directory's fingerprint.

  FIELDS = {"alphas": Field("floats", 0, 1, result=False), "ece_bins": Field("int", 1)}
  check_section(config.wise_ft, FIELDS, "wise_ft")
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping

from glajax.errors import ConfigError, bad_argument

KINDS = ("int", "float", "positive", "choice", "ints", "floats", "bool", "str", "any")


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key.

  Attributes:
    kind: "int" (integral, in [low, high]), "float" (a finite number in [low, high]),
      "positive" (a finite number in (low, high]), "choice" (one of ``choices``), "ints" /
      "floats" (a non-empty tuple of such numbers), "bool", "str", "any" (not checked here).
    low, high: bounds (None: unbounded).
    choices: the allowed values of a "choice".
    optional: whether None is allowed.
    result: whether the key can change a result (False: where or how fast a run goes, or only
      what a report shows from cached results; such keys stay out of the fingerprint).
  """
  kind: str
  low: float | None = None
  high: float | None = None
  choices: tuple = ()
  optional: bool = False
  result: bool = True

  def __post_init__(self):
    if self.kind not in KINDS:
      raise bad_argument("Field.kind", f"one of {', '.join(KINDS)}", repr(self.kind))


def _number(value, integral: bool) -> bool:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return False
  if integral and not isinstance(value, numbers.Integral):
    return False
  return value == value and abs(value) != float("inf")


def _number_text(value) -> str:
  """A bound as written: integers in full (2147483647, not 2.14748e+09), others by ``:g``."""
  return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def _bounds(field: Field) -> str:
  low = "" if field.low is None else (f" > {_number_text(field.low)}" if field.kind == "positive"
                                      else f" >= {_number_text(field.low)}")
  high = "" if field.high is None else f" and <= {_number_text(field.high)}"
  return (low + high) if low else (f" <= {_number_text(field.high)}" if high else "")


def _in_range(value, field: Field) -> bool:
  if field.low is not None and (value <= field.low if field.kind == "positive"
                                else value < field.low):
    return False
  return field.high is None or value <= field.high


def check(key: str, value, field: Field) -> None:
  """Raises a ConfigError naming ``key`` when ``value`` is not what ``field`` declares."""
  if value is None and field.optional:
    return
  kind = field.kind
  if kind in ("int", "float", "positive"):
    ok = _number(value, kind == "int") and _in_range(value, field)
    expected = ("an integer" if kind == "int" else "a number") + _bounds(field)
  elif kind in ("ints", "floats"):
    ok = (isinstance(value, (tuple, list)) and len(value) > 0
          and all(_number(v, kind == "ints") and _in_range(v, field) for v in value))
    expected = ("a non-empty tuple of " + ("integers" if kind == "ints" else "numbers")
                + _bounds(field))
  elif kind == "choice":
    ok = value in field.choices
    expected = f"one of {', '.join(map(repr, field.choices))}"
  elif kind == "bool":
    ok, expected = isinstance(value, bool), "True or False"
  elif kind == "str":
    ok, expected = isinstance(value, str), "a string"
  else:
    return
  if not ok:
    raise bad_argument(key, expected + (" or None" if field.optional else ""), repr(value),
                       ConfigError)


def _lookup(section, dotted: str):
  node = section
  for part in dotted.split("."):
    if not (isinstance(node, Mapping) or hasattr(node, "items")) or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def check_section(section, fields: Mapping[str, Field], prefix: str) -> None:
  """Every declared key present in ``section`` (a ConfigDict or dict; dotted names reach into
  sub-sections) checked, each error naming ``prefix.key``."""
  for name, field in fields.items():
    value = _lookup(section, name)
    if value is not _MISSING:
      check(f"{prefix}.{name}" if prefix else name, value, field)


def unfingerprinted(fields: Mapping[str, Field], prefix: str) -> list[str]:
  """The dotted keys of ``fields`` (under ``prefix``) that do not change results."""
  return [f"{prefix}.{name}" if prefix else name for name, f in fields.items() if not f.result]


def require_keys(section, keys, prefix: str, what: str) -> None:
  """Raises a ConfigError naming ``prefix`` when ``section`` lacks any of ``keys`` (the section
  is not the config ``what`` names, e.g. another recipe's)."""
  missing = [k for k in keys if _lookup(section, k) is _MISSING]
  if missing:
    raise bad_argument(prefix, f"the config of {what} (with {', '.join(missing[:5])})",
                       f"a section without {', '.join(missing[:5])}", ConfigError)

"""Image transforms as data: what each recipe declares and each report records.

:class:`TrainTransform` and :class:`EvalTransform` say, in torchvision's terms, what the official
code of a paper does to an image (the recipes in ``glajax.train.recipes`` declare theirs, with
the official file); :class:`Normalization` is a model family's mean and std (CLIP's by default:
``CLIP_NORMALIZATION``). ``glajax.data.preprocess`` applies them with TensorFlow; this module
imports none (recipes and configs read it on machines without TensorFlow). The family owns its
normalisation (``ModelSpec.mean`` / ``std``, ``Family.normalization``); CLIP's is the default of
the pipelines' arguments.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import NamedTuple

from glajax.errors import bad_argument
from glajax.models.clip.modeling import MEAN as CLIP_MEAN, STD as CLIP_STD


class Normalization(NamedTuple):
  """Per-channel (x / 255 − mean) / std of a model family (torchvision's ``Normalize``)."""
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


CLIP_NORMALIZATION = Normalization(CLIP_MEAN, CLIP_STD)


def as_normalization(value, key: str = "normalization") -> Normalization:
  """``value`` ((mean, std), each 3 numbers, std > 0) as a :class:`Normalization`."""
  try:
    mean, std = (tuple(float(v) for v in part) for part in value)
  except (TypeError, ValueError):
    raise bad_argument(key, "(mean, std) of 3 numbers each", repr(value)) from None
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not all(map(math.isfinite, mean + std)):
    raise bad_argument(key, "(mean, std) of 3 finite numbers each, std > 0", repr(value))
  return Normalization(mean, std)
INTERPOLATIONS = ("bilinear", "bicubic")  # PIL's BILINEAR and BICUBIC (torchvision's modes)
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range (torchvision)


def _pair(key: str, value, high: float | None = None) -> tuple[float, float]:
  """``value`` as a pair (a, b) with 0 < a <= b (<= high), or a clear error."""
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    raise bad_argument(key, "a pair (low, high) of numbers", repr(value)) from None
  if not (0 < a <= b and math.isfinite(b) and (high is None or b <= high)):
    raise bad_argument(key, "a pair with 0 < low <= high"
                       + ("" if high is None else f" <= {high:g}"), repr(value))
  return a, b


def check_interpolation(key: str, value) -> str:
  if value not in INTERPOLATIONS:
    raise bad_argument(key, f"one of {', '.join(INTERPOLATIONS)}", repr(value))
  return value


def _mapping(values):
  """A dict of ``values`` (a mapping or an ``ml_collections.ConfigDict``), else ``values``."""
  return values.to_dict() if hasattr(values, "to_dict") else values


def _fields(cls, values, key: str, optional=()) -> dict:
  """``values`` (a mapping) checked to hold the fields of ``cls`` (``optional`` may be missing)."""
  values = _mapping(values)
  names = {f.name for f in dataclasses.fields(cls)}
  if not isinstance(values, Mapping) or not names - set(optional) <= set(values) <= names:
    raise bad_argument(key or cls.__name__, f"a dict of {', '.join(sorted(names))}",
                       repr(values))
  return dict(values)


def _train_fields(values, key: str) -> dict:
  values = _fields(TrainTransform, values, key, optional=("ratio",))
  prefix = f"{key}." if key else ""
  if not isinstance(values["flip"], bool):
    raise bad_argument(f"{prefix}flip", "True or False", repr(values["flip"]))
  return dict(scale=_pair(f"{prefix}scale", values["scale"], 1.0),
              interpolation=check_interpolation(f"{prefix}interpolation", values["interpolation"]),
              flip=values["flip"], ratio=_pair(f"{prefix}ratio", values.get("ratio", RATIO)))


def _eval_fields(values, key: str) -> dict:
  values = _fields(EvalTransform, values, key)
  prefix = f"{key}." if key else ""
  for name in ("resize", "crop"):
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise bad_argument(f"{prefix}{name}", "a positive int (pixels)", repr(value))
  if values["resize"] < values["crop"]:
    raise bad_argument(f"{prefix}resize", f"at least crop ({values['crop']})",
                       repr(values["resize"]))
  return dict(resize=int(values["resize"]), crop=int(values["crop"]),
              interpolation=check_interpolation(f"{prefix}interpolation", values["interpolation"]))


class _Checked:
  """A frozen dataclass whose fields ``_checked(values, key)`` validates and normalises, on
  construction and in :meth:`from_dict` (whose errors name ``key.<field>``)."""

  def __post_init__(self):
    for name, value in self._checked(dataclasses.asdict(self), "").items():
      object.__setattr__(self, name, value)

  @classmethod
  def from_dict(cls, values: Mapping, key: str = "transform"):
    """From a config's dict (e.g. ``train.transform.train``); errors name ``key.<field>``."""
    return cls(**cls._checked(values, key))


@dataclasses.dataclass(frozen=True)
class TrainTransform(_Checked):
  """torchvision's ``RandomResizedCrop(S, scale, ratio, interpolation)``, then
  ``RandomHorizontalFlip()`` when ``flip``; S is the run's image size."""
  scale: tuple[float, float]
  interpolation: str
  flip: bool
  ratio: tuple[float, float] = RATIO
  _checked = staticmethod(_train_fields)

  def describe(self, size: int) -> str:
    """torchvision's spelling, e.g. ``RandomResizedCrop(224, scale=(0.9, 1), ratio=(0.75,
    1.333), bicubic), no flip``."""
    return (f"RandomResizedCrop({size}, scale=({self.scale[0]:g}, {self.scale[1]:g}), "
            f"ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), {self.interpolation})"
            + (" + RandomHorizontalFlip" if self.flip else ", no flip"))


@dataclasses.dataclass(frozen=True)
class EvalTransform(_Checked):
  """torchvision's ``Resize(resize, interpolation)`` (short side) + ``CenterCrop(crop)`` as the
  official code states them at crop = 224; at another image size S: Resize(⌊S·resize/crop⌋) +
  CenterCrop(S), the same crop fraction (LIFT's ``Resize(resolution * 8 // 7)``: 256/224 = 8/7)."""
  resize: int
  crop: int
  interpolation: str
  _checked = staticmethod(_eval_fields)

  def resize_for(self, size: int) -> int:
    """The short side before the center crop at image size ``size``: ⌊size·resize/crop⌋."""
    return size * self.resize // self.crop

  def describe(self, size: int) -> str:
    return (f"Resize({self.resize_for(size)}, {self.interpolation}) + CenterCrop({size})")


# CLIP's own preprocessing (openai/CLIP ``clip/clip.py`` ``_transform``; wise-ft ``clip/clip.py``
# ``_transform(n_px, is_train)`` adds its training branch): the pipelines' defaults.
CLIP_TRAIN = TrainTransform(scale=(0.9, 1.0), interpolation="bicubic", flip=False)
CLIP_EVAL = EvalTransform(resize=224, crop=224, interpolation="bicubic")


def record(train: TrainTransform | None, evaluation: EvalTransform, size: int,
                     normalization: Normalization) -> dict:
  """What a report records of the transforms a run used: each as a dict and in words."""
  record = {"image_size": int(size), "eval": dataclasses.asdict(evaluation),
            "eval_text": evaluation.describe(size),
            "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)}}
  if train is not None:
    record.update(train=dataclasses.asdict(train), train_text=train.describe(size))
  return record


def of_config(train_config, key: str = "train.transform") -> tuple[TrainTransform, EvalTransform]:
  """(train, eval) transforms of a recipe config's ``transform`` (``{"train": {...}, "eval":
  {...}}``, as ``glajax.train.recipes`` declares them); errors name ``key``."""
  value = _mapping(train_config.get("transform") if hasattr(train_config, "get") else None)
  if not isinstance(value, Mapping) or set(value) != {"train", "eval"}:
    raise bad_argument(key, "a dict of a train and an eval transform (the recipe's)", repr(value))
  return (TrainTransform.from_dict(value["train"], f"{key}.train"),
          EvalTransform.from_dict(value["eval"], f"{key}.eval"))

"""Data roles: which split, and which rows of it, every array of an experiment comes from.

A :class:`DataRef` names a dataset, an explicit split and a chain of row selections (:class:`Step`).
An experiment kind declares, before any work, the refs of each role (:func:`plan`): what it fits
on (fine-tuning data, validation data for temperatures and γ, prior-estimation data) and what it
tests on. :func:`check_plan` refuses, with a ConfigError, any fitted ref that may share a row with
a test ref; the runner checks each array it hands out against the same plan and records it in a
ledger, so a report says where every number came from.

Two refs on the same split are disjoint only when it is so by construction: their chains agree up
to a *partition* step (same kind and parameters) at which they take different parts, e.g. the
k-shot training and validation draws of one split, or the two sides of a per-class hold-out.
Anything else on the same split counts as overlapping. Two splits of one dataset are disjoint
when their TFDS expressions are: different base splits, or slices of one base that do not
overlap ('train[:90%]' and 'train[90%:]'); a slice that cannot be read counts as overlapping.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from glajax.data import subsample
from glajax.errors import ConfigError, bad_argument

FIT, TEST = "fit", "test"


@dataclasses.dataclass(frozen=True)
class Step:
  """One row selection applied to the rows selected so far (all of them at first).

  kinds: ``shots`` (per class, ``sizes`` = (k_0, k_1, ...) disjoint draws, part i of them),
  ``holdout`` (per class, a ``fraction`` held out: part 1 held out, part 0 kept),
  ``classes`` (the rows of the seen (part 0) or absent (part 1) classes of
  ``subsample.class_subset(C, num_seen, seed)``), ``long_tail`` (``subsample.long_tail_indices``).
  """
  kind: str
  params: tuple
  part: int = 0

  PARTITIONS = ("shots", "holdout", "classes")

  def describe(self) -> str:
    params = ", ".join(map(str, self.params))
    part = f" part {self.part}" if self.kind in self.PARTITIONS else ""
    return f"{self.kind}({params}){part}"


def shots(sizes: Sequence[int], seed: int, part: int = 0) -> Step:
  """Part ``part`` (0 or 1) of disjoint per-class draws of ``sizes[0]`` and ``sizes[1]``
  examples (``subsample.k_shot_indices``): e.g. the k training and k validation shots."""
  sizes = tuple(int(k) for k in sizes)
  if not 1 <= len(sizes) <= 2 or part >= len(sizes):
    raise bad_argument("sizes, part", "one or two draw sizes and a part among them",
                       (sizes, part), ConfigError)
  return Step("shots", (sizes, int(seed)), part)


def holdout(fraction: float, seed: int, part: int) -> Step:
  """Part 0: what a per-class hold-out of ``fraction`` keeps; part 1: what it holds out."""
  return Step("holdout", (float(fraction), int(seed)), part)


def classes(num_seen: int, seed: int, part: int = 0, within: tuple = ()) -> Step:
  """The rows of the seen (part 0) or absent (part 1) classes of a seeded class subset; with
  ``within`` = (num_seen, seed) of another subset, a subset of that one's seen classes (PCV's
  pseudo-seen and pseudo-absent halves of S)."""
  return Step("classes", (int(num_seen), int(seed), tuple(within)), part)


def long_tail(imbalance_ratio: float, seed: int) -> Step:
  return Step("long_tail", (float(imbalance_ratio), int(seed)))


@dataclasses.dataclass(frozen=True)
class DataRef:
  """``dataset@split`` and the row selections applied to it, in order."""
  dataset: str
  split: str
  steps: tuple[Step, ...] = ()

  @classmethod
  def parse(cls, spec: str, key: str) -> "DataRef":
    """'imagenet2012@train' -> DataRef; a spec without an explicit split is refused."""
    name, _, split = str(spec).partition("@")
    if not name or not split:
      raise bad_argument(key, "'dataset@split' with an explicit split (e.g. 'dtd@train')",
                         repr(spec), ConfigError)
    return cls(name, split)

  @property
  def spec(self) -> str:
    return f"{self.dataset}@{self.split}"

  def then(self, *steps: Step) -> "DataRef":
    return dataclasses.replace(self, steps=self.steps + steps)

  def describe(self) -> str:
    return " → ".join([self.spec, *(s.describe() for s in self.steps)])


_SLICE = re.compile(r"^(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


def _intervals(split: str):
  """TFDS split syntax -> [(base, start, stop, unit)], or None when it cannot be read (then
  nothing is assumed). 'train[:80%]+validation' -> [('train', 0, 80, '%'), ('validation', ...)]."""
  out = []
  for part in split.replace(" ", "").split("+"):
    match = _SLICE.match(part)
    if match is None:
      return None
    base, start, unit_a, stop, unit_b = (g or "" for g in match.groups())
    if start.startswith("-") or stop.startswith("-") or (start and stop and unit_a != unit_b):
      return None
    unit = unit_a or unit_b
    out.append((base, float(start or 0), float(stop) if stop else float("inf"), unit))
  return out


def _splits_disjoint(a: str, b: str) -> bool:
  """Whether two TFDS split expressions of one dataset select no common example: different
  base splits, or non-overlapping slices in the same unit of the same base."""
  ia, ib = _intervals(a), _intervals(b)
  if ia is None or ib is None:
    return False
  for base_a, start_a, stop_a, unit_a in ia:
    for base_b, start_b, stop_b, unit_b in ib:
      if base_a == base_b and (unit_a != unit_b or (start_a < stop_b and start_b < stop_a)):
        return False
  return True


def disjoint(a: DataRef, b: DataRef) -> bool:
  """Whether ``a`` and ``b`` share no row by construction (see the module docstring)."""
  if a.dataset != b.dataset:
    return True
  if a.split != b.split:
    return _splits_disjoint(a.split, b.split)
  for step_a, step_b in zip(a.steps, b.steps):
    if step_a == step_b:
      continue
    same_partition = (step_a.kind == step_b.kind and step_a.params == step_b.params
                      and step_a.kind in Step.PARTITIONS)
    return same_partition and step_a.part != step_b.part
  return False


@dataclasses.dataclass(frozen=True)
class Use:
  """One array an experiment uses: its role (``fit`` or ``test``), what for, the config key that
  chose it and its ref."""
  role: str
  purpose: str
  key: str
  ref: DataRef


def check_plan(uses: Sequence[Use]) -> None:
  """Raises a ConfigError naming the config key when a fitted array may share a row with a test
  array: priors, temperatures, γ, heads and fine-tuning see training-side data only."""
  tests = [u for u in uses if u.role == TEST]
  for use in uses:
    if use.role not in (FIT, TEST):
      raise bad_argument("role", f"{FIT!r} or {TEST!r}", repr(use.role), ConfigError)
    if use.role != FIT:
      continue
    for test in tests:
      if not disjoint(use.ref, test.ref):
        raise bad_argument(
            use.key, f"training-side data for the {use.purpose}, disjoint from every test set",
            f"{use.ref.describe()}, which may share rows with the test set {test.ref.describe()} "
            f"({test.key})", ConfigError)


def select(step: Step, labels: np.ndarray, num_classes: int, order=None) -> np.ndarray:
  """Positions into ``labels`` (the rows selected so far) that ``step`` keeps, sorted.
  ``order``: the rows' ranks in the dataset's own order, for draws made by position (long
  tail)."""
  if step.kind == "shots":
    sizes, seed = step.params
    return subsample.k_shot_indices(labels, sizes[0], seed, sum(sizes[1:]))[step.part]
  if step.kind == "holdout":
    fraction, seed = step.params
    return subsample.holdout_indices(labels, fraction, seed)[step.part]
  if step.kind == "classes":
    return subsample.indices_in_classes(labels, class_mask(step, num_classes))
  if step.kind == "long_tail":
    ratio, seed = step.params
    return subsample.long_tail_indices(labels, ratio, seed, order)
  raise bad_argument("step.kind", "shots, holdout, classes or long_tail", repr(step.kind))


def class_mask(step: Step, num_classes: int) -> np.ndarray:
  """(C,) bool: the classes a ``classes`` step keeps."""
  num_seen, seed, within = step.params
  parent = np.ones(num_classes, bool)
  if within:
    parent = subsample.class_subset(num_classes, *within)[0]
  ids = np.flatnonzero(parent)
  mask = np.zeros(num_classes, bool)
  mask[ids[subsample.class_subset(len(ids), num_seen, seed)[step.part]]] = True
  return mask


def rows(ref: DataRef, labels: np.ndarray, num_classes: int, order=None) -> np.ndarray:
  """The row indices of the split that ``ref`` selects (all rows without steps), sorted.
  ``order`` (N,): each row's position in the dataset's own files (``pipeline.read_order``)."""
  indices = np.arange(len(labels))
  for step in ref.steps:
    ranks = None if order is None else np.argsort(np.argsort(order[indices]))
    indices = indices[select(step, labels[indices], num_classes, ranks)]
  return indices


def ledger_entry(use: Use, indices: np.ndarray, labels: np.ndarray) -> dict:
  """What a report says of one array: role, purpose, config key, provenance and size."""
  return {"role": use.role, "purpose": use.purpose, "key": use.key,
          "data": use.ref.describe(), "rows": int(len(indices)),
          "classes": int(len(np.unique(labels[indices]))) if len(indices) else 0}


def by_purpose(uses: Sequence[Use]) -> Mapping[str, Use]:
  return {u.purpose: u for u in uses}

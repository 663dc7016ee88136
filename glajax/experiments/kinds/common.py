"""What several experiment kinds share: test uses and their columns, accuracy rows, and the
zero-shot and fine-tuned classifiers built lazily (cached logits may make them unnecessary)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from glajax import methods as M
from glajax.experiments import roles
from glajax.train import recipes

ID = "ID"


@dataclasses.dataclass
class Outcome:
  """What a kind's ``run`` returns: ``results`` (JSON-able numbers for report.json), ``tables``
  (``report.table`` dicts), ``plots`` (file name -> a ``report`` plot dataclass) and, when a
  kind resolved its recipe at run time (GLA per shot count), ``train_as_run``."""
  results: dict
  tables: list
  plots: dict = dataclasses.field(default_factory=dict)
  train_as_run: dict | None = None


def train_ref(config) -> roles.DataRef:
  return roles.DataRef.parse(config.data.train, "data.train")


def test_uses(config) -> list[roles.Use]:
  """The test sets: ``data.test`` (purpose ``test``), then each of ``data.shifts``."""
  uses = [roles.Use(roles.TEST, "test", "data.test",
                    roles.DataRef.parse(config.data.test, "data.test"))]
  for i, spec in enumerate(config.data.get("shifts", ())):
    key = f"data.shifts[{i}]"
    uses.append(roles.Use(roles.TEST, f"shift {spec}", key, roles.DataRef.parse(spec, key)))
  return uses


def column(use: roles.Use, id_use: roles.Use) -> str:
  """A test set's column: ``ID``, else its dataset name, or its split when it shares the ID
  dataset."""
  if use == id_use:
    return ID
  return use.ref.split if use.ref.dataset == id_use.ref.dataset else use.ref.dataset


def accuracy(logits, labels) -> float:
  return float(M.accuracy(logits, labels))


def accuracy_row(outputs: dict, tests: list[roles.Use]) -> dict:
  """{column: accuracy} over the test sets (``outputs``: purpose -> (logits, labels)), plus
  ``avg shifts`` when there are shifts."""
  row = {column(u, tests[0]): accuracy(*outputs[u.purpose]) for u in tests}
  return with_average(row, [column(u, tests[0]) for u in tests[1:]])


def with_average(row: dict, shift_columns: list[str]) -> dict:
  if shift_columns:
    row["avg shifts"] = float(np.mean([row[c] for c in shift_columns]))
  return row


def columns(tests: list[roles.Use]) -> list[str]:
  shifts = [column(u, tests[0]) for u in tests[1:]]
  return [ID, *shifts] + (["avg shifts"] if shifts else [])


class Lazy:
  """Builds each named model once, on first use (cached logits may make it unnecessary)."""

  def __init__(self, **factories):
    self._factories, self._built = factories, {}

  def __getattr__(self, name):
    if name.startswith("_"):
      raise AttributeError(name)
    if name not in self._built:
      self._built[name] = self._factories[name]()
    return self._built[name]


def zeroshot_tag(exp, checkpoint: str, classes_ref: roles.DataRef, templates=None) -> str:
  """The cache tag of a zero-shot classifier: its checkpoint and its classes' prompts."""
  names, default = exp.classes(classes_ref)
  exp.note_prompts(f"zero-shot head ({classes_ref.dataset})", templates or default)
  return f"zeroshot-{exp.key(checkpoint, names, list(templates or default))}"


def zeroshot(exp, checkpoint: str, classes_ref: roles.DataRef, train=None, templates=None):
  """The zero-shot classifier of ``checkpoint`` for the classes of ``classes_ref`` (``templates``:
  default, the dataset's)."""
  return exp.zeroshot_classifier(exp.load_model(checkpoint, train), checkpoint, classes_ref,
                                 templates)


def finetuned(exp, zs, run: str, use: roles.Use, train, export: str | None = None):
  """The zero-shot classifier ``zs`` fine-tuned end to end (the recipe ``train``, WiSE-FT's
  ``finetune`` by default) on ``use``."""
  task = recipes.classifier_task(zs.backbone, zs.head, train)
  return exp.fit(run, task, train, use, export=export)


def classifier_models(exp, checkpoint: str, use: roles.Use, train, export: str | None = None,
                      templates=None):
  """(models, tags): the lazily built zero-shot classifier ``zs`` (``templates``: default, the
  dataset's) and its fine-tuned version ``ft`` on ``use``, with their cache tags."""
  ref = train_ref(exp.config)
  run = exp.run_key("finetuned", train, checkpoint, use)
  models = Lazy(zs=lambda: zeroshot(exp, checkpoint, ref, train, templates),
                ft=lambda: finetuned(exp, models.zs, run, use, train, export))
  return models, {"zs": zeroshot_tag(exp, checkpoint, ref, templates), "ft": run}


# ------------------------------------------------------------------------------ uncertainty

EFFECT_COLUMNS = ("Δ ID", "Δ avg shifts", "Δ ECE ID", "Δ ECE avg shifts")


@dataclasses.dataclass(frozen=True)
class MeanOver:
  """A bootstrap statistic (hashable, so ``M.bootstrap`` compiles it once per shape): the mean
  over groups (test sets) of each one's accuracy or ECE; ``paired``: of after − before, both
  measured on the group's same resampled rows."""
  metric: str
  bins: int = 15
  paired: bool = False

  def _value(self, rows):
    return M.accuracy_of(rows) if self.metric == "accuracy" else M.ece_of(rows, self.bins)

  def __call__(self, *groups):
    if self.paired:
      values = [self._value(g["after"]) - self._value(g["before"]) for g in groups]
    else:
      values = [self._value(g) for g in groups]
    return sum(values) / len(values)


def intervals_json(rows) -> dict:
  """{label: {column: {"estimate", "low", "high"}}} of (label, {column: Interval}) rows."""
  return {label: {c: v._asdict() if isinstance(v, M.Interval) else v for c, v in row.items()}
          for label, row in rows}


class Evidence:
  """Every cell of a table with its 95 % bootstrap interval over the test rows, and the
  differences between two rows with paired intervals (``methods.uncertainty``); resamples drawn
  from one key per experiment seed, so a rerun gives the same intervals."""

  def __init__(self, exp, bins: int = 15, num_samples: int = M.uncertainty.DEFAULT_SAMPLES):
    self.key = jax.random.PRNGKey(int(exp.config.seed))
    self.bins, self.num_samples = int(bins), int(num_samples)

  def interval(self, statistic, *groups) -> M.Interval:
    return M.bootstrap(self.key, statistic, *groups, num_samples=self.num_samples)

  @staticmethod
  def columns(tests: list[roles.Use], seen=None) -> list[str]:
    accuracy = columns(tests)
    extra = ["Acc_{S/Y}", "Acc_{U/Y}"] if seen is not None and not np.all(seen) else []
    return accuracy + [f"ECE {c}" for c in accuracy] + extra

  def row(self, outputs: dict, tests: list[roles.Use], seen=None) -> dict:
    """{column: Interval} of accuracy and ECE on every test set and their mean over the shifts
    (a stratified bootstrap), and Acc_{S/Y} / Acc_{U/Y} when some classes are absent."""
    rows = {u.purpose: M.row_summaries(*outputs[u.purpose]) for u in tests}
    shifts = [rows[u.purpose] for u in tests[1:]]
    out = {}
    for metric, prefix in (("accuracy", ""), ("ece", "ECE ")):
      statistic = MeanOver(metric, self.bins)
      for use in tests:
        out[prefix + column(use, tests[0])] = self.interval(statistic, rows[use.purpose])
      if shifts:
        out[prefix + "avg shifts"] = self.interval(statistic, *shifts)
    if seen is not None and not np.all(seen):
      logits, labels = outputs[tests[0].purpose]
      for name, classes in (("Acc_{S/Y}", seen), ("Acc_{U/Y}", ~seen)):
        kept = np.isin(labels, np.flatnonzero(classes))
        out[name] = self.interval(MeanOver("accuracy"), M.row_summaries(logits[kept],
                                                                         labels[kept]))
    return out

  def effects(self, before: dict, after: dict, tests: list[roles.Use]) -> dict:
    """{Δ column: Interval} of after − before on the ID test set and the mean over the shifts,
    accuracy and ECE, each a paired bootstrap on the same rows."""
    pairs = {u.purpose: {"before": M.row_summaries(*before[u.purpose]),
                         "after": M.row_summaries(*after[u.purpose])} for u in tests}
    id_pair, shift_pairs = pairs[tests[0].purpose], [pairs[u.purpose] for u in tests[1:]]
    out = {}
    for metric, prefix in (("accuracy", "Δ "), ("ece", "Δ ECE ")):
      statistic = MeanOver(metric, self.bins, paired=True)
      out[prefix + "ID"] = self.interval(statistic, id_pair)
      if shift_pairs:
        out[prefix + "avg shifts"] = self.interval(statistic, *shift_pairs)
    return out

"""What several experiment kinds share: test uses and their columns, accuracy rows, and the
source and fine-tuned classifiers built lazily (cached logits may make them unnecessary).

The source classifier of a checkpoint, for a dataset's classes: the zero-shot head of a model
with a text tower (CLIP), or a supervised classifier's own head restricted to those classes
(:func:`own_head`: an ImageNet-1k head on ImageNet and its subsets)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from glajax import evaluate, methods as M
from glajax.data import registry as data_registry
from glajax.data import world
from glajax.errors import ConfigError, bad_argument
from glajax.experiments import config as config_lib
from glajax.experiments import report, roles
from glajax.models import heads, registry
from glajax.train import recipes

IMAGENET_OUTPUTS = 1000

ID = "ID"


@dataclasses.dataclass
class Outcome:
  """What a kind's ``run`` returns: ``results`` (JSON-able numbers for report.json), ``tables``
  (``report.table`` dicts), ``plots`` (file name -> a ``report`` plot dataclass) and, when a
  kind resolved its recipe at run time (GLA per shot count), ``train_as_run``; ``accuracies``:
  label -> ``M.Interval`` of the source and fine-tuned models' ID test accuracy, which the
  report checks against chance (``experiments.diagnostics``)."""
  results: dict
  tables: list
  plots: dict = dataclasses.field(default_factory=dict)
  train_as_run: dict | None = None
  accuracies: dict = dataclasses.field(default_factory=dict)


def check_num_seen(key: str, num_seen: int, ref: roles.DataRef) -> None:
  """``num_seen`` seen classes of ``ref``'s dataset leave at least one absent: 1 ≤ num_seen < C
  (refused naming ``key`` before any work)."""
  total = data_registry.get(ref.dataset).num_classes
  if not 1 <= int(num_seen) < total:
    raise bad_argument(key, f"from 1 to {total - 1} (seen classes of the {total} of "
                       f"{ref.dataset}, leaving at least one absent)", repr(num_seen),
                       ConfigError)


def known_class_counts(ref: roles.DataRef) -> np.ndarray | None:
  """(C,) examples of each class in ``ref``'s split where that is known without reading the
  data (a folder or CSV, the demo world's splits); else None."""
  if data_registry.is_local(ref.dataset):
    info = data_registry.get(ref.dataset)
    if ref.split in info.source.splits:
      return data_registry.local_class_counts(ref.dataset, ref.split)
    return None
  generated = config_lib.generated_world(ref.dataset)
  spec = world.spec(generated) if generated else None
  if spec is None or ref.split not in world.split_names(spec):
    return None
  return np.bincount(world.split_plan(spec, ref.split)[0], minlength=world.NUM_CLASSES)


def check_shots(key: str, needed: int, ref: roles.DataRef, what: str) -> None:
  """Every class of ``ref``'s split holds ``needed`` examples (``what`` says which draws), where
  the counts are known before any work (:func:`known_class_counts`); refused naming ``key``."""
  counts = known_class_counts(ref)
  if counts is None:
    return
  few = np.flatnonzero(counts < needed)
  if few.size:
    names = data_registry.get(ref.dataset).classnames
    listed = ", ".join(f"{names[c]} ({counts[c]})" for c in few[:10])
    raise bad_argument(key, f"at most what every class of {ref.spec} holds ({what}: {needed} "
                       "per class)", f"{few.size} classes with fewer: {listed}", ConfigError)


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


def own_head(backbone, info: data_registry.DatasetInfo) -> heads.LinearHead:
  """A supervised classifier's own head (``backbone.classifier()``, on raw features) for the
  classes of the dataset ``info``, in its label order.

  An ImageNet-1k head (1000 outputs) on a dataset of ImageNet classes (``imagenet_classes``:
  ImageNet-R, ImageNet-A) keeps their rows, as the runner restricts ImageNet-1k logits there
  (Mai et al. keep all 1000 outputs, in training and in evaluation: ``py/HT_HARDCODED.py``
  ``IMAGENET_N_CLASSES``, ``py/util/evaluate.py``); a head with exactly the dataset's number of
  classes is taken as its classifier, in the dataset's label order (ImageNet-1k itself and
  ImageNet-Sketch, V2, LT; a tiny model on the demo world). Any other dataset needs a new head:
  a ConfigError says so.
  """
  kernel, bias = backbone.classifier()
  outputs, groups = kernel.shape[1], info.imagenet_classes
  if groups is not None and outputs == IMAGENET_OUTPUTS:
    if any(len(group) != 1 for group in groups):
      raise bad_argument("model.checkpoints", f"a model with a text tower for {info.name}, whose "
                         "classes each join several ImageNet classes (not a linear head)",
                         "a supervised ImageNet classifier", ConfigError)
    rows = np.asarray([group[0] for group in groups])
  elif outputs == info.num_classes:
    rows = np.arange(outputs)
  else:
    raise bad_argument(
        "model.checkpoints", f"a classifier whose own head covers the {info.num_classes} "
        f"classes of {info.name} (an ImageNet-1k head for ImageNet and its subsets), or a model "
        "with a text tower (a zero-shot head)", f"a head of {outputs} classes: {info.name} "
        "needs a new head (Mai et al.'s Office-Home source model is a ResNet-50 fine-tuned on "
        "the source domain)", ConfigError)
  return heads.LinearHead(kernel[:, rows], bias[rows], normalize=False)


def has_text(exp, checkpoint: str) -> bool:
  """Whether ``checkpoint``'s family has a text tower (read off its checkpoint, not loaded)."""
  return registry.locate(exp.checkpoint_dir(checkpoint))[0].tokenizer is not None


def source_tag(exp, checkpoint: str, classes_ref: roles.DataRef, templates=None) -> str:
  """The cache tag of the source classifier (:func:`source`) of ``checkpoint``."""
  if has_text(exp, checkpoint):
    return zeroshot_tag(exp, checkpoint, classes_ref, templates)
  return f"own_head-{exp.key(checkpoint, classes_ref.dataset)}"


def source(exp, checkpoint: str, classes_ref: roles.DataRef, train=None, templates=None):
  """The source classifier of ``checkpoint`` for the classes of ``classes_ref``: its zero-shot
  head (a model with a text tower; ``templates``: default, the dataset's), else its own head on
  those classes (:func:`own_head`)."""
  backbone = exp.load_model(checkpoint, train)
  if registry.spec_of(backbone).has_text:
    return exp.zeroshot_classifier(backbone, checkpoint, classes_ref, templates)
  return heads.ImageClassifier(backbone, own_head(backbone, data_registry.get(
      classes_ref.dataset)))


def finetuned(exp, zs, run: str, use: roles.Use, train, export: str | None = None):
  """The source classifier ``zs`` fine-tuned end to end (the recipe ``train``, WiSE-FT's
  ``finetune`` by default) on ``use``."""
  task = recipes.classifier_task(zs.backbone, zs.head, train)
  return exp.fit(run, task, train, use, export=export)


def classifier_models(exp, checkpoint: str, use: roles.Use, train, export: str | None = None,
                      templates=None):
  """(models, tags): the lazily built source classifier ``zs`` (:func:`source`: zero-shot with
  ``templates``, default the dataset's, or a supervised classifier's own head) and its
  fine-tuned version ``ft`` on ``use``, with their cache tags."""
  ref = train_ref(exp.config)
  run = exp.run_key("finetuned", train, checkpoint, use)
  models = Lazy(zs=lambda: source(exp, checkpoint, ref, train, templates),
                ft=lambda: finetuned(exp, models.zs, run, use, train, export))
  return models, {"zs": source_tag(exp, checkpoint, ref, templates), "ft": run}


def wise_ft_model(zs, ft, alpha: float):
  """θ_α = (1 − α)·θ_zs + α·θ_ft (``M.wise_ft``) of two models of one structure, over their
  parameters and BatchNorm statistics: wise-ft ``src/wise_ft.py`` ``_merge`` interpolates every
  entry of the ``state_dict``, running statistics included."""
  graphdef, weights_zs, rest = evaluate.split_model(zs, with_batch_stats=True)
  weights_ft = evaluate.split_model(ft, with_batch_stats=True)[1]
  return nnx.merge(graphdef, jax.jit(M.wise_ft)(weights_zs, weights_ft, alpha), rest)


# ------------------------------------------------------------------------------ uncertainty

EFFECT_COLUMNS = ("Δ ID", "Δ avg shifts", "Δ ECE ID", "Δ ECE avg shifts")


def effect_columns(tests: list[roles.Use]) -> tuple[str, ...]:
  """:data:`EFFECT_COLUMNS` with each shift's own accuracy change after ``Δ ID`` (the columns of
  ``Evidence.effects(..., per_shift=True)``)."""
  shifts = tuple(f"Δ {column(u, tests[0])}" for u in tests[1:])
  return EFFECT_COLUMNS[:1] + shifts + EFFECT_COLUMNS[1:]


@dataclasses.dataclass(frozen=True)
class MeanOver:
  """A bootstrap statistic (hashable, so ``M.bootstrap`` compiles it once per shape): the mean
  over groups (test sets) of each one's ``metric`` — "accuracy", "ece", "class_mean" (the mean
  per-class accuracy over ``classes``) or "subset" (the accuracy over rows labelled in
  ``classes``); ``paired``: of after − before, both measured on the group's same resampled
  rows."""
  metric: str
  bins: int = 15
  paired: bool = False
  classes: tuple = ()

  def _value(self, rows, weights=None):
    if self.metric == "accuracy":
      return M.accuracy_of(rows, weights)
    if self.metric == "ece":
      return M.ece_of(rows, self.bins, weights)
    fn = M.class_mean_accuracy_of if self.metric == "class_mean" else M.subset_accuracy_of
    return fn(rows, np.asarray(self.classes, bool), weights)

  def __call__(self, *groups):
    return self.weighted((None,) * len(groups), *groups)

  def weighted(self, counts, *groups):
    """The statistic of every resample at once: ``counts`` per group, (B, N_g) row counts
    (None: the rows as they are)."""
    if self.paired and self.metric != "ece":   # linear in correct_i: one pass over the
      # differences, so equal predictions give exactly 0
      values = [self._value({**g["after"], "correct": g["after"]["correct"]
                             - g["before"]["correct"]}, w) for w, g in zip(counts, groups)]
    elif self.paired:
      values = [self._value(g["after"], w) - self._value(g["before"], w)
                for w, g in zip(counts, groups)]
    else:
      values = [self._value(g, w) for w, g in zip(counts, groups)]
    return sum(values) / len(values)


def estimates(row: dict) -> dict:
  """{column: float} of a row whose values may be intervals (their estimates)."""
  return {c: float(v.estimate) if isinstance(v, M.Interval) else v for c, v in row.items()}


def intervals_json(rows) -> dict:
  """{label: {column: {"estimate", "low", "high"}}} of (label, {column: Interval}) rows."""
  return {label: {c: v._asdict() if isinstance(v, M.Interval) else v for c, v in row.items()}
          for label, row in rows}


class Evidence:
  """Every cell of a table with its 95 % bootstrap interval over the test rows, and the
  differences between two rows with paired intervals (``methods.uncertainty``); resamples drawn
  from one key per experiment seed, so a rerun gives the same intervals."""

  def __init__(self, exp, bins: int = 15, num_samples: int = M.uncertainty.DEFAULT_SAMPLES, *,
               seed: int | None = None):
    """``exp``: the experiment whose seed keys the resamples (None: ``seed``)."""
    self.key = jax.random.PRNGKey(int(exp.config.seed if exp is not None else seed))
    self.bins, self.num_samples = int(bins), int(num_samples)

  def interval(self, statistic, *groups) -> M.Interval:
    return M.bootstrap(self.key, statistic, *groups, num_samples=self.num_samples)

  def of(self, logits, labels, metric: str = "accuracy", classes=None) -> M.Interval:
    """The ``metric`` (see :class:`MeanOver`) of one test set's logits with its interval."""
    mask = () if classes is None else tuple(bool(c) for c in np.asarray(classes))
    return self.interval(MeanOver(metric, self.bins, classes=mask),
                         M.row_summaries(logits, labels))

  def cells(self, outputs: dict, tests: list[roles.Use], metric: str = "accuracy",
            prefix: str = "") -> dict:
    """{prefix + column: Interval} of ``metric`` on every test set and its mean over the shifts
    (each shift resampled on its own)."""
    rows = {u.purpose: M.row_summaries(*outputs[u.purpose]) for u in tests}
    statistic = MeanOver(metric, self.bins)
    out = {prefix + column(u, tests[0]): self.interval(statistic, rows[u.purpose]) for u in tests}
    if len(tests) > 1:
      out[prefix + "avg shifts"] = self.interval(statistic, *[rows[u.purpose] for u in tests[1:]])
    return out

  @staticmethod
  def columns(tests: list[roles.Use], seen=None) -> list[str]:
    accuracy = columns(tests)
    extra = ["Acc_{S/Y}", "Acc_{U/Y}"] if seen is not None and not np.all(seen) else []
    return accuracy + [f"ECE {c}" for c in accuracy] + extra

  def row(self, outputs: dict, tests: list[roles.Use], seen=None) -> dict:
    """{column: Interval} of accuracy and ECE on every test set and their mean over the shifts
    (a stratified bootstrap), and Acc_{S/Y} / Acc_{U/Y} when some classes are absent."""
    out = {**self.cells(outputs, tests), **self.cells(outputs, tests, "ece", "ECE ")}
    if seen is not None and not np.all(seen):
      logits, labels = outputs[tests[0].purpose]
      out["Acc_{S/Y}"] = self.of(logits, labels, "subset", seen)
      out["Acc_{U/Y}"] = self.of(logits, labels, "subset", ~np.asarray(seen))
    return out

  def paired(self, before, after, labels, metric: str = "accuracy", classes=None
             ) -> M.Interval:
    """after − before of ``metric`` (see :class:`MeanOver`) on one test set, both sets of
    logits of the same rows ``labels``: a paired bootstrap (each resample draws the same rows
    for both)."""
    mask = () if classes is None else tuple(bool(c) for c in np.asarray(classes))
    return self.interval(MeanOver(metric, self.bins, paired=True, classes=mask),
                         {"before": M.row_summaries(before, labels),
                          "after": M.row_summaries(after, labels)})

  def effects(self, before: dict, after: dict, tests: list[roles.Use],
              per_shift: bool = False) -> dict:
    """{Δ column: Interval} of after − before on the ID test set and the mean over the shifts,
    accuracy and ECE, each a paired bootstrap on the same rows; ``per_shift``: also each
    shift's accuracy change (columns :func:`effect_columns`)."""
    shifts = [column(u, tests[0]) for u in tests[1:]] if per_shift else ()
    return self.effects_on(before, after, [u.purpose for u in tests], shifts)

  def effects_on(self, before: dict, after: dict, purposes, shifts=()) -> dict:
    """:meth:`effects` of outputs keyed by ``purposes``, the ID test set's first; ``shifts``:
    the other purposes' column names, each adding its own accuracy change ``Δ <name>``."""
    pairs = [{"before": M.row_summaries(*before[p]), "after": M.row_summaries(*after[p])}
             for p in purposes]
    out = {}
    for metric, prefix in (("accuracy", "Δ "), ("ece", "Δ ECE ")):
      statistic = MeanOver(metric, self.bins, paired=True)
      out[prefix + "ID"] = self.interval(statistic, pairs[0])
      if len(pairs) > 1:
        out[prefix + "avg shifts"] = self.interval(statistic, *pairs[1:])
      if metric == "accuracy":
        for name, pair in zip(shifts, pairs[1:]):
          out[prefix + name] = self.interval(statistic, pair)
    return out


def effects_outcome(title: str, columns, effects) -> tuple[dict, dict]:
  """(table, results) of paired differences ``effects``: (label "after vs before",
  {Δ column: Interval}) pairs; an interval that excludes 0 is an effect that appears."""
  return report.table(title, columns, effects, effects=True), intervals_json(effects)

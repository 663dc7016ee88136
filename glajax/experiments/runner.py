"""The one experiment runner: a config, its declared data roles, caches and fine-tuning runs.

An :class:`Experiment` owns a work directory laid out as::

  experiment.json             the config, its fingerprint and the command (written first)
  .lock                       held while a run is going on (pid and command)
  report.json, report.md, *.png
  final/<name>/               each final model (its family's export, e.g. a CLIP ViT in
                              transformers format with tokenizer and preprocessor_config.json,
                              a CLIP ResNet in open_clip's; classifiers: + head.npz)

and a cache directory (the work directory unless several experiments share one, as the demo's
parts do)::

  models/tiny_<seed>/         random tiny CLIPs (``save_clip``) for CPU runs
  logits/<tag>__<rows>.npz    cached logits (``evaluate.save_logits``), reused on resume
  runs/<name>-<key>/          each fine-tuning run (engine checkpoints, metrics.jsonl)
  tfds/                       generated datasets (the demo world)

Caches are keyed by content (:meth:`Experiment.key`: checkpoint, recipe, data and seed), so two
experiments that would compute the same thing share it and a changed input never reuses a stale
result. Every array reaches a kind through :meth:`Experiment.arrays` or :meth:`Experiment.fit`,
which accept only the data uses the kind declared (its ``plan``), refuse a fitted use that may
share rows with a test set, and record each use in the ledger the report prints.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

import glajax
from glajax import evaluate, io, parallel
from glajax.data import pipeline, registry, transforms
from glajax.errors import ConfigError, TrainingError, bad_argument
from glajax.experiments import config as config_lib
from glajax.experiments import roles
from glajax.models import heads, registry as models
from glajax.models.family import ExportInfo
from glajax.train import engine, recipes

LOGITS_DIR, RUNS_DIR, FINAL_DIR = "logits", "runs", "final"
_STARTED = time.time()  # cached files older than this process come from an earlier run
EXPERIMENT_FILE, LOCK_FILE = "experiment.json", ".lock"


def claim_workdir(config, workdir: str, fingerprint: str) -> str:
  """Creates ``workdir`` (or checks it is this experiment's ``fingerprint``) and writes
  ``experiment.json``.

  A work directory that holds another experiment (another fingerprint), or checkpoints of an
  unknown one, raises a ConfigError before anything is written.
  """
  workdir = check_workdir(workdir)
  print_ = fingerprint
  record = os.path.join(workdir, EXPERIMENT_FILE)
  if os.path.isfile(record):
    try:
      with open(record) as f:
        previous = json.load(f)
      if not isinstance(previous, dict):
        raise ValueError(f"a JSON {type(previous).__name__}")
    except (OSError, ValueError) as e:
      raise bad_argument("--workdir", f"a new directory, or one whose {EXPERIMENT_FILE} glajax "
                         "wrote", f"{record} unreadable ({e}); choose another --workdir",
                         ConfigError) from None
    if previous.get("fingerprint") != print_:
      raise bad_argument("--workdir", f"a new directory or one of this experiment "
                         f"(fingerprint {print_})", f"{workdir} holding experiment "
                         f"{previous.get('config_spec')!r} (fingerprint "
                         f"{previous.get('fingerprint')}); choose another --workdir", ConfigError)
  elif os.path.isdir(workdir) and os.listdir(workdir):
    held = sorted(os.listdir(workdir))
    what = ("checkpoints of an unknown experiment" if RUNS_DIR in held or "checkpoints" in held
            else f"files of its own ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})")
    raise bad_argument("--workdir", "a new or empty directory, or one of this experiment",
                       f"{workdir} holding {what} (no {EXPERIMENT_FILE}); choose another "
                       "--workdir", ConfigError)
  if parallel.is_primary():
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise bad_argument("--workdir", "a directory that can be created",
                         f"{workdir} ({e.strerror})", ConfigError) from e
    io.write_json(record, {"fingerprint": print_, "config_spec": config.get("config_spec"),
                           "config": json.loads(config.to_json_best_effort())})
  parallel.barrier("glajax claim_workdir")
  return workdir


def check_workdir(workdir) -> str:
  """The absolute work directory, refused (a ConfigError naming ``--workdir``) when empty, a
  file, or holding the wildcards ``*?[`` (TFDS reads its data with glob patterns)."""
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir).strip():
    raise bad_argument("--workdir", "a directory path", repr(workdir), ConfigError)
  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  if any(c in workdir for c in "*?["):
    raise bad_argument("--workdir", "a path without the wildcards * ? [", repr(workdir),
                       ConfigError)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise bad_argument("--workdir", "a directory", f"the file {workdir}", ConfigError)
  return workdir


class WorkdirLock:
  """An exclusive lock on a work directory (``.lock``, created with O_EXCL): a second run in the
  same directory is refused with the holder's pid and command. A lock left by a dead process is
  taken over. Process 0 alone locks."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._held = False

  def __enter__(self):
    if not parallel.is_primary():
      return self
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is not None and _alive(holder.get("pid")):
          raise bad_argument("--workdir", "a work directory no other run is using",
                             f"{os.path.dirname(self.path)} in use by pid {holder.get('pid')} "
                             f"({holder.get('command')})", ConfigError) from None
        os.remove(self.path)  # left behind by a run that died
        continue
      with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "command": " ".join(sys.argv)}, f)
      self._held = True
      return self
    raise bad_argument("--workdir", "a lockable work directory", self.path, ConfigError)

  def _holder(self):
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def __exit__(self, *exc):
    if self._held:
      os.remove(self.path)
      self._held = False


def _alive(pid) -> bool:
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def tiny_checkpoint(directory: str, image_size: int = 32, seed: int = 0,
                    variant: str = models.TINY) -> str:
  """Writes a random tiny model (``models.tiny_model(variant)``; ``"tiny"``: a CLIP ViT) in its
  family's format to ``directory`` unless one is there; returns ``directory``. For CPU runs and
  notebooks without a checkpoint."""
  if not os.path.isdir(directory) or not os.listdir(directory):
    models.save_model(models.tiny_model(variant, image_size, seed), directory)
  return directory


def _safe(text: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


class Experiment:
  """One config in one work directory, with the data uses its kind declared (see the module
  docstring)."""

  def __init__(self, config, workdir: str, uses: Sequence[roles.Use], cache_dir: str | None = None,
               kind=None):
    self.config, self.workdir = config, workdir
    sections = config_lib.train_sections(config, kind)
    # the recipe section that evaluation and defaults follow: the kind's first (``train``)
    self.train = config_lib.section(config, sections[0]) if sections else None
    self.cache_dir = cache_dir or workdir
    self.uses = tuple(uses)
    roles.check_plan(self.uses)
    self.ledger: list[dict] = []
    self.logits_files: list[dict] = []  # every cached array a kind read: tag, purpose, file
    self.mesh = parallel.make_mesh()
    generated = any(config_lib.generated_world(config_lib.dataset_spec(s)[0])
                    or registry.is_local(config_lib.dataset_spec(s)[0])  # prepared per workdir
                    for s in config_lib.datasets_of(config))
    self.data_dir = config.data.data_dir or (
        os.path.join(self.cache_dir, "tfds") if generated else None)
    self._tokenizers: dict = {}
    self._normalization = None
    self._labels: dict = {}
    self._orders: dict = {}
    self._fresh: set[str] = set()  # logits files already said to be reused
    self.timings: dict[str, float] = {}  # stage -> seconds spent on it by this invocation
    self.prompts: dict[str, list[str]] = {}  # what -> its templates (:meth:`note_prompts`)
    self.runs: dict[str, None] = {}  # fine-tuning runs named (metrics.jsonl: diagnostics)
    self.started = time.perf_counter()

  def path(self, *parts) -> str:
    return os.path.join(self.workdir, *parts)

  def cache(self, *parts) -> str:
    return os.path.join(self.cache_dir, *parts)

  def manual_dir(self, name: str):
    directory = config_lib.manual_dir_of(self.config, name)
    return None if directory is None else os.path.expanduser(directory)

  def key(self, *parts) -> str:
    """12 hex digits identifying ``parts`` (JSON-able: configs as dicts, refs as descriptions),
    plus the settings every cached result depends on (seed, image size, the evaluation
    transform and the normalisation)."""
    content = json.dumps([self.config.seed, self.config.data.image_size,
                          self.eval_transform().describe(self.config.data.image_size),
                          self.normalization(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()[:12]

  # ------------------------------------------------------------------------- preprocessing

  def normalization(self, model=None) -> transforms.Normalization:
    """The image normalisation of a model's pipelines, its family's (``spec.mean`` / ``std``);
    without ``model``, that of the family of ``model.checkpoints[0]``, known before any model is
    loaded (what the cache keys record)."""
    if model is not None:
      spec = models.spec_of(model)
      return transforms.Normalization(tuple(spec.mean), tuple(spec.std))
    if self._normalization is None:
      family = models.family_of_checkpoint(self.config.model.checkpoints[0])
      self._normalization = transforms.Normalization(*map(tuple, family.normalization))
    return self._normalization

  def train_transform(self, train=None) -> transforms.TrainTransform:
    """The training transform of ``train`` (default ``config.train``): the recipe's."""
    return transforms.of_config(train or self.train)[0]

  def eval_transform(self) -> transforms.EvalTransform:
    """The evaluation transform of every logits this experiment computes: its recipe's."""
    return transforms.of_config(self.train)[1]

  def preprocessing(self) -> dict:
    """What the report records of the transforms (``transforms.record``) and prompts used."""
    return {**transforms.record(self.train_transform(), self.eval_transform(),
                                int(self.config.data.image_size), self.normalization()),
            "prompts": dict(self.prompts)}

  def note_prompts(self, what: str, templates) -> None:
    """Records the prompt templates ``what`` (e.g. a zero-shot head) is built from."""
    self.prompts[what] = list(templates)

  def use(self, purpose: str) -> roles.Use:
    """The declared use for ``purpose`` (a KeyError-free lookup with a clear error)."""
    for use in self.uses:
      if use.purpose == purpose:
        return use
    raise bad_argument("purpose", f"one of the declared uses ({[u.purpose for u in self.uses]})",
                       repr(purpose), ConfigError)

  def tests(self) -> list[roles.Use]:
    return [u for u in self.uses if u.role == roles.TEST]

  # ----------------------------------------------------------------------------- models

  def checkpoint_dir(self, checkpoint: str) -> str:
    """A loadable checkpoint: the hub id or directory as is; ``tiny[-variant][:SEED]`` written
    once."""
    if not config_lib.is_tiny(checkpoint):
      return checkpoint
    variant, _, seed = checkpoint.partition(":")
    return tiny_checkpoint(self.cache("models", f"{variant}_{int(seed or 0)}"),
                           self.config.data.image_size, int(seed or 0), variant)

  def load_model(self, checkpoint: str, train=None):
    """The model of ``checkpoint`` (any family) with the recipe's ``train.model`` settings
    (dtype, remat, unroll, adapters), by ``recipes.load_model``."""
    return recipes.load_model(train or self.train, self.checkpoint_dir(checkpoint))

  def tokenizer(self, checkpoint: str):
    if checkpoint not in self._tokenizers:
      self._tokenizers[checkpoint] = glajax.load_tokenizer(self.checkpoint_dir(checkpoint))
    return self._tokenizers[checkpoint]

  def classes(self, ref: roles.DataRef) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, templates) of a dataset."""
    return (pipeline.class_names(ref.dataset, self.data_dir, self.manual_dir(ref.dataset)),
            registry.get(ref.dataset).templates)

  def zeroshot_classifier(self, backbone, checkpoint: str, ref: roles.DataRef, templates=None):
    """The model + ``LinearHead.from_zeroshot(zeroshot_head(...), logit_bias)`` for the classes
    of ``ref`` (the model's own zero-shot logits, SigLIP's bias included)."""
    classnames, default_templates = self.classes(ref)
    head = glajax.zeroshot_head(backbone, self.tokenizer(checkpoint), classnames,
                                templates or default_templates, show_progress=self.config.progress,
                                desc=f"{self.config.experiment}: zero-shot head ({ref.dataset})")
    return heads.ImageClassifier(backbone, heads.LinearHead.from_zeroshot(
        np.asarray(head), backbone.logit_bias))

  # ------------------------------------------------------------------------------- data

  def split_labels(self, ref: roles.DataRef) -> np.ndarray:
    """(N,) labels of the whole split of ``ref``, read once."""
    split = (ref.dataset, ref.split)
    if split not in self._labels:
      self._labels[split] = pipeline.read_labels(ref.dataset, ref.split, self.data_dir,
                                                 self.manual_dir(ref.dataset))
    return self._labels[split]

  def split_order(self, ref: roles.DataRef):
    """The rows' positions in the dataset's own files (``pipeline.read_order``) when a step
    draws by position (the long tail) and the dataset records them, else None."""
    if not any(step.kind == "long_tail" for step in ref.steps):
      return None
    split = (ref.dataset, ref.split)
    if split not in self._orders:
      self._orders[split] = pipeline.read_order(ref.dataset, ref.split, self.data_dir,
                                                self.manual_dir(ref.dataset))
    return self._orders[split]

  def num_classes(self, ref: roles.DataRef) -> int:
    return registry.get(ref.dataset).num_classes

  def rows(self, use: roles.Use) -> np.ndarray:
    """The split positions ``use`` selects, after the guard; recorded in the ledger."""
    if use not in self.uses:
      raise bad_argument("use", "a data use declared by the experiment's plan", repr(use),
                         ConfigError)
    roles.check_plan([use, *self.tests()])
    labels = self.split_labels(use.ref)
    indices = roles.rows(use.ref, labels, self.num_classes(use.ref), self.split_order(use.ref))
    entry = roles.ledger_entry(use, indices, labels)
    if entry not in self.ledger:
      self.ledger.append(entry)
    return indices

  def labels(self, use: roles.Use) -> np.ndarray:
    return self.split_labels(use.ref)[self.rows(use)]

  def arrays(self, use: roles.Use, tag: str, make_model: Callable, logits_fn=None):
    """(logits, labels) of the model ``make_model()`` on the rows of ``use`` (built only when
    they are not cached yet). See :meth:`logits`."""
    return self.logits(tag, make_model, [use], logits_fn)[use.purpose]

  def logits(self, tag: str, make_model: Callable, uses: Sequence[roles.Use],
             logits_fn=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """purpose -> (logits (N, C), labels (N,)) of the model ``make_model()`` on each use's rows.

    The missing ones are evaluated in one pass (one compilation); ImageNet-1k logits on
    ImageNet-R/A/ObjectNet go through ``evaluate.imagenet_logits_transform``. Cached as
    ``logits/<tag>__<rows>.npz``, keyed by ``tag`` and each use's data (``tag`` must identify
    the model: build it with :meth:`key`). ``logits_fn(model, batch)`` replaces the classifier's
    ``evaluate.image_logits`` (e.g. ``recipes.image_features`` caches features).
    """
    files = {u.purpose: self._logits_file(tag, u.ref) for u in uses}
    indices = {u.purpose: self.rows(u) for u in uses}
    missing = [u for u in uses if not os.path.isfile(files[u.purpose])]
    self._say_reused(tag, [u for u in uses if u not in missing], files)
    if missing:
      model = make_model()  # may fine-tune (timed as such) or build a zero-shot head
      clock = time.perf_counter()
      evaluated = self._evaluate(model, missing, indices, logits_fn, tag)
      self._spent(f"logits: {_label(tag)}", clock)
      if parallel.is_primary():
        os.makedirs(self.cache(LOGITS_DIR), exist_ok=True)
        for use, (logits, labels) in evaluated.items():
          _check_finite_logits(logits, tag, use)
          evaluate.save_logits(files[use.purpose], logits, labels,
                               {"tag": tag, "data": use.ref.describe()})
      parallel.barrier(f"glajax logits {tag}")
    out = {}
    for use in uses:
      logits, labels, _ = evaluate.load_logits(files[use.purpose])
      out[use.purpose] = (logits, labels)
      entry = {"tag": tag, "purpose": use.purpose, "data": use.ref.describe(),
               "file": os.path.relpath(files[use.purpose], self.workdir)}
      if entry not in self.logits_files:
        self.logits_files.append(entry)
    return out

  def _spent(self, stage: str, since: float) -> None:
    self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - since

  def _say_reused(self, tag: str, cached: Sequence[roles.Use], files: dict) -> None:
    """One line when logits cached by an earlier run are reused (each file said once)."""
    new = [u for u in cached if files[u.purpose] not in self._fresh
           and os.path.getmtime(files[u.purpose]) < _STARTED]
    self._fresh.update(files.values())
    if new and parallel.is_primary():
      print(f"{self.config.experiment}: reusing cached logits of {_label(tag)} on "
            f"{_data_label(new)}", flush=True)

  def _logits_file(self, tag: str, ref: roles.DataRef) -> str:
    rows = ref.spec if not ref.steps else f"{ref.spec}-{self.key(ref.describe())}"
    return self.cache(LOGITS_DIR, f"{_safe(tag)}__{_safe(rows)}.npz")

  def _evaluate(self, model, uses, indices, logits_fn=None, model_tag: str = "logits") -> dict:
    batches = (b for use in uses for b in pipeline.eval_batches(
        use.ref.dataset, split=use.ref.split, batch_size=self.config.data.eval_batch_size,
        image_size=self.config.data.image_size, transform=self.eval_transform(),
        normalization=self.normalization(model), mesh=self.mesh, data_dir=self.data_dir,
        manual_dir=self.manual_dir(use.ref.dataset),
        indices=indices[use.purpose] if use.ref.steps else None))
    logits, labels = evaluate.evaluate_logits(
        model, logits_fn or evaluate.image_logits, batches, self.mesh,
        desc=(f"{self.config.experiment}: {_label(model_tag)} on {_data_label(uses)}"
              if self.config.progress else None),
        total=sum(len(indices[u.purpose]) for u in uses))
    sizes = np.cumsum([len(indices[u.purpose]) for u in uses])[:-1]
    out = {}
    for use, z, y in zip(uses, np.split(logits, sizes), np.split(labels, sizes)):
      transform = None if logits_fn is not None else evaluate.imagenet_logits_transform(
          registry.get(use.ref.dataset).imagenet_classes)
      out[use] = (np.asarray(transform(z)) if transform is not None and z.shape[1] == 1000
                  else z, y)
    return out

  # ----------------------------------------------------------------------------- training

  def train_config(self, train=None):
    """A copy of ``train`` (default ``config.train``) with the run's seed and progress."""
    train = (train or self.train).copy_and_resolve_references()
    train.seed = self.config.seed
    train.progress = self.config.progress
    return train

  def run_key(self, name: str, train, checkpoint: str, use: roles.Use, *extra) -> str:
    """``<name>-<key>``: a fine-tuning run identified by its recipe, checkpoint and data."""
    settings = json.loads(train.to_json_best_effort())
    for key in ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard",
                "wandb"):
      settings.pop(key, None)
    run = f"{name}-{self.key(settings, checkpoint, use.ref.describe(), *extra)}"
    self.runs.setdefault(run)
    return run

  def fit(self, run: str, task, train, use: roles.Use, export: str | None = None,
          select=None):
    """Fine-tunes ``task`` on the rows of ``use`` (batches of its split augmented by the
    recipe's training transform) in ``runs/<run>`` (resuming from its checkpoints); exports the
    trained model to ``final/<export>`` when named; returns the evaluated model
    (``task.eval_model`` applied). ``select``: an ``engine.BestSelection`` (the best epoch's
    model instead of the last)."""
    indices = self.rows(use)

    transform, normalization = self.train_transform(train), self.normalization(task.model)

    def data(start_step):
      return pipeline.train_batches(use.ref.dataset, split=use.ref.split,
                                    batch_size=train.batch_size, seed=self.config.seed,
                                    image_size=self.config.data.image_size, transform=transform,
                                    normalization=normalization,
                                    indices=indices if use.ref.steps else None,
                                    start_step=start_step, mesh=self.mesh,
                                    data_dir=self.data_dir,
                                    manual_dir=self.manual_dir(use.ref.dataset))

    return self._fit(run, task, train, data, len(indices), export, use.ref, select)

  def fit_arrays(self, run: str, task, train, arrays: dict, export: str | None = None):
    """``fit`` on in-memory arrays (e.g. cached features {"features", "label"} of a use)."""

    def data(start_step):
      return pipeline.array_batches(arrays, batch_size=train.batch_size, seed=self.config.seed,
                                    start_step=start_step, mesh=self.mesh)

    return self._fit(run, task, train, data, len(arrays["label"]), export)

  def _fit(self, run: str, task, train, data, count: int, export: str | None,
           classes_ref: roles.DataRef | None = None, select=None):
    self.runs.setdefault(run)
    steps = train.total_steps
    recipes.set_total_steps(train, count)  # steps per epoch (per-epoch schedules) and epochs
    if steps > 0:  # an explicit step count wins over the recipe's epochs
      train.total_steps = steps
    clock = time.perf_counter()
    model, _ = engine.fit(task.model, task.loss_fn, train, data, self.cache(RUNS_DIR, run),
                          mesh=self.mesh, teacher_update=task.teacher_update, select=select,
                          name=f"{self.config.experiment}: {_label(run)}")
    self._spent(f"fine-tuning: {_label(run)}", clock)
    if export is not None and task.export is not None:
      self.export(export, lambda directory: task.export(
          model, directory, None if classes_ref is None else self.export_info(classes_ref)))
    return task.eval_model(model) if task.eval_model is not None else model

  def export_info(self, ref: roles.DataRef) -> ExportInfo:
    """What an export of a model for the classes of ``ref`` writes beside its weights (class
    names, the tokenizer of ``model.checkpoints[0]`` if its family has text, the image size):
    transformers' processor and, for classifiers, ``id2label``."""
    checkpoint = self.config.model.checkpoints[0]
    family, _ = models.locate(self.checkpoint_dir(checkpoint))
    return ExportInfo(self.classes(ref)[0],
                      None if family.tokenizer is None else self.tokenizer(checkpoint),
                      int(self.config.data.image_size))

  def export(self, name: str, write: Callable[[str], None]) -> str:
    """``write(final/<name>)`` by process 0 unless that export exists; returns the directory."""
    directory = self.path(FINAL_DIR, name)
    if parallel.is_primary() and not os.path.isdir(directory):
      write(directory)
    parallel.barrier(f"glajax export {name}")
    return directory


def _label(tag: str) -> str:
  """A cache tag or run name without its content key: ``finetuned-3f2a…`` -> ``finetuned``."""
  head, _, key = tag.rpartition("-")
  return head if head and len(key) == 12 and all(c in "0123456789abcdef" for c in key) else tag


def _data_label(uses: Sequence[roles.Use]) -> str:
  """``dataset@split`` of each use, the dataset named once: ``world@test_photo,test_sketch``."""
  datasets = {u.ref.dataset for u in uses}
  if len(datasets) == 1:
    return f"{uses[0].ref.dataset}@{','.join(u.ref.split for u in uses)}"
  return ", ".join(f"{u.ref.dataset}@{u.ref.split}" for u in uses)


def _check_finite_logits(logits, tag: str, use: roles.Use) -> None:
  if not np.isfinite(logits).all():
    raise bad_argument(f"logits of {tag}", "finite values",
                       f"{int((~np.isfinite(logits)).sum())} non-finite values on "
                       f"{use.ref.describe()}; nothing was cached", TrainingError)

"""What every experiment is made of: models, zero-shot heads, cached logits and fine-tuning runs.

An :class:`Experiment` owns a work directory laid out as::

  experiment.json         the config, its fingerprint and the command (written first)
  models/tiny_<seed>/     random tiny CLIPs (``save_clip``) for CPU runs
  logits/<tag>__<set>.npz cached logits (logits, labels, metadata), reused on resume
  runs/<name>/            each fine-tuning run (engine checkpoints, metrics.jsonl)
  final/<name>/           each final model (transformers format, + head.npz for classifiers)
  report.json, report.md, *.png

Every heavy pass (evaluation, fine-tuning) is skipped when its result is already on disk, and
fine-tuning resumes from the run's last checkpoint, so re-running a command resumes it.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable

import numpy as np

from glajax.errors import ConfigError, bad_argument
from glajax.experiments import config as config_lib

LOGITS_DIR, RUNS_DIR, FINAL_DIR = "logits", "runs", "final"
EXPERIMENT_FILE = "experiment.json"


def claim_workdir(config, workdir: str) -> str:
  """Creates ``workdir`` (or checks it is this experiment's) and writes ``experiment.json``.

  A work directory that holds another experiment (another fingerprint), or checkpoints of an
  unknown one, raises a ConfigError before anything is written.
  """
  from glajax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise bad_argument("--workdir", "a directory", f"the file {workdir}", ConfigError)
  print_ = config_lib.fingerprint(config)
  record = os.path.join(workdir, EXPERIMENT_FILE)
  if os.path.isfile(record):
    with open(record) as f:
      previous = json.load(f)
    if previous.get("fingerprint") != print_:
      raise bad_argument("--workdir", f"a new directory or one of this experiment "
                         f"(fingerprint {print_})", f"{workdir} holding experiment "
                         f"{previous.get('config_spec')!r} (fingerprint "
                         f"{previous.get('fingerprint')}); choose another --workdir", ConfigError)
  elif os.path.isdir(os.path.join(workdir, RUNS_DIR)) or os.path.isdir(
      os.path.join(workdir, "checkpoints")):
    raise bad_argument("--workdir", "a new directory or one of this experiment",
                       f"{workdir} holding checkpoints of an unknown experiment (no "
                       f"{EXPERIMENT_FILE}); choose another --workdir", ConfigError)
  if mesh_lib.is_primary():
    os.makedirs(workdir, exist_ok=True)
    tmp = f"{record}.tmp"
    with open(tmp, "w") as f:
      json.dump({"fingerprint": print_, "config_spec": config.get("config_spec"),
                 "config": json.loads(config.to_json_best_effort())}, f, indent=2)
    os.replace(tmp, record)
  mesh_lib.barrier("glajax claim_workdir")
  return workdir


def tiny_checkpoint(directory: str, image_size: int = 32, seed: int = 0) -> str:
  """Writes a random tiny CLIP (``CLIPConfig.tiny``) in transformers format to ``directory``
  unless one is there; returns ``directory``. For CPU runs and notebooks without a checkpoint."""
  if not os.path.isfile(os.path.join(directory, "config.json")):
    import glajax  # pylint: disable=import-outside-toplevel
    from glajax.models.clip import init_clip  # pylint: disable=import-outside-toplevel
    glajax.save_clip(init_clip(glajax.CLIPConfig.tiny(image_size=image_size), seed=seed), directory)
  return directory


class Experiment:
  """One run of one config in one work directory (see the module docstring)."""

  def __init__(self, config, workdir: str):
    from glajax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    self.config, self.workdir = config, workdir
    self.mesh = mesh_lib.make_mesh()
    worlds = {config_lib.generated_world(config_lib.dataset_spec(s)[0])
              for s in config_lib.datasets_of(config)} - {None}
    self.data_dir = config.data.data_dir or (os.path.join(workdir, "tfds") if worlds else None)
    self._tokenizers: dict = {}
    if worlds:  # the demo's procedural world, rendered from its seed into data_dir once
      from glajax.demo import world  # pylint: disable=import-outside-toplevel
      for world_config in sorted(worlds):
        world.builder(world_config, self.data_dir).download_and_prepare()

  def path(self, *parts) -> str:
    return os.path.join(self.workdir, *parts)

  def manual_dir(self, name: str):
    directory = config_lib.manual_dir_of(self.config, name)
    return None if directory is None else os.path.expanduser(directory)

  # ----------------------------------------------------------------------------- models

  def checkpoint_dir(self, checkpoint: str) -> str:
    """A loadable checkpoint: the hub id or directory as is; ``tiny[:SEED]`` written once."""
    if not config_lib.is_tiny(checkpoint):
      return checkpoint
    seed = int(checkpoint.partition(":")[2] or 0)
    return tiny_checkpoint(self.path("models", f"tiny_{seed}"), self.config.data.image_size, seed)

  def load_clip(self, checkpoint: str):
    """The CLIP of ``checkpoint`` with the recipe's ``train.model`` settings (dtype, remat,
    adapters), by ``recipes.load_model``."""
    from glajax.train import recipes  # pylint: disable=import-outside-toplevel
    return recipes.load_model(self.config.train, self.checkpoint_dir(checkpoint))

  def tokenizer(self, checkpoint: str):
    if checkpoint not in self._tokenizers:
      import glajax  # pylint: disable=import-outside-toplevel
      self._tokenizers[checkpoint] = glajax.load_tokenizer(
          None if config_lib.is_tiny(checkpoint) else checkpoint)
    return self._tokenizers[checkpoint]

  def classes(self, spec: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, templates) of a dataset spec."""
    from glajax.data import pipeline, registry  # pylint: disable=import-outside-toplevel
    name, _ = config_lib.dataset_spec(spec)
    return (pipeline.class_names(name, self.data_dir, self.manual_dir(name)),
            registry.get(name).templates)

  def zeroshot_classifier(self, clip, checkpoint: str, spec: str):
    """CLIP + ``LinearHead.from_zeroshot(zeroshot_head(...))`` for the classes of ``spec``."""
    import glajax  # pylint: disable=import-outside-toplevel
    from glajax.models import heads  # pylint: disable=import-outside-toplevel
    classnames, templates = self.classes(spec)
    head = glajax.zeroshot_head(clip, self.tokenizer(checkpoint), classnames, templates,
                                show_progress=self.config.progress)
    return heads.CLIPClassifier(clip, heads.LinearHead.from_zeroshot(np.asarray(head)))

  # ----------------------------------------------------------------------------- logits

  def _logits_file(self, tag: str, spec: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)
    return self.path(LOGITS_DIR, f"{tag}__{safe}.npz")

  def logits(self, tag: str, make_model: Callable, specs, logits_fn=None) -> dict[str, tuple]:
    """spec -> (logits (N, C), labels (N,)) of the model ``make_model()`` (an image classifier,
    built only if some logits are not cached yet) on each dataset spec.

    The missing specs are evaluated in one pass (one compilation); ImageNet-1k logits on
    ImageNet-R/A/ObjectNet go through ``registry.eval_logits_transform``. Cached as
    ``logits/<tag>__<spec>.npz`` by ``engine.save_logits``. ``logits_fn(model, batch)``
    replaces the classifier's ``engine.image_logits`` (e.g. ``recipes.image_features`` caches
    features; no class transform then).
    """
    from glajax.train import engine, mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    specs = list(dict.fromkeys(specs))
    missing = [s for s in specs if not os.path.isfile(self._logits_file(tag, s))]
    if missing:
      metadata = {"tag": tag, "fingerprint": config_lib.fingerprint(self.config)}
      evaluated = self._evaluate(make_model(), missing, logits_fn)  # every process takes part
      if mesh_lib.is_primary():
        os.makedirs(self.path(LOGITS_DIR), exist_ok=True)
        for spec, (logits, labels) in evaluated.items():
          engine.save_logits(self._logits_file(tag, spec), logits, labels,
                             {**metadata, "dataset": spec})
      mesh_lib.barrier(f"glajax logits {tag}")
    out = {}
    for spec in specs:
      with np.load(self._logits_file(tag, spec)) as cached:
        out[spec] = (cached["logits"], cached["labels"])
    return out

  def _evaluate(self, model, specs: list[str], logits_fn=None) -> dict[str, tuple]:
    from glajax.data import pipeline, registry  # pylint: disable=import-outside-toplevel
    from glajax.train import engine  # pylint: disable=import-outside-toplevel
    parsed = [config_lib.dataset_spec(s) for s in specs]
    batches = itertools.chain.from_iterable(
        pipeline.eval_batches(name, split=split, batch_size=self.config.data.eval_batch_size,
                              image_size=self.config.data.image_size, mesh=self.mesh,
                              data_dir=self.data_dir, manual_dir=self.manual_dir(name))
        for name, split in parsed)
    logits, labels = engine.evaluate_logits(model, logits_fn or engine.image_logits, batches,
                                            self.mesh)
    sizes = [self._split_size(name, split) for name, split in parsed]
    out = {}
    for spec, (name, _), z, y in zip(specs, parsed, np.split(logits, np.cumsum(sizes)[:-1]),
                                     np.split(labels, np.cumsum(sizes)[:-1])):
      transform = registry.eval_logits_transform(name) if logits_fn is None else None
      out[spec] = (np.asarray(transform(z)) if transform is not None and z.shape[1] == 1000
                   else z, y)
    return out

  def _split_size(self, name: str, split: str | None) -> int:
    from glajax.data import pipeline, registry  # pylint: disable=import-outside-toplevel
    info = registry.get(name)
    builder = pipeline.tfds_builder(info, self.data_dir, self.manual_dir(name))
    return builder.info.splits[split or info.eval_split].num_examples

  def labels(self, spec: str) -> np.ndarray:
    from glajax.data import pipeline  # pylint: disable=import-outside-toplevel
    name, split = config_lib.dataset_spec(spec)
    return pipeline.read_labels(name, split, self.data_dir, self.manual_dir(name))

  # ----------------------------------------------------------------------------- training

  def train_config(self):
    """A copy of ``config.train`` with the run's seed and progress."""
    train = self.config.train.copy_and_resolve_references()
    train.seed = self.config.seed
    train.progress = self.config.progress
    return train

  def fit(self, name: str, task, train, spec: str, indices=None):
    """Fine-tunes ``task`` on dataset ``spec`` (rows ``indices``) with the engine in
    ``runs/<name>`` (resuming from its checkpoints); exports to ``final/<name>``; returns the
    evaluated model (``task.eval_model`` applied)."""
    from glajax.data import pipeline  # pylint: disable=import-outside-toplevel
    dataset, split = config_lib.dataset_spec(spec)

    def data(start_step):
      return pipeline.train_batches(dataset, split=split, batch_size=train.batch_size,
                                    seed=self.config.seed, image_size=self.config.data.image_size,
                                    indices=indices, start_step=start_step, mesh=self.mesh,
                                    data_dir=self.data_dir, manual_dir=self.manual_dir(dataset))

    return self._fit(name, task, train, data, lambda: len(
        indices if indices is not None else self.labels(spec)))

  def fit_arrays(self, name: str, task, train, arrays: dict):
    """``fit`` on in-memory arrays (e.g. cached features {"features", "label"})."""
    from glajax.data import pipeline  # pylint: disable=import-outside-toplevel

    def data(start_step):
      return pipeline.array_batches(arrays, batch_size=train.batch_size, seed=self.config.seed,
                                    start_step=start_step, mesh=self.mesh)

    return self._fit(name, task, train, data, lambda: len(arrays["label"]))

  def _fit(self, name: str, task, train, data, count):
    """The engine run of ``fit``; ``count()``, the number of training examples, is only read
    when ``train.total_steps`` asks for epochs."""
    from glajax.train import engine, recipes  # pylint: disable=import-outside-toplevel
    if train.total_steps <= 0:
      recipes.set_total_steps(train, count())
    final = self.path(FINAL_DIR, name)
    export = None if task.export is None else (lambda model, _: task.export(model, final))
    model, _ = engine.fit(task.model, task.loss_fn, train, data, self.path(RUNS_DIR, name),
                          mesh=self.mesh, export=export)
    return task.eval_model(model) if task.eval_model is not None else model

"""Your own data (``configs/custom.py``): one fine-tuning run on a folder of class subfolders (or
a CSV of ``path,label``), then both post-hoc methods on it: the WiSE-FT α sweep (Wortsman et al.,
CVPR 2022) and GLA (Zhu et al., NeurIPS 2023) with the prior estimated on the fine-tuning data.

The two are the ``wise_ft`` and ``gla`` kinds' own ``run`` on one plan: they share the zero-shot
classifier, the fine-tuned model (one run, one cache key) and its logits. When the data has no
test split (``data.test`` = ``data.train``), ``own_data.test_fraction`` of every class is held out
(seeded by ``own_data.split_seed``) as the test set; fine-tuning and the prior see the rest only.

The fine-tuning recipe is fitted to the data's size (:func:`choose_recipe`): the epochs are
raised until the run has ``own_data.min_steps`` steps, E = max(E₀, ⌈S_min / ⌈N / B⌉⌉), and the
learning rate is the candidate of ``own_data.learning_rates`` whose fine-tuned model is most
accurate on a per-class validation hold-out of the fine-tuning data
(``own_data.validation_fraction``; ties to the smaller rate); while the largest candidate wins,
the grid is extended one step beyond it, up to ``own_data.extensions`` times. The chosen candidate's run is the
fine-tuned model WiSE-FT and GLA read; a smaller step than the candidates' is what WiSE-FT's
α < 1 already interpolates towards, so only a choice at the largest candidate is a fit at its
bound (``experiments.diagnostics``).
"""
from __future__ import annotations

import math

import numpy as np

from glajax.data import registry
from glajax.errors import ConfigError, bad_argument
from glajax.experiments import report, roles
from glajax.schema import Field
from glajax.experiments.kinds import common, gla, wise_ft
from glajax.train import recipes

NAME = "own_data"
FIELDS = {**wise_ft.FIELDS, **gla.FIELDS, "own_data.test_fraction": Field("positive", 0, 0.99),
          "own_data.split_seed": Field("int", 0),
          "own_data.learning_rates": Field("floats", 0, optional=True),
          "own_data.validation_fraction": Field("positive", 0, 0.99),
          "own_data.min_steps": Field("int", 0), "own_data.extensions": Field("int", 0)}
CHOICE = "learning rate"   # the purpose of the validation hold-out that chooses it


def _pool_and_tests(config):
  """(the fine-tuning ref, the test uses): a per-class hold-out of the one split, or the data's
  own test split."""
  train, tests = common.train_ref(config), common.test_uses(config)
  if config.data.test != config.data.train:
    return train, tests
  options = config.own_data
  part = lambda p: roles.holdout(options.test_fraction, options.split_seed, p)  # noqa
  held_out = roles.Use(roles.TEST, "test", "own_data.test_fraction", train.then(part(1)))
  return train.then(part(0)), [held_out, *tests[1:]]


def _check_holdout(config) -> None:
  """A per-class hold-out of a folder or CSV needs two images of every class (one to train on,
  one to test on): refused before any work, naming the classes with fewer."""
  train = common.train_ref(config)
  if config.data.test != config.data.train or not registry.is_local(train.dataset):
    return
  counts = common.known_class_counts(train)
  if counts is None:
    return
  names = registry.get(train.dataset).classnames
  few = [f"{names[c]} ({counts[c]})" for c in np.flatnonzero(counts < 2)]
  if few:
    raise bad_argument("own_data.test_fraction", f"at least 2 images in every class of "
                       f"data.folder={config.data.get('folder') or train.dataset!r} (one held "
                       f"out to test on, with no test split)", f"fewer in {len(few)} classes: "
                       f"{', '.join(few[:10])}", ConfigError)


def _candidates(config) -> tuple[float, ...]:
  """The learning rates to choose from; () when the recipe's own is used alone."""
  rates = config.own_data.get("learning_rates")
  return () if rates is None else tuple(float(r) for r in rates)


def _check_candidates(config) -> None:
  rates = _candidates(config)
  if not rates:
    return
  if min(rates) <= 0 or len(set(rates)) != len(rates):
    raise bad_argument("own_data.learning_rates", "distinct learning rates > 0 (or None: "
                       "train.optimizer.learning_rate alone)", repr(rates), ConfigError)
  current = float(config.train.optimizer.learning_rate)
  if current not in rates:
    raise bad_argument(
        "train.optimizer.learning_rate", f"one of own_data.learning_rates={rates} (the "
        "candidates chosen among on validation; set own_data.learning_rates=None to train at "
        "train.optimizer.learning_rate alone)", repr(current), ConfigError)


def plan(config) -> list[roles.Use]:
  if config.gla.shots or config.gla.prior_data != gla.TRAINING:
    raise bad_argument("gla.shots, gla.prior_data", f"0 and {gla.TRAINING!r}: own_data "
                       "estimates the prior on its fine-tuning data",
                       (config.gla.shots, config.gla.prior_data), ConfigError)
  _check_holdout(config)
  _check_candidates(config)
  pool, tests = _pool_and_tests(config)
  fit, uses = pool, []
  if len(_candidates(config)) > 1:
    options = config.own_data
    part = lambda p: roles.holdout(options.validation_fraction, options.split_seed, p)  # noqa
    fit = pool.then(part(0))
    uses.append(roles.Use(roles.FIT, CHOICE, "own_data.validation_fraction", pool.then(part(1))))
  uses = [roles.Use(roles.FIT, "fine-tuning", "data.train", fit), *uses,
          roles.Use(roles.FIT, "prior (fine-tuning)", "gla.prior_data", pool)]
  if config.data.get("validation"):
    uses.append(roles.Use(roles.FIT, "temperature", "data.validation",
                          roles.DataRef.parse(config.data.validation, "data.validation")))
  return uses + tests


def epochs_for(train, count: int, min_steps: int) -> int:
  """E = max(E₀, ⌈S_min / S_epoch⌉), S_epoch the recipe's steps per epoch on ``count`` images
  (``recipes.set_total_steps``): a small folder gets the steps a large one has in E₀ epochs."""
  per_epoch = recipes.set_total_steps(train.copy_and_resolve_references(), count)
  return max(int(train.epochs), math.ceil(int(min_steps) / per_epoch.optimizer.steps_per_epoch))


def grid_search(rates, score, extensions: int) -> tuple[list[float], dict, float]:
  """(the rates tried, {rate: score}, the chosen rate): ``score(rate)`` (higher is better, a
  number or anything with an ``estimate``) of each of ``rates`` in increasing order; while the
  largest tried wins, one more grid step r_{k+1} = r_k² / r_{k−1} is tried, at most
  ``extensions`` times. Ties go to the smaller rate."""
  rates = sorted(float(r) for r in rates)
  scores = {r: score(r) for r in rates}
  value = lambda r: float(getattr(scores[r], "estimate", scores[r]))  # noqa

  def best():
    top = max(value(r) for r in rates)
    return min(r for r in rates if value(r) == top)

  for _ in range(int(extensions)):
    if best() != rates[-1]:
      break
    rates.append(float(f"{rates[-1] ** 2 / rates[-2]:.6g}"))
    scores[rates[-1]] = score(rates[-1])
  return rates, scores, best()


def choose_recipe(exp):
  """(the fine-tuning recipe for this data, its report table, its record): epochs from
  :func:`epochs_for` and, with several ``own_data.learning_rates``, the rate whose fine-tuned
  model is most accurate on the validation hold-out (each candidate one cached run; ties to the
  smaller rate; the grid extended past its largest rate while that one wins)."""
  config, use = exp.config, exp.use("fine-tuning")
  count = len(exp.rows(use))
  train = exp.train.copy_and_resolve_references()
  explicit = int(train.get("total_steps", 0)) > 0   # an explicit step count wins (runlocal)
  if not explicit:
    train.epochs = epochs_for(train, count, config.own_data.min_steps)
    # ≥ 20 logged steps, so that the diagnostics can judge the training accuracy's trend
    steps = recipes.set_total_steps(train.copy_and_resolve_references(), count).total_steps
    train.log_every = max(1, min(int(train.log_every), steps // 20))
  record = {"training_images": count, "batch_size": int(train.batch_size),
            "epochs": None if explicit else int(train.epochs),
            "min_steps": int(config.own_data.min_steps),
            "learning_rate": float(train.optimizer.learning_rate)}
  rates = _candidates(config)
  if len(rates) < 2:
    return train, None, record
  evidence, choice = common.Evidence(exp), exp.use(CHOICE)
  checkpoint, runs = config.model.checkpoints[0], {}

  def validate(rate):
    candidate = train.copy_and_resolve_references()
    candidate.optimizer.learning_rate = rate
    models, tags = common.classifier_models(exp, checkpoint, use, exp.train_config(candidate))
    runs[rate] = tags["ft"]
    return evidence.of(*exp.arrays(choice, tags["ft"], lambda: models.ft))

  rates, accuracy, chosen = grid_search(rates, validate, config.own_data.extensions)
  for rate, run in runs.items():   # the diagnostics judge the run that the results come from
    if rate != chosen:
      exp.runs.pop(run, None)
  train.optimizer.learning_rate = chosen
  record.update(learning_rate=chosen, candidates=list(rates),
                validation_accuracy=[float(accuracy[r].estimate) for r in rates],
                validation_rows=int(len(exp.rows(choice))))
  title = (f"Learning rate, chosen on {choice.ref.describe()} ({record['validation_rows']} "
           f"images held out of the fine-tuning data): {train.recipe} for {count} images, batch "
           f"{train.batch_size}, " + (f"{train.epochs} epochs" if not explicit else
                                      f"{train.total_steps} steps"))
  rows = [(f"lr {r:g}" + (" (chosen)" if r == chosen else ""), {"validation": accuracy[r]})
          for r in rates]
  return train, report.table(title, ["validation"], rows, rows_of="validation"), record


def run(exp) -> dict:
  """The recipe for the data (:func:`choose_recipe`), then WiSE-FT and GLA on the same
  fine-tuned model: their results side by side, their tables in order, all their plots."""
  exp.train, choice, record = choose_recipe(exp)
  parts = {"wise_ft": wise_ft.run(exp), "gla": gla.run(exp)}
  return common.Outcome(
      results={"recipe": record, **{name: part.results for name, part in parts.items()}},
      tables=[*([choice] if choice else []),
              *[table for part in parts.values() for table in part.tables]],
      plots={name: plot for part in parts.values() for name, plot in part.plots.items()},
      train_as_run=exp.train.to_dict(),
      accuracies=parts["wise_ft"].accuracies)  # GLA's zero-shot and fine-tuned are the same
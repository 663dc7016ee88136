"""Backdoor adjustment (Chen et al., ICML 2025): per foundation model m, AdaptFormer adapters and
a cosine classifier trained with the logit-adjusted loss (``recipes.backdoor_peft``, after
LIFT); the prediction Σ_m z_m (P(c) = 1/M). With ``backdoor.compare_ce`` the first model is also
trained with plain cross-entropy (τ = 0), the baseline the logit-adjusted loss improves on.
Classes are grouped many / medium / few by their training counts, or with
``backdoor.group_imbalance_ratio`` r by the CIFAR-LT profile of ratio r (the official
``trainer.py`` groups CIFAR100, CIFAR100_IR10 and CIFAR100_IR50 by CIFAR100_IR100's counts)."""
from __future__ import annotations

import numpy as np

import glajax
from glajax import methods as M
from glajax.data import subsample
from glajax.experiments import report, roles
from glajax.schema import Field
from glajax.experiments.kinds import common
from glajax.train import recipes

NAME = "backdoor"
FIELDS = {"backdoor.imbalance_ratio": Field("float", 0),
          "backdoor.group_imbalance_ratio": Field("float", 0),
          "backdoor.template": Field("str"), "backdoor.compare_ce": Field("bool")}


def plan(config) -> list[roles.Use]:
  train = common.train_ref(config)
  if config.backdoor.imbalance_ratio:
    train = train.then(roles.long_tail(config.backdoor.imbalance_ratio, config.seed))
  key = "backdoor.imbalance_ratio" if config.backdoor.imbalance_ratio else "data.train"
  return [roles.Use(roles.FIT, "fine-tuning", key, train), *common.test_uses(config)]


def _trained(exp, checkpoint: str, counts, train, run: str):
  """The adapters + cosine classifier of ``checkpoint`` trained on the fine-tuning data."""
  ref = common.train_ref(exp.config)
  backbone = exp.load_model(checkpoint, train)  # with train.model.adapter_dim adapters
  head = glajax.zeroshot_head(backbone, exp.tokenizer(checkpoint), exp.classes(ref)[0],
                              [exp.config.backdoor.template], show_progress=exp.config.progress)
  task = recipes.backdoor_task(backbone, np.asarray(head), counts, train)
  return exp.fit(run, task, train, exp.use("fine-tuning"))


def _runs(exp):
  """(label, checkpoint, train config) of every model to train."""
  runs = [(f"{checkpoint} (LA loss)", checkpoint, exp.train_config())
          for checkpoint in exp.config.model.checkpoints]
  if exp.config.backdoor.get("compare_ce"):
    ce = exp.train_config()
    ce.tau = 0.0
    runs.append((f"{exp.config.model.checkpoints[0]} (CE loss)", exp.config.model.checkpoints[0],
                 ce))
  return runs


GROUPS = ("all", "many", "medium", "few")


def _effects(labels: list[str]) -> list[tuple[str, str]]:
  """(after, before) pairs the paper claims: the LA loss against plain CE on one backbone, and
  the ensemble against each of its members."""
  pairs = [(la, la.replace("(LA loss)", "(CE loss)")) for la in labels
           if la.replace("(LA loss)", "(CE loss)") in labels and la.endswith("(LA loss)")]
  members = [la for la in labels if la.endswith("(LA loss)")]
  return pairs + ([("backdoor ensemble", la) for la in members] if len(members) > 1 else [])


def group_counts(exp, counts: np.ndarray) -> np.ndarray:
  """The per-class counts that set the many (> 100) / medium / few (< 20) groups."""
  ratio = exp.config.backdoor.get("group_imbalance_ratio", 0)
  if not ratio:
    return counts
  sizes = np.bincount(exp.split_labels(common.train_ref(exp.config)), minlength=len(counts))
  return subsample.long_tail_counts(len(counts), float(sizes.min()), ratio)


def run(exp) -> dict:
  config = exp.config
  tests = exp.tests()
  use = exp.use("fine-tuning")
  num_classes = exp.num_classes(use.ref)
  counts = np.bincount(exp.labels(use), minlength=num_classes)
  exp.note_prompts("cosine classifier initialisation", [config.backdoor.template])
  groups = group_counts(exp, counts)
  rows, results, la_logits, tags, logits_of = [], {}, [], {}, {}
  evidence = common.Evidence(exp)
  masks = M.count_groups(groups)
  grouped = lambda z, y: {k: evidence.of(z, y, "class_mean", m) for k, m in masks.items()}  # noqa
  for label, checkpoint, train in _runs(exp):
    run_name = exp.run_key("backdoor", train, checkpoint, use)
    tags[label] = run_name
    outputs = exp.logits(run_name, lambda c=checkpoint, t=train, r=run_name: _trained(
        exp, c, counts, t, r), tests)
    logits, labels = outputs[tests[0].purpose]
    logits_of[label] = logits
    if train.tau:
      la_logits.append(logits)
    row = grouped(logits, labels)
    rows.append((label, row))
    results[label] = common.estimates(row)
  ensemble = np.asarray(M.backdoor_ensemble(la_logits))
  row = grouped(ensemble, labels)
  rows.append(("backdoor ensemble", row))
  results["backdoor ensemble"] = common.estimates(row)
  logits_of["backdoor ensemble"] = ensemble
  effects_table, effects = common.effects_outcome(
      "Backdoor adjustment: paired differences of per-class accuracy (95 % intervals on the "
      "same test rows)", [f"Δ {g}" for g in GROUPS], [
          (f"{after} vs {before}", {f"Δ {g}": evidence.paired(
              logits_of[before], logits_of[after], labels, "class_mean", m)
              for g, m in masks.items()}) for after, before in _effects(list(logits_of))])
  title = (f"Backdoor adjustment on {use.ref.dataset} ({config.train.recipe}, τ = "
           f"{config.train.tau:g}, adapter dim {config.train.model.adapter_dim}): per-class "
           "accuracy by training-count group")
  return common.Outcome(
      results={"accuracy": results, "train_counts": counts.tolist(),
               "group_counts": groups.tolist(), "logits_tags": tags,
               "recipe": config.train.recipe, "effects": effects},
      tables=[report.table(title, list(GROUPS), rows, config.published,
                           {"all": "ID (all classes)"}), effects_table],
      accuracies={name: row["all"] for name, row in rows},
      plots={"train_counts.png": report.PriorPlot(
          np.log(counts / counts.sum()), None, label="log training label frequency")})
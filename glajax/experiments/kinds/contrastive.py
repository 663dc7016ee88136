"""Contrastive fine-tuning on class prompts: FLYP (Goyal et al., CVPR 2023) or CaRot (Oh et al.,
NeurIPS 2024), whichever recipe ``train.recipe`` names; accuracy and ECE on the test set and
each shift against zero-shot. ``contrastive.ece_per_batch`` (CaRot's evaluation: 512) adds the
batch-size-weighted per-batch ECE beside the whole-set ECE."""
from __future__ import annotations

import numpy as np

from glajax import methods as M
from glajax.experiments import report, roles
from glajax.schema import Field
from glajax.experiments.kinds import common
from glajax.train import recipes

NAME = "contrastive"
FIELDS = {"contrastive.ece_bins": Field("int", 1, result=False),
          "contrastive.ece_per_batch": Field("int", 0, optional=True, result=False)}
DISPLAY = {"flyp": "FLYP", "carot": "CaRot"}  # the papers' names of the recipes


def plan(config) -> list[roles.Use]:
  return [roles.Use(roles.FIT, "fine-tuning", "data.train", common.train_ref(config)),
          *common.test_uses(config)]


def trained(exp, checkpoint: str, run: str, train, use: roles.Use, export: str | None = None):
  """The classifier of ``checkpoint`` fine-tuned contrastively (the recipe ``train``) on
  ``use``: its zero-shot head rebuilt from the fine-tuned text tower."""
  classnames, templates = exp.classes(common.train_ref(exp.config))
  task = recipes.contrastive_task(exp.load_model(checkpoint, train), exp.tokenizer(checkpoint),
                                  classnames, templates, train)
  return exp.fit(run, task, train, use, export=export)


def _row(outputs, tests, evidence, per_batch):
  """Accuracy and whole-set ECE with their intervals; CaRot's batch-weighted ECE (a figure of
  its evaluation's batches, which a resample of rows does not keep) as a number."""
  row = {**evidence.cells(outputs, tests), **evidence.cells(outputs, tests, "ece", "ECE ")}
  if per_batch:
    ece = {f"batch ECE {common.column(u, tests[0])}": float(
        M.ece(*outputs[u.purpose], num_bins=evidence.bins, per_batch=per_batch)) for u in tests}
    shift_columns = [f"batch ECE {common.column(u, tests[0])}" for u in tests[1:]]
    if shift_columns:
      ece["batch ECE avg shifts"] = float(np.mean([ece[c] for c in shift_columns]))
    row.update(ece)
  return row


def run(exp) -> dict:
  config, options = exp.config, exp.config.contrastive
  checkpoint, recipe = config.model.checkpoints[0], config.train.recipe
  tests, use = exp.tests(), exp.use("fine-tuning")
  ref = common.train_ref(config)
  zs_tag = common.zeroshot_tag(exp, checkpoint, ref)
  run_name = exp.run_key(recipe, exp.train_config(), checkpoint, use)
  outputs = {
      "zero-shot": exp.logits(zs_tag, lambda: common.zeroshot(exp, checkpoint, ref), tests),
      DISPLAY.get(recipe, recipe): exp.logits(
          run_name, lambda: trained(exp, checkpoint, run_name, exp.train_config(), use,
                                    export=recipe), tests)}
  bins, per_batch = int(options.ece_bins), options.get("ece_per_batch")
  evidence = common.Evidence(exp, bins)
  rows = [(name, _row(logits, tests, evidence, per_batch)) for name, logits in outputs.items()]
  trained_name = DISPLAY.get(recipe, recipe)
  effects_table, effects = common.effects_outcome(
      f"{trained_name}: paired differences (95 % intervals on the same test rows)",
      common.EFFECT_COLUMNS, [(f"{trained_name} vs zero-shot", evidence.effects(
          outputs["zero-shot"], outputs[trained_name], tests))])
  accuracy_columns = common.columns(tests)
  columns = accuracy_columns + [f"ECE {c}" for c in accuracy_columns]
  if per_batch:
    columns += [f"batch ECE {c}" for c in accuracy_columns]
  panels = {common.column(u, tests[0]): {name: logits[u.purpose]
                                          for name, logits in outputs.items()} for u in tests}
  title = (f"{DISPLAY.get(recipe, recipe)} on {ref.dataset}: accuracy and ECE ({bins} bins"
           + (f"; batch ECE over batches of {per_batch}" if per_batch else "") + ") under shift")
  return common.Outcome(
      results={"metrics": {name: common.estimates(row) for name, row in rows},
               "recipe": recipe, "trained": trained_name, "effects": effects,
               "logits_tags": {"zero-shot": zs_tag, trained_name: run_name},
               "recipe_values": {"carot": config.train.carot.to_dict()}},
      tables=[report.table(title, columns, rows, config.published), effects_table],
      accuracies={name: row[common.ID] for name, row in rows},
      plots={"reliability.png": report.Reliability(panels, bins)})
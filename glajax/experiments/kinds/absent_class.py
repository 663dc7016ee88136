"""Absent-class calibration (Mai et al., NeurIPS 2024): fine-tune on the seen classes S, add γ to
the absent classes' logits (ALG from the fine-tuning data; PCV from pseudo splits of S, chosen on
held-out training data of S; the oracle γ, best on test, for reference only), AUSUC.

The source classifier is the checkpoint's zero-shot head (CLIP) or, for a supervised classifier
(the paper's ImageNet ResNet-50), its own head on the dataset's classes (``common.source``); γ
acts on the logits of the fine-tuned version of that head.

With ``absent_class.test_fraction`` the dataset's one labelled split is divided per class into a
fine-tuning pool and the test set (then ``data.test`` must name that split)."""
from __future__ import annotations

import numpy as np

from glajax import methods as M
from glajax.errors import ConfigError, InputError, bad_argument
from glajax.experiments import report, roles
from glajax.schema import Field
from glajax.experiments.kinds import common

NAME = "absent_class"
FIELDS = {"absent_class.num_seen": Field("int", 1), "absent_class.split_seed": Field("int", 0),
          "absent_class.test_fraction": Field("float", 0, 0.99),
          "absent_class.pcv_seeds": Field("ints", 0),
          "absent_class.pcv_holdout": Field("positive", 0, 0.99)}
ACCURACY_LABELS = {"acc_y_y": "Acc_{Y/Y}", "acc_s_y": "Acc_{S/Y}", "acc_u_y": "Acc_{U/Y}",
                   "acc_s_s": "Acc_{S/S}", "acc_u_u": "Acc_{U/U}", "ausuc": "AUSUC"}
EFFECT_KEYS = ("acc_y_y", "acc_s_y", "acc_u_y")   # γ's claim (U/Y) and its cost (S/Y)


def _pool_and_tests(config):
  options, train = config.absent_class, common.train_ref(config)
  if not options.test_fraction:
    return train, common.test_uses(config)
  if config.data.test != config.data.train or config.data.get("shifts"):
    raise bad_argument("data.test", f"the training split {config.data.train!r} and no shifts: "
                       "absent_class.test_fraction divides it into fine-tuning and test data",
                       repr(config.data.test), ConfigError)
  split = lambda part: roles.holdout(options.test_fraction, options.split_seed, part)  # noqa
  return train.then(split(0)), [roles.Use(roles.TEST, "test", "absent_class.test_fraction",
                                          train.then(split(1)))]


def plan(config) -> list[roles.Use]:
  options = config.absent_class
  common.check_num_seen("absent_class.num_seen", options.num_seen, common.train_ref(config))
  pool, tests = _pool_and_tests(config)
  seen = pool.then(roles.classes(options.num_seen, options.split_seed, 0))
  holdout = lambda part: roles.holdout(options.pcv_holdout, options.split_seed, part)  # noqa
  uses = [roles.Use(roles.FIT, "fine-tuning", "absent_class.num_seen", seen),
          roles.Use(roles.FIT, "ALG γ", "absent_class.num_seen", seen),
          roles.Use(roles.FIT, "PCV γ", "absent_class.pcv_holdout", seen.then(holdout(1)))]
  within = (options.num_seen, options.split_seed)
  for seed in options.pcv_seeds:
    pseudo_seen = roles.classes(options.num_seen // 2, seed, 0, within=within)
    uses.append(roles.Use(roles.FIT, f"PCV fine-tuning (seed {seed})", "absent_class.pcv_seeds",
                          seen.then(holdout(0), pseudo_seen)))
  return uses + tests


def _pcv_gamma(exp, models, tags, seen: np.ndarray):
  """PCV: per seed, fine-tune on the pseudo-seen half of S (minus the held-out rows) and choose
  γ for the pseudo-absent half on the held-out rows of S, against the source model's
  pseudo-absent accuracy on the same rows; γ averaged over the seeds. None when no split has a γ
  that keeps that accuracy (the official code skips such a split; the report warns)."""
  options, seen_ids = exp.config.absent_class, np.flatnonzero(seen)
  val = exp.use("PCV γ")
  zs_logits, labels = exp.arrays(val, tags["zs"], lambda: models.zs)
  labels = np.searchsorted(seen_ids, labels)
  splits, pseudo_absent_classes = [], []
  for seed in options.pcv_seeds:
    use = exp.use(f"PCV fine-tuning (seed {seed})")
    pseudo_absent = ~roles.class_mask(use.ref.steps[-1], exp.num_classes(use.ref))[seen_ids]
    run = exp.run_key("pcv", exp.config.train, exp.config.model.checkpoints[0], use)
    logits, _ = exp.arrays(val, run, lambda u=use, r=run: common.finetuned(
        exp, models.zs, r, u, exp.train_config()))
    source = M.seen_absent_accuracies(zs_logits[:, seen], labels, pseudo_absent)["acc_u_y"]
    splits.append((logits[:, seen], labels, pseudo_absent, source))
    pseudo_absent_classes.append(seen_ids[pseudo_absent].tolist())
  try:
    return float(M.pcv_gamma(splits)), pseudo_absent_classes
  except InputError:   # no feasible split: γ undefined, the report says so
    return None, pseudo_absent_classes


def _accuracies(evidence, logits, labels, absent) -> dict:
  """Mai et al.'s Acc_{A/B} (``M.seen_absent_accuracies``), each with its interval: rows
  labelled in A, predicting among B (S/S and U/U: the logits of those classes alone)."""
  absent = np.asarray(absent, bool)
  seen = ~absent
  out = {"acc_y_y": evidence.of(logits, labels), "acc_s_y": evidence.of(logits, labels,
                                                                         "subset", seen),
         "acc_u_y": evidence.of(logits, labels, "subset", absent)}
  for key, classes in (("acc_s_s", seen), ("acc_u_u", absent)):
    ids = np.flatnonzero(classes)
    kept = np.isin(labels, ids)
    out[key] = (evidence.of(np.asarray(logits)[kept][:, ids], np.searchsorted(ids, labels[kept]))
                if kept.any() else float("nan"))
  return out


def _rows(evidence, variants: dict, labels, absent, marks: dict):
  """Table rows and results of each variant; the AUSUC curves of the source and fine-tuned
  models (the first two variants); the points of the fine-tuned curve marked in the plot
  (``marks``: variant -> label)."""
  rows, results, curves, points = [], {}, {}, {}
  for i, (name, logits) in enumerate(variants.items()):
    row = _accuracies(evidence, logits, labels, absent)
    if i < 2:
      area, curve = M.ausuc(logits, labels, absent, return_curve=True)
      row["ausuc"] = float(area)
      curves[name] = (float(area), {k: np.asarray(v) for k, v in curve.items()})
    if name in marks:
      points[marks[name]] = (float(row["acc_s_y"].estimate), float(row["acc_u_y"].estimate))
    rows.append((name, row))
    results[name] = common.estimates(row)
  return rows, results, curves, points


def run(exp) -> dict:
  config, options = exp.config, exp.config.absent_class
  use, test = exp.use("fine-tuning"), exp.tests()[0]
  seen = roles.class_mask(use.ref.steps[-1], exp.num_classes(use.ref))
  absent = ~seen
  models, tags = common.classifier_models(exp, config.model.checkpoints[0], use,
                                          exp.train_config(), export="finetuned")
  zs_logits, labels = exp.arrays(test, tags["zs"], lambda: models.zs)
  ft_logits, _ = exp.arrays(test, tags["ft"], lambda: models.ft)
  gamma_alg = float(M.alg_gamma(*exp.arrays(exp.use("ALG γ"), tags["ft"], lambda: models.ft),
                                absent))
  gamma_pcv, pseudo_absent_classes = _pcv_gamma(exp, models, tags, seen)
  gamma_oracle = float(M.oracle_gamma(ft_logits, labels, absent))
  source = "zero-shot" if common.has_text(exp, config.model.checkpoints[0]) else "source"
  variants = {source: zs_logits, "fine-tuned": ft_logits}
  marks = {"fine-tuned": "γ = 0 (fine-tuned)"}
  for method, gamma, note in (("ALG", gamma_alg, ""), ("PCV", gamma_pcv, ""),
                              ("oracle", gamma_oracle, ", chosen on test: reference only")):
    if gamma is None:
      continue
    name = f"fine-tuned + {method} γ ({gamma:.2f}{note})"
    variants[name] = M.apply_gamma(ft_logits, absent, gamma)
    marks[name] = f"{method} γ = {gamma:.2f}" + (" (on test)" if note else "")
  evidence = common.Evidence(exp)
  rows, results, curves, points = _rows(evidence, variants, labels, absent, marks)
  tuned = [name for name in variants if name.startswith("fine-tuned + ")]
  effects_table, effects = common.effects_outcome(
      "γ against the fine-tuned model: paired differences (95 % intervals on the same test "
      "rows)", [f"Δ {ACCURACY_LABELS[k]}" for k in EFFECT_KEYS],
      [(f"{name} vs fine-tuned", {
          f"Δ {ACCURACY_LABELS[k]}": evidence.paired(ft_logits, variants[name], labels, "subset",
                                                     classes)
          for k, classes in (("acc_y_y", np.ones_like(absent)), ("acc_s_y", seen),
                             ("acc_u_y", absent))}) for name in tuned])
  title = (f"Absent-class calibration on {use.ref.dataset} ({int(seen.sum())} seen / "
           f"{int(absent.sum())} absent classes, {config.train.recipe})")
  return common.Outcome(
      results={"accuracy": results, "gamma_alg": gamma_alg, "gamma_pcv": gamma_pcv,
               "gamma_oracle": gamma_oracle, "seen_classes": np.flatnonzero(seen).tolist(),
               "pcv_seeds": list(options.pcv_seeds),
               "pcv_pseudo_absent_classes": pseudo_absent_classes,
               "recipe": config.train.recipe, "effects": effects},
      tables=[report.table(title, list(ACCURACY_LABELS), rows, config.published,
                           ACCURACY_LABELS), effects_table],
      accuracies={name: row["acc_y_y"] for name, row in rows[:2]},
      plots={"ausuc.png": report.AusucPlot(curves, points)})
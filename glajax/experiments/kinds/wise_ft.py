"""WiSE-FT (Wortsman et al., CVPR 2022): θ_α = (1 − α)·θ_zs + α·θ_ft over encoder and
head, evaluated for each α on the test set and the shifts; optionally temperature scaling of the
fine-tuned model, T fitted on ``data.validation``."""
from __future__ import annotations

import numpy as np

from glajax import methods as M
from glajax.experiments import report, roles
from glajax.schema import Field
from glajax.experiments.kinds import common
from glajax.models import heads
from glajax.train import recipes

NAME = "wise_ft"
# The α sweep, the export and the ECE bins read cached logits: they do not change the results.
FIELDS = {
    "wise_ft.alphas": Field("floats", 0, 1, result=False),
    "wise_ft.export_alpha": Field("float", 0, 1, result=False),
    "wise_ft.ece_bins": Field("int", 1, result=False), "wise_ft.linear": Field("bool"),
}


def plan(config) -> list[roles.Use]:
  uses = [roles.Use(roles.FIT, "fine-tuning", "data.train", common.train_ref(config))]
  if config.data.get("validation"):
    uses.append(roles.Use(roles.FIT, "temperature", "data.validation",
                          roles.DataRef.parse(config.data.validation, "data.validation")))
  return uses + common.test_uses(config)


def _linear_probe(exp, zs, run: str, use: roles.Use, train):
  """WiSE-FT's linear classifier: the zero-shot head trained on the frozen encoder's features
  of ``use`` (computed once, cached like logits, no augmentation)."""
  features, labels = exp.arrays(use, f"features-{exp.key(run)}", lambda: zs.backbone,
                                logits_fn=recipes.image_features)
  head = heads.LinearHead(np.asarray(zs.head.kernel[...]), np.asarray(zs.head.bias[...]),
                          normalize=zs.head.normalize)
  task = recipes.linear_probe_task(head, train)
  head = exp.fit_arrays(run, task, train, {"features": features, "label": labels},
                        export="finetuned")
  return heads.ImageClassifier(zs.backbone, head)


def _models(exp, checkpoint: str, use: roles.Use, train):
  models, tags = common.classifier_models(exp, checkpoint, use, train, export="finetuned")
  if exp.config.wise_ft.linear:
    run = exp.run_key("linear_probe", train, checkpoint, use)
    zs = models
    models = common.Lazy(zs=lambda: zs.zs, ft=lambda: _linear_probe(exp, zs.zs, run, use, train))
    tags = {**tags, "ft": run}
  return models, tags


def _label(alpha: float) -> str:
  return {0.0: "zero-shot (α=0)", 1.0: "fine-tuned (α=1)"}.get(alpha, f"WiSE-FT α={alpha:g}")


def _sweep(exp, models, tags, tests, alphas):
  """α -> outputs (purpose -> (logits, labels)) of the weight-space ensemble on the tests."""

  def merged(alpha):
    return common.wise_ft_model(models.zs, models.ft, alpha)

  outputs = {}
  for alpha in alphas:  # the endpoints under the models' own tags, shared with other kinds
    tag = {0.0: tags["zs"], 1.0: tags["ft"]}.get(
        alpha, f"wise{alpha:g}-{exp.key(tags['zs'], tags['ft'], alpha)}")
    model = {0.0: lambda: models.zs, 1.0: lambda: models.ft}.get(alpha, lambda a=alpha: merged(a))
    outputs[alpha] = exp.logits(tag, model, tests)
  export_alpha = float(exp.config.wise_ft.export_alpha)
  exp.export(f"wise_ft_alpha{export_alpha:g}",
             lambda directory: recipes.export_classifier(
                 merged(export_alpha), directory, exp.export_info(common.train_ref(exp.config))))
  return outputs


def _calibration(exp, outputs, tests, temperature: float, evidence):
  """ECE of the fine-tuned model on every test set, before and after temperature scaling, and
  the change with its paired interval."""
  rows, results = [], {}
  fine_tuned = outputs[1.0]
  bins = evidence.bins
  for name, scale in (("fine-tuned (α=1)", 1.0), (f"+ temperature scaling (T={temperature:.2f})",
                                                   temperature)):
    scaled = {u.purpose: (fine_tuned[u.purpose][0] / scale, fine_tuned[u.purpose][1])
              for u in tests}
    row = evidence.cells(scaled, tests, "ece")
    rows.append((name, row))
    results[name] = common.estimates(row)
  title = f"ECE ({bins} bins), T fitted on {exp.use('temperature').ref.describe()}"
  return report.table(title, common.columns(tests), rows), results


def run(exp) -> dict:
  config = exp.config
  tests, use = exp.tests(), exp.use("fine-tuning")
  models, tags = _models(exp, config.model.checkpoints[0], use, exp.train_config())
  # the endpoints and the exported α always: the report's plots and the export read them
  alphas = sorted({0.0, 1.0, float(config.wise_ft.export_alpha),
                   *map(float, config.wise_ft.alphas)})
  outputs = _sweep(exp, models, tags, tests, alphas)
  bins = int(config.wise_ft.ece_bins)
  evidence = common.Evidence(exp, bins)
  cells = {a: evidence.cells(outputs[a], tests) for a in alphas}
  curve = [{"alpha": a, **common.estimates(cells[a]),
            "ece_id": float(M.ece(*outputs[a][tests[0].purpose], num_bins=bins))}
           for a in alphas]
  name = common.train_ref(config).dataset
  tables = [report.table(f"WiSE-FT on {name} ({config.train.recipe}): accuracy, ID and shifts",
                         common.columns(tests), [(_label(a), cells[a]) for a in alphas],
                         config.published)]
  results = {"curve": curve, "export_alpha": float(config.wise_ft.export_alpha),
             "recipe": config.train.recipe}
  if config.data.get("validation"):
    val_logits, val_labels = exp.arrays(exp.use("temperature"), tags["ft"], lambda: models.ft)
    temperature = float(M.fit_temperature(val_logits, val_labels))
    calibration, results["ece"] = _calibration(exp, outputs, tests, temperature, evidence)
    results["temperature"] = temperature
    tables.append(calibration)
  effects = [(f"{_label(1.0)} vs {_label(0.0)}",
               evidence.effects(outputs[0.0], outputs[1.0], tests, per_shift=True))]
  middle = float(config.wise_ft.export_alpha)
  if 0.0 < middle < 1.0:
    effects += [(f"{_label(middle)} vs {_label(end)}",
                 evidence.effects(outputs[end], outputs[middle], tests, per_shift=True))
                for end in (0.0, 1.0)]
  if "temperature" in results:
    scaled = {u.purpose: (outputs[1.0][u.purpose][0] / results["temperature"],
                          outputs[1.0][u.purpose][1]) for u in tests}
    effects.append((f"temperature scaling vs {_label(1.0)}",
                    evidence.effects(outputs[1.0], scaled, tests, per_shift=True)))
  effects_table, results["effects"] = common.effects_outcome(
      "WiSE-FT: paired differences (95 % intervals on the same test rows)",
      common.effect_columns(tests), effects)
  tables.append(effects_table)
  shown = sorted({0.0, 1.0, float(config.wise_ft.export_alpha)})
  panels = {common.column(u, tests[0]): {_label(a): outputs[a][u.purpose] for a in shown}
            for u in tests}
  return common.Outcome(results=results, tables=tables,
                        plots={"wise_ft_curve.png": report.WiseFTCurve(curve),
                               "reliability.png": report.Reliability(panels, bins)},
                        accuracies={_label(a): cells[a][common.ID] for a in (0.0, 1.0)})
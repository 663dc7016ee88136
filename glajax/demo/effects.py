"""The effects the demo's world is built to show, each read from its part's report and judged
against a stated threshold (an effect that does not appear is reported as such)."""
from __future__ import annotations

import numpy as np

from glajax.experiments import report as experiment_report

# name -> (what the world is built to show, comparison, threshold); stated in the report too.
EFFECTS = {
    "prior_spearman": ("estimated prior correlates with the true pre-training prior "
                       "(Spearman ρ)", ">=", 0.9),
    "debias_gain": ("debiasing raises balanced zero-shot accuracy (photo)", ">", 0.0),
    "finetune_id_gain": ("fine-tuning raises in-domain accuracy", ">", 0.0),
    "finetune_ood_change": ("fine-tuning lowers OOD accuracy (mean of shifted domains)", "<",
                            0.0),
    "wise_ft_ood_gain": ("some WiSE-FT α beats both endpoints on OOD accuracy", ">", 0.0),
    "gla_id_gain": ("GLA ensemble beats fine-tuning in-domain", ">", 0.0),
    "temperature_ece_change": ("temperature scaling lowers in-domain ECE", "<", 0.0),
    "la_vs_ce_gain": ("logit-adjusted loss beats plain CE on balanced accuracy (long tail)", ">",
                      0.0),
    "backdoor_gain": ("backdoor ensemble beats the best single foundation model", ">", 0.0),
    "alg_absent_gain": ("ALG γ recovers absent-class accuracy (Acc_{U/Y})", ">", 0.0),
    "pcv_absent_gain": ("PCV γ recovers absent-class accuracy (Acc_{U/Y})", ">", 0.0),
    "carot_ece_change": ("CaRot lowers OOD ECE against FLYP", "<", 0.0),
}
_COMPARE = {">": np.greater, ">=": np.greater_equal, "<": np.less}


def effect_appeared(name: str, value) -> bool:
  """Whether ``value`` passes the threshold of effect ``name`` (a missing value does not)."""
  _, comparison, threshold = EFFECTS[name]
  return value is not None and bool(np.isfinite(value)) and bool(
      _COMPARE[comparison](value, threshold))


prior_fit = experiment_report.prior_fit  # the one fit of an estimated prior to a true one


def _row(report: dict, label_start: str) -> dict:
  return next(v for k, v in report["results"]["accuracy"].items() if k.startswith(label_start))


def _values(reports: dict, true_counts) -> dict:
  """Each effect's value from the parts' reports (missing parts leave theirs out)."""
  values = {}
  if "gla" in reports:
    gla = reports["gla"]["results"]["accuracy"]
    values["prior_spearman"] = prior_fit(reports["gla"]["results"]["log_prior"],
                                         true_counts)["spearman"]
    values["debias_gain"] = gla["debiased zero-shot"]["ID"] - gla["zero-shot"]["ID"]
    values["gla_id_gain"] = gla["GLA"]["ID"] - gla["fine-tuned"]["ID"]
  if "wise_ft" in reports:
    results = reports["wise_ft"]["results"]
    curve = results["curve"]
    ood = [p["avg shifts"] for p in curve]
    values["finetune_id_gain"] = curve[-1]["ID"] - curve[0]["ID"]
    values["finetune_ood_change"] = ood[-1] - ood[0]
    values["wise_ft_ood_gain"] = max(ood[1:-1]) - max(ood[0], ood[-1]) if len(ood) > 2 else None
    if "ece" in results:
      before, after = results["ece"].values()
      values["temperature_ece_change"] = after["ID"] - before["ID"]
  if "backdoor" in reports:
    rows = reports["backdoor"]["results"]["accuracy"]
    la = [v["all"] for k, v in rows.items() if k.endswith("(LA loss)")]
    values["la_vs_ce_gain"] = la[0] - _row(reports["backdoor"], next(
        k for k in rows if k.endswith("(CE loss)")))["all"]
    values["backdoor_gain"] = rows["backdoor ensemble"]["all"] - max(la)
  if "absent_class" in reports:
    fine_tuned = _row(reports["absent_class"], "fine-tuned")["acc_u_y"]
    values["alg_absent_gain"] = _row(reports["absent_class"], "fine-tuned + ALG")["acc_u_y"] \
        - fine_tuned
    values["pcv_absent_gain"] = _row(reports["absent_class"], "fine-tuned + PCV")["acc_u_y"] \
        - fine_tuned
  if "flyp" in reports and "carot" in reports:
    results = [reports[p]["results"] for p in ("flyp", "carot")]
    ece = [r["metrics"][r["trained"]]["ECE avg shifts"] for r in results]
    values["carot_ece_change"] = ece[1] - ece[0]
  return values


def effects(reports: dict, true_counts) -> dict:
  """Every effect of ``EFFECTS`` with its measured value, threshold and whether it appeared."""
  values = _values(reports, true_counts)
  out = {}
  for name, (description, comparison, threshold) in EFFECTS.items():
    value = values.get(name)
    out[name] = {"description": description, "comparison": comparison, "threshold": threshold,
                 "value": value, "appeared": effect_appeared(name, value),
                 "measured": value is not None}
  return out

"""The effects the demo's world is built to show, each read from its part's report as a paired
difference with its 95 % bootstrap interval on the same test rows, beside its cost (the other
metric the same comparison moves). An effect appears only when its interval excludes 0 on the
claimed side; one that does not is reported as such.

  appeared = low > 0 (a gain) or high < 0 (a drop); ρ: estimate ≥ 0.9 and low > 0
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings

import numpy as np
from scipy import stats

from glajax.experiments import report as experiment_report
from glajax.experiments.kinds import common

SPEARMAN_MIN = 0.9   # the prior estimate "follows" the true prior: ρ ≥ 0.9


@dataclasses.dataclass(frozen=True)
class Effect:
  """A claim read from part ``part``'s paired differences (``results["effects"]``): the rows
  whose label matches ``comparison`` (a regular expression; every match must show the effect,
  the least favourable one is reported), column ``column``, ``sign`` +1 for a gain and −1 for a
  drop; ``cost``: the column of the same comparison that is its price."""
  description: str
  part: str
  comparison: str
  column: str
  sign: int
  cost: str | None = None
  why: str = ""
  where: tuple[str, ...] = ("effects",)   # the keys of ``results`` that hold the differences


EFFECTS = {
    "prior_spearman": Effect(
        "estimated prior correlates with the true pre-training prior (Spearman ρ)", "gla", "",
        "ρ", +1, why="the foundation models are pre-trained on long-tailed captions with the "
        "image→text loss, whose optimum carries the label prior"),
    "debias_gain": Effect(
        "debiasing raises balanced zero-shot accuracy (photo)", "gla",
        r"^debiased zero-shot vs zero-shot$", "Δ ID", +1, "Δ ECE ID",
        "the zero-shot logits carry the pre-training prior; the balanced test set does not"),
    "finetune_id_gain": Effect(
        "fine-tuning raises in-domain accuracy", "wise_ft",
        r"^fine-tuned \(α=1\) vs zero-shot \(α=0\)$", "Δ ID", +1, "Δ avg shifts",
        "fine-tuning sees labelled photos of every class"),
    "finetune_sketch_drop": Effect(
        "fine-tuning lowers accuracy on the rendition shift (sketches, as on ImageNet-Sketch)",
        "wise_ft", r"^fine-tuned \(α=1\) vs zero-shot \(α=0\)$", "Δ test_sketch", -1,
        "Δ avg shifts",
        "fine-tuning on photos alone specialises the features to the photos' way of drawing a "
        "pattern (its colour against a dark shade), which sketches replace by paper; the "
        "photo-like shifts (noise, texture: the photo's own tile) gain with the photos, as "
        "ImageNet-V2 does, so the mean over the shifts (the cost column) may rise"),
    "wise_ft_ood_gain": Effect(
        "WiSE-FT α = 0.5 beats both endpoints on OOD accuracy", "wise_ft",
        r"^WiSE-FT α=0\.5 vs ", "Δ avg shifts", +1, "Δ ID",
        "the interpolated weights keep the pre-trained robustness and gain the photos' fit"),
    "gla_id_gain": Effect(
        "GLA ensemble beats the few-shot prompt-tuned model in-domain", "gla",
        r"^GLA vs fine-tuned$", "Δ ID", +1, "Δ ECE ID",
        "prompt tuning on one photo per class (GLA's few-shot setting) fits those shots; the "
        "debiased zero-shot model, which read every pre-training pair, errs on other images"),
    "temperature_ece_change": Effect(
        "temperature scaling lowers in-domain ECE", "wise_ft",
        r"^temperature scaling vs ", "Δ ECE ID", -1, "Δ ECE avg shifts",
        "a short fine-tuning from the zero-shot head leaves the model's confidence off its "
        "accuracy (here under-confident: T < 1); T fitted on validation photos rescales it"),
    "la_vs_ce_gain": Effect(
        "logit-adjusted loss beats plain CE on balanced accuracy (long tail)", "backdoor",
        r"\(LA loss\) vs .*\(CE loss\)$", "Δ all", +1, "Δ many",
        "the fine-tuning data is long-tailed; the LA loss removes its label prior"),
    "backdoor_gain": Effect(
        "backdoor ensemble beats each of its foundation models", "backdoor",
        r"^backdoor ensemble vs ", "Δ all", +1, "Δ many",
        "the two foundation models were pre-trained with different biases"),
    "alg_absent_gain": Effect(
        "ALG γ recovers absent-class accuracy (Acc_{U/Y})", "absent_class",
        r"^fine-tuned \+ ALG γ", "Δ Acc_{U/Y}", +1, "Δ Acc_{S/Y}",
        "Mai et al.'s SGD fine-tuning moves the head at 10× the backbone's rate, and every "
        "update of an absent class's row is negative (−η·p_u·x on each seen-class image): its "
        "logits fall on every image, the training rows included, where ALG measures the gap"),
    "pcv_absent_gain": Effect(
        "PCV γ recovers absent-class accuracy (Acc_{U/Y})", "absent_class",
        r"^fine-tuned \+ PCV γ", "Δ Acc_{U/Y}", +1, "Δ Acc_{S/Y}",
        "as ALG, with γ chosen by pseudo cross-validation"),
    "compose_temperature_after_wise_ft": Effect(
        "temperature after WiSE-FT lowers in-domain ECE (compose)", "compose",
        r"^\+ temperature .* vs \+ WiSE-FT", "Δ ECE ID", -1, "Δ ECE avg shifts",
        "weight averaging keeps the fine-tuned model's miscalibration, which T fitted on "
        "validation removes", ("finetune", "effects")),
    "compose_gla_after_wise_ft": Effect(
        "GLA on top of CaRot, WiSE-FT and temperature beats them in-domain (compose)",
        "compose", r"^\+ GLA .* vs \+ temperature", "Δ ID", +1, "Δ ECE ID",
        "CaRot's regularised fine-tuning leaves errors in-domain (about 81 %, fine-tuned CLIP's "
        "regime on ImageNet) that the debiased zero-shot model, which read every pre-training "
        "pair, does not share; on the full fine-tune the photos' cue leaves almost none (about "
        "96 %), and the stage's gain is on the shifts", ("carot", "effects")),
    "carot_ece_change": Effect(
        "CaRot lowers OOD ECE against FLYP", "carot", "CaRot vs FLYP", "Δ ECE avg shifts", -1,
        "Δ avg shifts", "CaRot's orthogonality and self-distillation keep the pre-trained "
        "model's confidence"),
}


def effect_appeared(name: str, interval) -> bool:
  """Whether ``interval`` ({"estimate", "low", "high"}) shows effect ``name`` beyond noise: it
  excludes 0 on the claimed side (ρ: also at least :data:`SPEARMAN_MIN`). A missing or
  non-finite value does not."""
  if interval is None:
    return False
  values = [interval.get(k) for k in ("estimate", "low", "high")]
  if any(v is None or not np.isfinite(v) for v in values):
    return False
  estimate, low, high = values
  if name == "prior_spearman":
    return estimate >= SPEARMAN_MIN and low > 0
  return low > 0 if EFFECTS[name].sign > 0 else high < 0


prior_fit = experiment_report.prior_fit  # the one fit of an estimated prior to a true one


def _interval(value) -> dict | None:
  """{"estimate", "low", "high"} of a report's interval (or of a bare number: no interval)."""
  if value is None:
    return None
  if isinstance(value, dict):
    return {k: value.get(k) for k in ("estimate", "low", "high")}
  return {"estimate": float(value), "low": None, "high": None}


def _least_favourable(name: str, matches: list[dict]) -> dict:
  """The match that shows the effect least (the smallest gain, the smallest drop)."""
  sign = EFFECTS[name].sign
  return min(matches, key=lambda m: sign * m["value"]["estimate"])


def spearman_interval(log_prior, true_counts, num_samples: int = 1000, seed: int = 0) -> dict:
  """Spearman ρ of the estimated against the true prior with a 95 % percentile bootstrap over
  classes."""
  estimated, true = np.asarray(log_prior, np.float64), np.asarray(true_counts, np.float64)
  rho = float(prior_fit(estimated, true)["spearman"])
  if not np.isfinite(rho):   # a constant estimate: no correlation to bound
    return {"estimate": rho, "low": float("nan"), "high": float("nan")}
  rng = np.random.default_rng(seed)
  draws = []
  with warnings.catch_warnings():   # a resample may repeat one class only
    warnings.simplefilter("ignore", stats.ConstantInputWarning)
    for _ in range(num_samples):
      take = rng.integers(0, len(true), len(true))
      value = stats.spearmanr(estimated[take], true[take])[0]
      if np.isfinite(value):
        draws.append(value)
  low, high = (np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan))
  return {"estimate": rho, "low": float(low), "high": float(high)}


def _outputs(workdir: str, report: dict, tag: str) -> dict:
  """purpose -> (logits, labels) of the cached logits of ``tag`` that a part's report read."""
  out = {}
  for entry in report.get("logits_files", []):
    if entry["tag"] == tag:
      with np.load(os.path.join(workdir, entry["file"])) as f:
        out[entry["purpose"]] = (f["logits"], f["labels"])
  return out


def carot_vs_flyp(workdir: str, reports: dict, bins: int = 15, seed: int = 0) -> dict:
  """{Δ column: interval} of CaRot against FLYP on the same test rows (paired bootstrap), from
  the two parts' cached logits; ``workdir``: the demo's, which holds ``carot/`` and ``flyp/``."""
  outputs = []
  for part in ("flyp", "carot"):
    results = reports[part]["results"]
    outputs.append(_outputs(os.path.join(workdir, part), reports[part],
                            results["logits_tags"][results["trained"]]))
  purposes = [p for p in outputs[0] if p in outputs[1]]
  if not purposes:
    return {}
  out = common.Evidence(None, bins, seed=seed).effects_on(*outputs, purposes)
  return {k: v._asdict() for k, v in out.items()}


def _measured(name: str, reports: dict, true_counts, workdir: str | None) -> dict | None:
  """{"value", "cost", "comparison"} of effect ``name`` (None when its part is missing)."""
  effect = EFFECTS[name]
  if name == "prior_spearman":
    if "gla" not in reports or reports["gla"]["results"].get("log_prior") is None:
      return None
    value = spearman_interval(reports["gla"]["results"]["log_prior"], true_counts)
    return {"value": value, "cost": None, "comparison": "estimated vs true prior",
            "appeared": effect_appeared(name, value)}
  if name == "carot_ece_change":
    if not ("flyp" in reports and "carot" in reports) or workdir is None:
      return None
    rows = {"CaRot vs FLYP": carot_vs_flyp(workdir, reports)}
  else:
    if effect.part not in reports:
      return None
    rows = reports[effect.part]["results"]
    for key in effect.where:
      rows = rows.get(key, {})
  matches = [{"value": _interval(row.get(effect.column)),
              "cost": _interval(row.get(effect.cost)) if effect.cost else None,
              "comparison": label}
             for label, row in rows.items() if re.search(effect.comparison, label)
             and row.get(effect.column) is not None]
  if not matches:
    return None
  chosen = dict(_least_favourable(name, matches))
  chosen["comparison"] = re.sub(r"(?<![\w.])/\S*/", "", chosen["comparison"])  # paths: names
  chosen["appeared"] = all(effect_appeared(name, m["value"]) for m in matches)
  return chosen


def effects(reports: dict, true_counts, workdir: str | None = None) -> dict:
  """Every effect of ``EFFECTS``: its description, the comparison, its interval, its cost
  (the other metric, with its interval), whether it appeared, and why the world produces it."""
  out = {}
  for name, effect in EFFECTS.items():
    measured = _measured(name, reports, true_counts, workdir)
    value = None if measured is None else measured["value"]
    out[name] = {"description": effect.description, "why": effect.why,
                 "comparison": None if measured is None else measured["comparison"],
                 "column": effect.column, "cost_column": effect.cost,
                 "value": None if value is None else value["estimate"],
                 "interval": value, "cost": None if measured is None else measured["cost"],
                 "appeared": bool(measured is not None and measured["appeared"]),
                 "measured": measured is not None}
  return out


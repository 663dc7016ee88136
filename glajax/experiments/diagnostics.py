"""Whether a report's numbers can be trusted: checks of the run's own data, each a
:class:`Finding` (what was found, with its numbers, and what to do) when it fires.

- random model: a checkpoint named ``tiny[-variant][:SEED]`` is random-initialised;
- chance: a model's test accuracy whose 95 % bootstrap interval [lo, hi] has lo ≤ 1/K (K test
  classes), i.e. not distinguishable from (or below) guessing;
- training: over the logged steps of a fine-tuning run (``metrics.jsonl``), the mean of the last
  quarter against the first, rise = m_last − m_first of the training accuracy (of −loss without
  one), Welch's se = √(s²_first/n_first + s²_last/n_last); it fires when rise ≤ 2·se (no rise
  beyond the step-to-step noise at ≈ 97.5 %, one-sided);
- learning rate (own data): the rate chosen on validation is the largest candidate, after the
  grid's extensions (a larger one may fit better);
- prior (GLA): the confidence-matched temperature T at or beyond its search's starting range
  (``M.priors.TEMPERATURE_RANGE``: the zero-shot confidence cannot be matched to its accuracy
  there), or the estimated prior near uniform, H(π)/log C ≥ 0.99;
- PCV (absent classes): no pseudo split has a γ that keeps the pseudo-absent accuracy at the
  source model's (γ undefined, no PCV row).

Every check is a pure function of arrays and numbers (:func:`random_models`, :func:`near_chance`,
:func:`training_trend`, :func:`learning_rate_check`, :func:`prior_check`, :func:`pcv_check`);
:func:`collect` gathers their inputs from a run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from glajax.methods import priors
from glajax.experiments import config as config_lib

UNIFORM_ENTROPY = 0.99   # normalised entropy H(π)/log C at or above which a prior is "uniform"
TREND_FRACTION = 0.25    # the first and last quarter of the logged steps
TREND_Z = 2.0            # rise ≤ 2·se: no rise beyond the noise


@dataclasses.dataclass(frozen=True)
class Finding:
  """One warning: ``check`` (``random_model``, ``chance``, ``training``, ``prior``), ``cause``
  (what was found, one line) and ``advice`` (what to do)."""
  check: str
  cause: str
  advice: str

  def as_json(self) -> dict:
    return dataclasses.asdict(self)


def random_models(checkpoints: Sequence[str]) -> list[Finding]:
  """A finding for the random-initialised tiny checkpoints among ``checkpoints``."""
  tiny = [c for c in checkpoints if config_lib.is_tiny(str(c))]
  if not tiny:
    return []
  return [Finding(
      "random_model", f"the model is random: {', '.join(f'`{c}`' for c in tiny)} is a "
      "random-initialised tiny model (`runlocal`), so the numbers test the pipeline, not a method",
      "set `model.checkpoints` to a pre-trained checkpoint (a hub id or a directory, e.g. the "
      "demo's `<workdir>/models/…/foundation_0`)")]


def _interval(value) -> tuple[float, float, float]:
  return float(value.estimate), float(value.low), float(value.high)


def near_chance(accuracies: Mapping[str, object], num_classes: int) -> tuple[dict, list[Finding]]:
  """({label: {"accuracy", "low", "high", "chance"}}, findings) of test accuracies (``label`` ->
  ``M.Interval``) against chance 1/K: one finding naming those whose interval's low end is
  ≤ 1/K."""
  chance = 1.0 / int(num_classes)
  summary, at_chance = {}, []
  for label, value in accuracies.items():
    estimate, low, high = _interval(value)
    summary[label] = {"accuracy": estimate, "low": low, "high": high, "chance": chance}
    if low <= chance:
      at_chance.append(f"{label} {100 * estimate:.1f} % [{100 * low:.1f}, {100 * high:.1f}]")
  if not at_chance:
    return summary, []
  return summary, [Finding(
      "chance", f"test accuracy within noise of chance (1/{num_classes} = {100 * chance:.1f} %, "
      f"inside or above the 95 % interval): {'; '.join(at_chance)}",
      "a random or untrained model, too few test images to tell, or a recipe that did not "
      "learn (see the training check); use a pre-trained checkpoint, more test images or a "
      "larger learning rate / more epochs")]


def read_metrics(path: str) -> list[dict]:
  """The logged steps of ``metrics.jsonl`` in step order, a step logged twice (a resumed run)
  once, its last record."""
  by_step = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        record = json.loads(line)
        by_step[int(record["step"])] = record
  return [by_step[s] for s in sorted(by_step)]


def training_trend(name: str, records: Sequence[Mapping]) -> tuple[dict, list[Finding]]:
  """(summary, findings) of a run's logged steps: the first and last quarter's means of the
  training accuracy (else the loss, negated), their rise and Welch's se (see the module
  docstring); no check with fewer than 2 logged steps in a quarter."""
  metric = "accuracy" if records and all("accuracy" in r for r in records) else "loss"
  values = np.asarray([float(r[metric]) for r in records if metric in r], np.float64)
  n = int(np.floor(TREND_FRACTION * len(values)))
  summary = {"run": name, "metric": metric, "logged_steps": int(len(values))}
  if n < 2:
    summary["checked"] = False
    return summary, []
  first, last = values[:n], values[-n:]
  sign = 1.0 if metric == "accuracy" else -1.0
  rise = sign * (last.mean() - first.mean())
  se = float(np.sqrt(first.var(ddof=1) / n + last.var(ddof=1) / n))
  summary.update(checked=True, first=float(first.mean()), last=float(last.mean()),
                 rise=float(rise), se=se)
  if rise > TREND_Z * se:
    return summary, []
  if metric == "accuracy":
    what = (f"training accuracy not rising in {name}: {100 * first.mean():.1f} % over the first "
            f"{n} logged steps, {100 * last.mean():.1f} % over the last {n}")
  else:
    what = (f"training loss not falling in {name}: {first.mean():.4f} over the first {n} logged "
            f"steps, {last.mean():.4f} over the last {n}")
  return summary, [Finding(
      "training", f"{what} (change {rise:+.4g}, noise se {se:.2g})",
      "raise `train.optimizer.learning_rate` or the epochs (`train.epochs`) for this data size, "
      "and check the labels; a model that does not fit its training data tells nothing about "
      "the methods after it")]


def learning_rate_check(record: Mapping) -> tuple[dict, list[Finding]]:
  """(summary, findings) of a learning rate chosen on validation (``kinds.own_data``'s
  ``results["recipe"]``: ``candidates``, ``validation_accuracy``, ``learning_rate``): it fires
  when the chosen rate is the largest candidate."""
  summary = {key: record[key] for key in ("learning_rate", "candidates", "validation_accuracy")}
  summary["at_largest"] = bool(record["learning_rate"] >= max(record["candidates"]))
  if not summary["at_largest"]:
    return summary, []
  tried = ", ".join(f"{r:g} ({100 * a:.1f} %)" for r, a in zip(record["candidates"],
                                                             record["validation_accuracy"]))
  return summary, [Finding(
      "learning_rate", f"the learning rate chosen on validation, {record['learning_rate']:g}, "
      f"is the largest tried ({tried}): a larger one may fine-tune better",
      "add larger rates to `own_data.learning_rates` (or raise `own_data.extensions`)")]


def prior_check(log_prior, temperature: float, residual: float | None,
                searched: bool) -> tuple[dict, list[Finding]]:
  """(summary, findings) of GLA's estimated prior: its normalised entropy H(π)/log C
  (π = softmax(log_prior)), the temperature T and whether it lies at or beyond the search's
  starting range (``searched``: T was matched to the confidence), the optimality residual."""
  log_prior = np.asarray(log_prior, np.float64)
  prior = np.exp(log_prior - log_prior.max())
  prior /= prior.sum()
  plogp = prior * np.log(np.maximum(prior, np.finfo(np.float64).tiny))
  entropy = float(-np.sum(plogp) / np.log(prior.shape[0])) if prior.shape[0] > 1 else 1.0
  low, high = priors.TEMPERATURE_RANGE
  at_bound = bool(searched and (temperature <= low or temperature >= high))
  summary = {"temperature": float(temperature), "temperature_searched": bool(searched),
             "search_range": [low, high], "at_bound": at_bound, "entropy": entropy,
             "residual": None if residual is None else float(residual)}
  findings = []
  if at_bound:
    findings.append(Finding(
        "prior", f"GLA's zero-shot temperature T = {temperature:.4g} is at or beyond its search "
        f"range [{low:g}, {high:g}]: the zero-shot model's confidence could not be matched to "
        "its accuracy there (an accuracy near chance needs T → ∞)",
        "read the debiased zero-shot and GLA rows with care; a better zero-shot model (or "
        "`gla.match_confidence=False`) gives a usable prior"))
  if entropy >= UNIFORM_ENTROPY:
    findings.append(Finding(
        "prior", f"GLA's estimated prior is near uniform (normalised entropy {entropy:.4f} ≥ "
        f"{UNIFORM_ENTROPY}, T = {temperature:.4g}): debiasing changes little",
        "expected when the zero-shot model has no label bias; when its predictions are skewed, "
        "a large T has flattened the prior (see the temperature)"))
  return summary, findings


def pcv_check(gamma, splits: int) -> tuple[dict, list[Finding]]:
  """({"gamma", "splits"}, findings) of PCV's γ over ``splits`` pseudo splits: a finding when
  there is none (``gamma`` None: no split met the constraint)."""
  summary = {"gamma": gamma, "splits": int(splits)}
  if gamma is not None or not splits:
    return summary, []
  return summary, [Finding(
      "pcv", f"PCV found no γ in any of its {splits} pseudo splits: none keeps the pseudo-absent "
      "accuracy at the source model's, so the report has no PCV row (the source model is "
      "stronger on those classes than the fine-tuned one can be made by γ)",
      "compare ALG γ with the source model's absent-class accuracy; more PCV seeds "
      "(`absent_class.pcv_seeds`) or a larger hold-out (`absent_class.pcv_holdout`) change "
      "the splits")]


def _priors_in(results, path: str = ""):
  """(path, record) of each dict in ``results`` holding an estimated prior (``log_prior`` and
  ``zs_temperature``; ``zs_temperature_matched``: T was searched, ``prior_residual``)."""
  if isinstance(results, Mapping):
    if "log_prior" in results and "zs_temperature" in results:
      yield path or "gla", results
    for key, value in results.items():
      if isinstance(value, Mapping):
        yield from _priors_in(value, f"{path}.{key}" if path else str(key))


def collect(exp, outcome) -> tuple[dict, list[Finding]]:
  """(diagnostics, findings) of a run: its checkpoints, ``outcome.accuracies`` against the ID
  test set's chance, the training runs' logged steps and GLA's priors in ``outcome.results``."""
  config = exp.config
  findings = random_models(config.model.checkpoints)
  diagnostics = {"random_models": [c for c in config.model.checkpoints
                                   if config_lib.is_tiny(str(c))]}
  if outcome.accuracies:
    num_classes = exp.num_classes(exp.tests()[0].ref)
    diagnostics["chance"], found = near_chance(outcome.accuracies, num_classes)
    findings += found
  diagnostics["training"] = []
  for run in getattr(exp, "runs", ()):
    path = exp.cache("runs", run, "metrics.jsonl")
    if os.path.isfile(path):
      summary, found = training_trend(run, read_metrics(path))
      diagnostics["training"].append(summary)
      findings += found
  recipe = outcome.results.get("recipe")
  if isinstance(recipe, Mapping) and "candidates" in recipe:
    diagnostics["learning_rate"], found = learning_rate_check(recipe)
    findings += found
  if "pcv_seeds" in outcome.results:
    diagnostics["pcv"], found = pcv_check(outcome.results.get("gamma_pcv"),
                                          len(outcome.results["pcv_seeds"]))
    findings += found
  diagnostics["prior"] = {}
  for name, record in _priors_in(outcome.results):
    summary, found = prior_check(record["log_prior"], record["zs_temperature"],
                                 record.get("prior_residual"),
                                 bool(record.get("zs_temperature_matched", False)))
    diagnostics["prior"][name] = summary
    findings += found
  return diagnostics, findings


def warnings_markdown(findings: Sequence[Mapping]) -> list[str]:
  """The "> **Warning:** cause. What to do: advice." block, one paragraph each."""
  lines = []
  for i, f in enumerate(findings):
    lines += ([">"] if i else []) + [f"> **Warning:** {f['cause']}. What to do: {f['advice']}."]
  return lines


def markdown(diagnostics: Mapping) -> list[str]:
  """The report's "Diagnostics" section: every check's numbers, fired or not."""
  lines = ["## Diagnostics", ""]
  models = diagnostics.get("random_models")
  lines.append(f"- model: {'random (' + ', '.join(models) + ')' if models else 'pre-trained'}")
  for label, c in diagnostics.get("chance", {}).items():
    lines.append(f"- {label}: test accuracy {100 * c['accuracy']:.1f} % [{100 * c['low']:.1f}, "
                 f"{100 * c['high']:.1f}], chance {100 * c['chance']:.1f} %")
  for t in diagnostics.get("training", []):
    if not t.get("checked"):
      lines.append(f"- training `{t['run']}`: {t['logged_steps']} logged steps, too few to "
                   "judge a trend")
      continue
    show = (lambda v: f"{100 * v:.1f} %") if t["metric"] == "accuracy" else (
        lambda v: f"{v:.4f}")
    lines.append(f"- training `{t['run']}` ({t['logged_steps']} logged steps): {t['metric']} "
                 f"{show(t['first'])} over the first quarter, {show(t['last'])} over the last "
                 f"(improvement {t['rise']:+.4g}, noise se {t['se']:.2g})")
  rate = diagnostics.get("learning_rate")
  if rate:
    tried = ", ".join(f"{r:g} {100 * a:.1f} %" for r, a in zip(rate["candidates"],
                                                               rate["validation_accuracy"]))
    lines.append(f"- learning rate: {rate['learning_rate']:g} chosen on validation ({tried})")
  pcv = diagnostics.get("pcv")
  if pcv and pcv["splits"]:
    lines.append(f"- PCV: γ = {pcv['gamma']:.4g} over {pcv['splits']} pseudo splits"
                 if pcv["gamma"] is not None else
                 f"- PCV: no feasible γ in {pcv['splits']} pseudo splits")
  for name, p in diagnostics.get("prior", {}).items():
    residual = "–" if p["residual"] is None else f"{p['residual']:.2e}"
    how = (f"matched to the zero-shot confidence, search range [{p['search_range'][0]:g}, "
           f"{p['search_range'][1]:g}]" if p["temperature_searched"] else "fixed")
    lines.append(f"- GLA prior ({name}): T = {p['temperature']:.4g} ({how}), normalised entropy "
                 f"H(π)/log C = {p['entropy']:.4f}, optimality residual {residual}")
  return lines + [""]

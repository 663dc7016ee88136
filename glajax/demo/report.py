"""The demo's outputs: ``report.json`` (every number), ``report.md`` (the effects table) and PNG
plots (estimated vs true prior, WiSE-FT curve, reliability diagrams, AUSUC curve)."""
from __future__ import annotations

import json
import os

import numpy as np

from glajax.experiments.report import json_default, plot, write_atomic

COMMAND = "glajax demo --workdir {workdir}{quick}"
RELIABILITY_BINS = 10  # as CaRot reports ECE


def _strict(value):
  """The results with NaN and ±inf turned into None, so report.json is strict JSON."""
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return _strict(value.tolist())
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  return value


def _to_json(results: dict) -> str:
  return json.dumps(_strict(results), indent=2, default=json_default, allow_nan=False)


def _format(value) -> str:
  if value is None:
    return "not measured"
  return f"{value:+.3f}" if abs(value) < 10 else f"{value:.1f}"


def effects_table(effects: dict) -> str:
  """A Markdown table: effect, value, threshold, whether it appeared in this world."""
  lines = ["| effect | value | threshold | appeared |", "|---|---|---|---|"]
  for effect in effects.values():
    if not effect["measured"]:
      verdict = "not measured (stage missing)"
    else:
      verdict = "yes" if effect["appeared"] else "**did not appear in this world**"
    lines.append(f"| {effect['description']} | {_format(effect['value'])} | "
                 f"{effect['comparison']} {effect['threshold']:g} | {verdict} |")
  return "\n".join(lines)


def _accuracy_rows(results: dict) -> list[str]:
  rows = []
  for label, key in (("zero-shot", "zeroshot"), ("debiased zero-shot", "debiased_zeroshot"),
                     ("fine-tuned", "finetune"), ("GLA ensemble", "gla")):
    accuracy = results.get(key, {}).get("accuracy")
    if accuracy:
      rows.append(f"| {label} | " + " | ".join(f"{accuracy[s]:.3f}" for s in sorted(accuracy))
                  + " |")
  return rows


def markdown(results: dict, command: str) -> str:
  """``report.md``: the command, the effects table, the accuracy table and the plots."""
  parts = [
      "# glajax demo report", "",
      f"Produced by `{command}` in {sum(results.get('timings_s', {}).values()):.0f} s "
      f"(stages: {results.get('timings_s', {})}).", "",
      "The world is procedural (coloured shapes × domains, "
      f"{results.get('world', {}).get('classes', '?')} classes); every number below is in "
      "`report.json`. An effect that did not appear is reported as such, not tuned away.", "",
      "## Effects", "", effects_table(results.get("effects", {})), ""]
  test_size = results.get("world", {}).get("splits", {}).get("test_photo")
  if test_size:
    parts += [f"Each test split holds {test_size} images (balanced over the classes): an "
              f"accuracy difference below about √(0.5/{test_size}) = "
              f"{(0.5 / test_size) ** 0.5:.3f} is within one standard error of sampling noise "
              "between two classifiers, so a small 'yes' is weak evidence.", ""]
  prior = results.get("prior", {})
  if "slope" in prior:
    parts += ["The foundation models are pre-trained with CLIP's image→text loss over every "
              "distinct caption of the world, whose optimum is log p(caption | image): their "
              "zero-shot logits carry the pre-training label prior, as GLA assumes of web-scale "
              "CLIP. The estimated log prior against the true one has slope "
              f"{prior['slope']:.2f} (1 at that optimum) and Spearman ρ {prior['spearman']:.2f}. "
              "With in-batch negatives the optimum would be the pointwise mutual information "
              "log p(caption | image) / p(caption), which carries no prior (a world trained that "
              "way gave ρ ≈ 0.03).", ""]
  finetune, zeroshot = results.get("finetune", {}), results.get("zeroshot", {})
  if "accuracy" in finetune and "accuracy" in zeroshot:
    after, before = finetune["accuracy"], zeroshot["accuracy"]
    changes = ", ".join(f"{split[5:]} {after[split] - before[split]:+.3f}"
                        for split in sorted(after) if split != "test_photo")
    parts += [f"Fine-tuning on photos changed zero-shot accuracy on each shifted domain by: "
              f"{changes}.", ""]
  rows = _accuracy_rows(results)
  if rows:
    splits = sorted(results["zeroshot"]["accuracy"])
    parts += ["## Accuracy by domain", "", "| model | " + " | ".join(splits) + " |",
              "|---" * (len(splits) + 1) + "|", *rows, ""]
  parts += ["## Plots", ""]
  for image in results.get("plots", []):
    parts.append(f"![{image[:-4]}]({image})")
  return "\n".join(parts) + "\n"


def _plot_data(arrays: dict, results: dict) -> dict:
  """file name -> (plot kind, *data) for ``experiments.report.plot``, for each stage that ran."""
  specs = {}
  if "log_prior" in arrays:
    specs["prior.png"] = ("prior", arrays["log_prior"], arrays["pretrain_counts"][0],
                          "true prior (pre-training class frequency)")
  if "wise_ft" in results:
    specs["wise_ft.png"] = ("wise_ft_curve", results["wise_ft"]["curve"])
  if "reliability" in arrays:
    specs["reliability.png"] = ("reliability", arrays["reliability"], RELIABILITY_BINS)
  if "ausuc" in arrays:
    specs["ausuc.png"] = ("ausuc", arrays["ausuc"])
  return specs


def plots(workdir: str, arrays: dict, results: dict) -> list[str]:
  """Writes every plot whose data exists; returns the files written."""
  written = []
  for filename, (kind, *data) in _plot_data(arrays, results).items():
    plot(os.path.join(workdir, filename), kind, *data)
    written.append(os.path.join(workdir, filename))
  return written


def write(workdir: str, results: dict, arrays: dict, *, quick: bool) -> dict:
  """Writes report.json, report.md and the plots into ``workdir``; returns their paths."""
  command = COMMAND.format(workdir=workdir, quick=" --quick" if quick else "")
  results = {**results, "command": command, "plots": []}
  json_path, md_path = os.path.join(workdir, "report.json"), os.path.join(workdir, "report.md")
  write_atomic(json_path, _to_json(results))
  images = plots(workdir, arrays, results)
  results["plots"] = [os.path.basename(p) for p in images]
  write_atomic(json_path, _to_json(results))
  write_atomic(md_path, markdown(results, command))
  return {"json": json_path, "markdown": md_path, "plots": images}

"""The demo's outputs: ``report.json`` (every number), ``report.md`` (the effects table) and PNG
plots (estimated vs true prior, WiSE-FT curve, reliability diagrams, AUSUC curve)."""
from __future__ import annotations

import json
import os

import numpy as np

from glajax.experiments.report import json_default, write_atomic

COMMAND = "glajax demo --workdir {workdir}{quick}"


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
  prior = results.get("effects", {}).get("prior_spearman", {})
  if prior.get("measured") and not prior.get("appeared"):
    parts += ["The zero-shot model's label bias here does not follow the pre-training class "
              "frequencies: at its optimum CLIP's contrastive loss learns the pointwise mutual "
              "information of image and caption, which carries no label prior, and this world's "
              "rare classes share their colour and shape with frequent ones. The prior GLA "
              "estimates is the model's own bias, which is why debiasing can still help.", ""]
  rows = _accuracy_rows(results)
  if rows:
    splits = sorted(results["zeroshot"]["accuracy"])
    parts += ["## Accuracy by domain", "", "| model | " + " | ".join(splits) + " |",
              "|---" * (len(splits) + 1) + "|", *rows, ""]
  parts += ["## Plots", ""]
  for image in results.get("plots", []):
    parts.append(f"![{image[:-4]}]({image})")
  return "\n".join(parts) + "\n"


def _plot_prior(ax, arrays, results):
  estimated, true = arrays["prior"]
  ax.scatter(true, estimated, s=8)
  ax.set_xlabel("true log prior (pre-training counts)")
  ax.set_ylabel("estimated log prior (GLA)")
  ax.set_title(f"Spearman ρ = {results['prior']['spearman']:.2f}")


def _plot_wise_ft(ax, arrays, results):
  del arrays
  curve = results["wise_ft"]["curve"]
  ax.plot([p["id"] for p in curve], [p["ood"] for p in curve], "o-")
  for p in curve:
    ax.annotate(f"{p['alpha']:g}", (p["id"], p["ood"]), fontsize=7)
  ax.set_xlabel("ID accuracy (photo)")
  ax.set_ylabel("OOD accuracy (mean of shifted domains)")
  ax.set_title("WiSE-FT: α from zero-shot (0) to fine-tuned (1)")


def _plot_reliability(ax, arrays, results):
  from glajax import methods as M  # pylint: disable=import-outside-toplevel
  del results
  for name in ("flyp", "carot"):
    logits, labels = arrays[f"reliability_{name}"]
    diagram = M.reliability_diagram(logits, labels, num_bins=10)
    confidence = np.asarray(diagram["confidence"])
    accuracy = np.asarray(diagram["accuracy"])
    keep = np.asarray(diagram["count"]) > 0
    ax.plot(confidence[keep], accuracy[keep], "o-", label=name)
  ax.plot([0, 1], [0, 1], "k--", lw=0.8)
  ax.set_xlabel("confidence")
  ax.set_ylabel("accuracy")
  ax.set_title("Reliability under shift (sketch)")
  ax.legend()


def _plot_ausuc(ax, arrays, results):
  del results
  for name, (area, curve) in arrays["ausuc"].items():
    ax.plot(np.asarray(curve["seen"]), np.asarray(curve["absent"]),
            label=f"{name} (AUSUC {area:.3f})")
  ax.set_xlabel("Acc S/Y (seen classes)")
  ax.set_ylabel("Acc U/Y (absent classes)")
  ax.set_title("Seen–absent trade-off as γ varies")
  ax.legend()


def plots(workdir: str, arrays: dict, results: dict) -> list[str]:
  """Writes every plot whose data exists; returns the files written."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []
  for name, draw in (("prior", _plot_prior), ("wise_ft", _plot_wise_ft),
                     ("reliability", _plot_reliability), ("ausuc", _plot_ausuc)):
    fig, ax = plt.subplots(figsize=(4.5, 4))
    try:
      draw(ax, arrays, results)
    except (KeyError, AttributeError):
      plt.close(fig)
      continue
    fig.tight_layout()
    path = os.path.join(workdir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
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

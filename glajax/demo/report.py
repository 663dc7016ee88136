"""The demo's outputs: ``report.json`` (every number), ``report.md`` (the effects table, timings,
each part's tables and a link to its own report) and the estimated-vs-true prior plot; each
part's plots (WiSE-FT curve, reliability diagrams, AUSUC) are in its own directory."""
from __future__ import annotations

import os

import numpy as np

from glajax import io
from glajax.demo import effects as effects_lib
from glajax.experiments import report as experiment_report

COMMAND = "glajax demo --workdir {workdir}{quick}"



# Effects measured as a correlation, not a difference of accuracies or ECEs.
_UNITLESS = ("prior_spearman",)


def _format(name: str, interval) -> str:
  """An estimate with its 95 % interval: differences in percentage points, a correlation as
  is."""
  if interval is None or interval.get("estimate") is None:
    return "not measured"
  unitless = name in _UNITLESS
  show = (lambda v: f"{v:.3f}") if unitless else (lambda v: f"{100 * v:+.1f}")  # noqa
  text = show(interval["estimate"])
  if interval.get("low") is not None and interval.get("high") is not None:
    text += f" [{show(interval['low'])}, {show(interval['high'])}]"
  return text + ("" if unitless else " pp")


def _rule(name: str) -> str:
  if name in _UNITLESS:
    return f"ρ ≥ {effects_lib.SPEARMAN_MIN:g}, interval > 0"
  return "interval > 0" if effects_lib.EFFECTS[name].sign > 0 else "interval < 0"


def effects_table(effects: dict) -> str:
  """A Markdown table: effect, the comparison it reads, its estimate with the 95 % paired
  bootstrap interval (differences in percentage points), the rule, whether it appeared, and
  its cost (the other metric the same comparison moves, with its interval)."""
  lines = ["| effect | comparison | estimate [95 % interval] | rule | appeared | cost |",
           "|---|---|---:|---|---|---|"]
  for name, effect in effects.items():
    if not effect["measured"]:
      verdict = "not measured (part missing)"
    else:
      verdict = "yes" if effect["appeared"] else "**did not appear in this world**"
    cost = effect.get("cost")
    cost_text = ("–" if cost is None else
                 f"{effect['cost_column']} {_format('', cost)}")
    lines.append(f"| {effect['description']} | {effect.get('comparison') or '–'} | "
                 f"{_format(name, effect.get('interval'))} | {_rule(name)} | {verdict} | "
                 f"{cost_text} |")
  return "\n".join(lines)


def why_list(effects: dict) -> str:
  """One line per effect: the mechanism the world builds in that produces it."""
  return "\n".join(f"- **{e['description']}**: {e['why']}." for e in effects.values()
                   if e.get("why"))


def timings_table(timings: dict) -> str:
  """Each stage's seconds, its share, and the total."""
  return experiment_report.timings_table(timings)


def markdown(results: dict, reports: dict, command: str) -> str:
  """``report.md``: the command, the effects table, timings, the prior fit, the parts' tables."""
  parts = [
      "# glajax demo report", "",
      f"Produced by `{command}` in {sum(results.get('timings_s', {}).values()):.0f} s"
      + (" (first run)" if results.get("rerun_timings_s") else "") + ".", "",
      "The world is procedural (patterned, coloured tiles × domains, "
      f"{results.get('world', {}).get('classes', '?')} classes); every part is an ordinary "
      "`glajax run` config run by the same runner, with its own report. Accuracies and ECE are "
      "in percent, their differences in the effects table in percentage points (pp), each "
      "with its 95 % paired bootstrap interval over the same test rows. An effect appears only "
      "when its interval excludes 0 on the claimed side; one that did not is reported as such, "
      "not tuned away. The cost is what the same comparison does to the other metric.", "",
      "## Effects", "", effects_table(results.get("effects", {})), "",
      "Why this world produces each effect:", "", why_list(results.get("effects", {})), ""]
  test_size = results.get("world", {}).get("splits", {}).get("test_photo")
  if test_size:
    parts += [f"Each test split holds {test_size} images (balanced over the classes).", ""]
  prior = results.get("prior", {})
  if "slope" in prior:
    parts += ["The foundation models are pre-trained with CLIP's image→text loss over every "
              "distinct caption of the world, whose optimum is log p(caption | image): their "
              "zero-shot logits carry the pre-training label prior, as GLA assumes of web-scale "
              "CLIP. The estimated log prior against the true one has slope "
              f"{prior['slope']:.2f} (1 at that optimum) and Spearman ρ {prior['spearman']:.2f} "
              "(`prior.png`). With in-batch negatives the optimum would be the pointwise mutual "
              "information log p(caption | image) / p(caption), which carries no prior.", ""]
  parts += ["## Timings", "", timings_table(results.get("timings_s", {})), ""]
  if results.get("rerun_timings_s"):
    parts += [f"(The first run's. This invocation reused the cache: "
              f"{sum(results['rerun_timings_s'].values()):.0f} s.)", ""]
  for name, part in reports.items():
    parts += [f"## Part `{name}` ([report]({name}/report.md))", ""]
    parts += [experiment_report.markdown_table(t) + "\n" for t in part["tables"]]
    parts += [f"![{p[:-4]}]({name}/{p})" for p in part["plots"]] + [""]
  return "\n".join(parts) + "\n"


def write(workdir: str, results: dict, reports: dict, true_counts, *, quick: bool) -> dict:
  """Writes report.json, report.md and prior.png into ``workdir``; returns their paths."""
  command = COMMAND.format(workdir=workdir, quick=" --quick" if quick else "")
  files = {"json": os.path.join(workdir, "report.json"),
           "markdown": os.path.join(workdir, "report.md"), "plots": []}
  if "gla" in reports:
    path = os.path.join(workdir, "prior.png")
    experiment_report.render(path, experiment_report.PriorPlot(
        np.asarray(reports["gla"]["results"]["log_prior"]), np.asarray(true_counts),
        "true prior (pre-training class frequency)"))
    files["plots"].append(path)
  content = {**results, "command": command}
  io.write_json(files["json"], io.finite_or_none(content), allow_nan=False)
  io.write_text(files["markdown"], markdown(results, reports, command))
  return files

"""Reports: ``report.json`` (every number), ``report.md`` (tables in the papers' layouts with the
published numbers alongside, and where every array came from) and PNG plots.

A table is a dict ``{"title", "columns", "rows": [{"label", "values"}], "published": [...]}``;
values are fractions, shown in percent. Published rows come from the package asset
``published.json`` (the papers' numbers, each with its source and setting): ``config.published``
names the entry (``table``, e.g. ``"wise_ft/vit_b16_table5"``), pairs our row labels with its
own (``rows``: (ours, theirs) pairs) and maps our columns to its own (``columns``). A plot is
a small dataclass whose ``draw(figure)`` draws it; :func:`write` renders each into its PNG.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from glajax import io, methods as M, parallel
from glajax.data import assets
from glajax.experiments import config as config_lib


def published_entry(path: str | None):
  """(paper entry, table entry) of ``published.json`` at ``"paper/table"`` (or ``"paper"``)."""
  if not path:
    return None, None
  paper, _, name = path.partition("/")
  content = assets.load_json("published.json")
  if paper not in content or (name and name not in content[paper]):
    raise KeyError(f"published.json has no entry {path!r}")
  return content[paper], (content[paper][name] if name else None)


def _published_rows(published, columns, context) -> tuple[list[dict], str]:
  """Our-layout rows of the published table that ``published`` names, and its citation.
  A published row name may hold ``{key}`` fields, filled from ``context`` (e.g. the shots)."""
  if not published or not published.get("table"):
    return [], ""
  paper, entry = published_entry(published["table"])
  notes = [paper["source"]]
  if entry is None:
    notes += [paper[k] for k in ("headline_claims", "note") if k in paper]
    return [], " ".join(notes)
  notes.append(entry.get("setting", ""))
  their_columns = entry.get("columns", [])
  rows = []
  for ours, theirs in published.get("rows", ()):
    values = entry["rows"].get(theirs.format(**(context or {})))
    if values is None:
      continue
    # A table of one number per row (e.g. GLA's accuracy per shot count) fills the ID column.
    by_column = dict(zip(their_columns, values)) if isinstance(values, list) else {"ID": values}
    mapped = {c: by_column.get(published.get("columns", {}).get(c, c)) for c in columns}
    rows.append({"label": ours, "values": {c: None if v is None else v / 100
                                           for c, v in mapped.items()}})
  return rows, ", ".join(n for n in notes if n)


def table(title: str, columns, rows, published=None, labels: Mapping[str, str] | None = None,
          context: Mapping | None = None) -> dict:
  """A report table; ``rows`` are (label, {column: value}); ``labels`` maps column keys to the
  headers shown (the papers' notation); published rows from ``published`` (see the module
  docstring) are attached with their source; ``context`` fills fields of their row names."""
  columns = list(columns)
  published_rows, source = _published_rows(published, columns, context)
  return {
      "title": title, "columns": columns,
      "headers": [dict(labels or {}).get(c, c) for c in columns],
      "rows": [{"label": label, "values": {c: _number(row.get(c)) for c in columns}}
               for label, row in rows],
      "published": published_rows, "published_source": source,
  }


def _number(value):
  if value is None:
    return None
  value = float(value)
  return value if np.isfinite(value) else None


def _cell(value) -> str:
  return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(entry: dict) -> str:
  """A table in Markdown: our rows, then the published ones in italics, with their source."""
  columns = entry["columns"]
  headers = entry.get("headers") or columns
  lines = [f"### {entry['title']}", "", "| | " + " | ".join(headers) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for row in entry["rows"]:
    lines.append(f"| {row['label']} | "
                 + " | ".join(_cell(row["values"][c]) for c in columns) + " |")
  for row in entry["published"]:
    lines.append(f"| *{row['label']} — published* | "
                 + " | ".join(f"*{_cell(row['values'][c])}*" for c in columns) + " |")
  if entry["published_source"]:
    lines += ["", f"Published: {entry['published_source']}."]
  return "\n".join(lines)


def _flat(tree: Mapping, prefix: str = "") -> list[tuple[str, object]]:
  items = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      items += _flat(value, f"{prefix}{key}.")
    else:
      items.append((f"{prefix}{key}", value))
  return items


def recipe_table(train: Mapping) -> str:
  """Every value of a recipe config, one row each (what ran, for the report)."""
  skipped = ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard")
  lines = ["| key | value |", "|---|---|"]
  lines += [f"| `{key}` | `{value}` |" for key, value in _flat(train) if key not in skipped]
  return "\n".join(lines)


def ledger_table(ledger: Sequence[dict]) -> str:
  """Where every array came from: role, purpose, config key, data and rows."""
  lines = ["| role | purpose | config key | data | rows | classes |", "|---|---|---|---|---|---|"]
  lines += [f"| {e['role']} | {e['purpose']} | `{e['key']}` | {e['data']} | {e['rows']} | "
            f"{e['classes']} |" for e in ledger]
  return "\n".join(lines)


# -------------------------------------------------------------------------------------- plots


@dataclasses.dataclass
class WiseFTCurve:
  """ID against mean shifted accuracy along α (each point labelled by its α)."""
  curve: list[dict]

  def draw(self, figure):
    ax = figure.subplots()
    shift = "avg shifts" if "avg shifts" in self.curve[0] else "ID"
    x = [100 * p["ID"] for p in self.curve]
    y = [100 * p[shift] for p in self.curve]
    ax.plot(x, y, "o-")
    for p, xi, yi in zip(self.curve, x, y):
      ax.annotate(f"α={p['alpha']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                  fontsize=7)
    ax.set_xlabel("ID accuracy (%)")
    ax.set_ylabel("accuracy, mean over shifts (%)" if shift != "ID" else "ID accuracy (%)")
    ax.set_title("WiSE-FT: zero-shot (α=0) to fine-tuned (α=1)")


@dataclasses.dataclass
class Reliability:
  """One reliability panel per domain: name -> (logits, labels), with ECE and bin counts."""
  panels: dict[str, dict[str, tuple]]
  num_bins: int = 15

  def draw(self, figure):
    axes = np.atleast_1d(figure.subplots(1, len(self.panels), squeeze=False)[0])
    figure.set_size_inches(4 * len(self.panels), 4)
    for ax, (domain, outputs) in zip(axes, self.panels.items()):
      for name, (logits, labels) in outputs.items():
        diagram = M.reliability_diagram(logits, labels, num_bins=self.num_bins)
        counts = np.asarray(diagram["count"])
        keep = counts > 0
        ece = float(M.ece(logits, labels, num_bins=self.num_bins))
        ax.plot(np.asarray(diagram["confidence"])[keep], np.asarray(diagram["accuracy"])[keep],
                "o-", label=f"{name} (ECE {100 * ece:.1f}, n={int(counts.sum())})")
      ax.plot([0, 1], [0, 1], "k--", lw=0.8)
      ax.set_xlabel("confidence")
      ax.set_ylabel("accuracy")
      ax.set_title(f"Reliability: {domain}")
      ax.legend(fontsize=7)


@dataclasses.dataclass
class PriorPlot:
  """The estimated log prior against a reference (the true prior, or the training label
  frequency): a log-log scatter with y = x, Spearman ρ and the slope in the title."""
  estimated: np.ndarray
  reference: np.ndarray | None
  reference_label: str = "training label frequency"

  def draw(self, figure):
    ax = figure.subplots()
    estimated = np.asarray(self.estimated, np.float64)
    if (self.reference is None or np.ptp(np.asarray(self.reference, np.float64)) == 0
        or np.ptp(estimated) == 0):
      ax.plot(np.sort(estimated)[::-1], "o", ms=3)
      ax.set_xlabel("class (sorted by estimated prior)")
      ax.set_ylabel("estimated log prior")
      ax.set_title("Estimated label prior")
      return
    reference = np.log(np.asarray(self.reference, np.float64))
    reference -= np.log(np.exp(reference).sum())
    rho = stats.spearmanr(reference, estimated).statistic
    slope = np.polyfit(reference, estimated, 1)[0]
    ax.scatter(reference, estimated, s=8)
    lo, hi = min(reference.min(), estimated.min()), max(reference.max(), estimated.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xlabel(f"log {self.reference_label}")
    ax.set_ylabel("estimated log prior")
    ax.set_title(f"Label prior: Spearman ρ {rho:.2f}, slope {slope:.2f}")
    ax.legend(fontsize=7)


@dataclasses.dataclass
class AusucPlot:
  """Acc_{S/Y} against Acc_{U/Y} as γ varies, with the chosen γ's marked."""
  curves: dict[str, tuple]       # name -> (area, {"seen", "absent"})
  points: dict[str, tuple]       # name -> (Acc_{S/Y}, Acc_{U/Y})

  def draw(self, figure):
    ax = figure.subplots()
    for name, (area, curve) in self.curves.items():
      ax.plot(100 * np.asarray(curve["seen"]), 100 * np.asarray(curve["absent"]),
              label=f"{name} (AUSUC {100 * area:.1f})")
    for (name, (seen, absent)), marker in zip(self.points.items(), "osD^v<>"):
      ax.plot(100 * seen, 100 * absent, marker, ms=7, label=name)
    ax.set_xlabel("Acc_{S/Y}, seen classes (%)")
    ax.set_ylabel("Acc_{U/Y}, absent classes (%)")
    ax.set_title("Seen–absent trade-off as γ varies")
    ax.legend(fontsize=7)


def render(path: str, plot) -> None:
  """Draws ``plot`` into the PNG ``path``, atomically."""
  import matplotlib  # noqa  (matplotlib: when drawing only)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa  (after use("Agg"))
  figure = plt.figure(figsize=(5, 4))
  try:
    plot.draw(figure)
    figure.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)
  finally:
    plt.close(figure)


# ------------------------------------------------------------------------------------- writing


def _final_models(workdir: str) -> dict[str, str]:
  final = os.path.join(workdir, "final")
  if not os.path.isdir(final):
    return {}
  return {name: os.path.join(final, name) for name in sorted(os.listdir(final))
          if os.path.isdir(os.path.join(final, name))}


def markdown(report: dict) -> str:
  parts = [f"# glajax experiment: {report['experiment']}", "",
           f"Produced by `{report['command']}` (config fingerprint {report['fingerprint']}); "
           "every number is in `report.json`, accuracies and ECE in percent.", "", "## Results",
           ""]
  for entry in report["tables"]:
    parts += [markdown_table(entry), ""]
  train = report["config"].get("train")
  if train:
    parts += ["## Recipe", "", f"`{train.get('recipe', '?')}` as it ran (the config's `train`; "
              "steps from the data when `total_steps` ≤ 0):", "", recipe_table(train), ""]
  if report.get("ledger"):
    parts += ["## Data", "", "Where every array came from: fitted ones (fine-tuning, priors, "
              "temperatures, γ) never share a row with a test set.", "",
              ledger_table(report["ledger"]), ""]
  if report["plots"]:
    parts += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in report["plots"]] + [""]
  if report["final_models"]:
    parts += ["## Final models", "", "CLIPs in transformers format (`config.json`, "
              "`model.safetensors`), classifier heads in `head.npz`, prompt residuals in "
              "`prompt_residuals.npz`.", ""]
    parts += [f"- `{name}`: `{path}`" for name, path in report["final_models"].items()] + [""]
  return "\n".join(parts)


def write(exp, outcome: dict) -> dict:
  """Writes report.json, report.md and the plots into the work directory; returns the report."""
  config = exp.config
  plots = dict(outcome.get("plots", {}))
  report = {
      "experiment": config.experiment,
      "command": f"glajax run {config.get('config_spec', '<config>')} --workdir {exp.workdir}",
      "fingerprint": config_lib.fingerprint(config),
      "config": json.loads(config.to_json_best_effort()),
      "results": outcome["results"], "tables": outcome["tables"], "plots": list(plots),
      "ledger": list(exp.ledger), "logits_files": list(exp.logits_files),
      "final_models": _final_models(exp.workdir),
  }
  if parallel.is_primary():  # one writer; the other processes return the same report
    for filename, plot in plots.items():
      render(exp.path(filename), plot)
    io.write_json(exp.path("report.json"), report)
    io.write_text(exp.path("report.md"), markdown(report))
  parallel.barrier("glajax report")
  return report

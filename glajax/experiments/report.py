"""Reports: ``report.json`` (every number), ``report.md`` (tables in the papers' layouts, with the
published numbers alongside) and PNG plots (matplotlib, Agg backend).

A table is a dict ``{"title", "columns", "rows": [{"label", "values"}], "published": [...]}``;
values are fractions, shown in percent. Published rows come from ``config.published.rows``
(row label -> column -> value), with ``config.published.source`` naming the paper's table.
"""
from __future__ import annotations

import json
import os

import numpy as np

PLOTS = ("wise_ft_curve", "reliability", "prior", "ausuc")


def table(title: str, columns, rows, published=None) -> dict:
  """A report table; ``rows`` are (label, {column: value}); published rows whose label matches
  one of ours are attached from ``published.values``."""
  values = {} if published is None else published.get("rows", {})
  labels = [label for label, _ in rows]
  return {
      "title": title, "columns": list(columns),
      "rows": [{"label": label, "values": {c: _number(row.get(c)) for c in columns}}
               for label, row in rows],
      "published": [{"label": label, "values": {c: _number(values[label].get(c))
                                                for c in columns}}
                    for label in labels if label in values],
      "published_source": "" if published is None else published.get("source", ""),
  }


def _number(value):
  if value is None:
    return None
  value = float(value)
  return value if np.isfinite(value) else None


def _cell(value) -> str:
  return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(entry: dict) -> str:
  """A table in Markdown: our rows, then the published ones in italics."""
  columns = entry["columns"]
  lines = [f"### {entry['title']}", "", "| | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for row in entry["rows"]:
    lines.append(f"| {row['label']} | "
                 + " | ".join(_cell(row["values"][c]) for c in columns) + " |")
  for row in entry["published"]:
    lines.append(f"| *{row['label']} — published* | "
                 + " | ".join(f"*{_cell(row['values'][c])}*" for c in columns) + " |")
  if entry["published"]:
    lines += ["", f"Published: {entry['published_source']}."]
  return "\n".join(lines)


# -------------------------------------------------------------------------------------- plots


def _wise_ft_curve(ax, curve):
  shift = "avg shifts" if "avg shifts" in curve[0] else "ID"
  ax.plot([p["ID"] for p in curve], [p[shift] for p in curve], "o-")
  for p in curve:
    ax.annotate(f"α={p['alpha']:g}", (p["ID"], p[shift]), fontsize=7)
  ax.set_xlabel("ID accuracy")
  ax.set_ylabel("accuracy, mean over shifts" if shift != "ID" else "ID accuracy")
  ax.set_title("WiSE-FT: zero-shot (α=0) to fine-tuned (α=1)")


def _reliability(ax, outputs, num_bins):
  from glajax import methods as M  # pylint: disable=import-outside-toplevel
  for name, (logits, labels) in outputs.items():
    diagram = M.reliability_diagram(logits, labels, num_bins=num_bins)
    keep = np.asarray(diagram["count"]) > 0
    ece = float(M.ece(logits, labels, num_bins=num_bins))
    ax.plot(np.asarray(diagram["confidence"])[keep], np.asarray(diagram["accuracy"])[keep],
            "o-", label=f"{name} (ECE {100 * ece:.1f})")
  ax.plot([0, 1], [0, 1], "k--", lw=0.8)
  ax.set_xlabel("confidence")
  ax.set_ylabel("accuracy")
  ax.set_title("Reliability diagram")
  ax.legend(fontsize=7)


def _prior(ax, log_prior, counts, counts_label="training label frequency"):
  order = np.argsort(-np.asarray(log_prior))
  ax.plot(np.exp(np.asarray(log_prior)[order]), label="estimated prior")
  counts = np.asarray(counts, np.float64)
  if counts.sum() > 0:
    ax.plot(counts[order] / counts.sum(), label=counts_label, alpha=0.7)
  ax.set_yscale("log")
  ax.set_xlabel("class (sorted by estimated prior)")
  ax.set_ylabel("probability")
  ax.set_title("Label prior")
  ax.legend(fontsize=7)


def _ausuc(ax, curves):
  for name, (area, curve) in curves.items():
    ax.plot(curve["seen"], curve["absent"], label=f"{name} (AUSUC {100 * area:.1f})")
  ax.set_xlabel("Acc S/Y (seen classes)")
  ax.set_ylabel("Acc U/Y (absent classes)")
  ax.set_title("Seen–absent trade-off as γ varies")
  ax.legend(fontsize=7)


_DRAW = {"wise_ft_curve": _wise_ft_curve, "reliability": _reliability, "prior": _prior,
         "ausuc": _ausuc}


def plot(path: str, kind: str, *data) -> None:
  """Draws plot ``kind`` (``wise_ft_curve``, ``reliability``, ``prior`` or ``ausuc``) of
  ``data`` into the PNG ``path``, atomically."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5, 4))
  try:
    _DRAW[kind](ax, *data)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp.png", dpi=110)
    os.replace(f"{path}.tmp.png", path)
  finally:
    plt.close(fig)


# ------------------------------------------------------------------------------------- writing


def json_default(value):
  """``json.dumps(default=...)`` for NumPy scalars and arrays."""
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, np.floating):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, "__array__"):
    return np.asarray(value).tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename: never half-written."""
  with open(f"{path}.tmp", "w") as f:
    f.write(text)
  os.replace(f"{path}.tmp", path)


def _final_models(workdir: str) -> dict[str, str]:
  final = os.path.join(workdir, "final")
  if not os.path.isdir(final):
    return {}
  return {name: os.path.join(final, name) for name in sorted(os.listdir(final))
          if os.path.isfile(os.path.join(final, name, "config.json"))
          or os.path.isfile(os.path.join(final, name, "head.npz"))
          or os.path.isfile(os.path.join(final, name, "prompt_residuals.npz"))}


def markdown(report: dict) -> str:
  parts = [f"# glajax experiment: {report['experiment']}", "",
           f"Produced by `{report['command']}` (config fingerprint {report['fingerprint']}); "
           "every number is in `report.json`, accuracies in percent.", "", "## Results", ""]
  for entry in report["tables"]:
    parts += [markdown_table(entry), ""]
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
  from glajax.experiments import config as config_lib  # pylint: disable=import-outside-toplevel
  from glajax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  config = exp.config
  plots = list(outcome.get("plots", {}))
  report = {
      "experiment": config.experiment,
      "command": f"glajax run {config.get('config_spec', '<config>')} --workdir {exp.workdir}",
      "fingerprint": config_lib.fingerprint(config),
      "config": json.loads(config.to_json_best_effort()),
      "results": outcome["results"], "tables": outcome["tables"], "plots": plots,
      "final_models": _final_models(exp.workdir),
  }
  if mesh_lib.is_primary():  # one writer; the other processes return the same report
    for filename, (kind, *data) in outcome.get("plots", {}).items():
      plot(exp.path(filename), kind, *data)
    write_atomic(exp.path("report.json"), json.dumps(report, indent=2, default=json_default))
    write_atomic(exp.path("report.md"), markdown(report))
  mesh_lib.barrier("glajax report")
  return report

"""Reports: ``report.json`` (every number), ``report.md`` (tables in the papers' layouts with the
published numbers alongside, and where every array came from) and PNG plots. Both open with the
warnings of ``diagnostics`` (``warnings``: a model that is random, an accuracy at chance,
training that did not learn, a degenerate prior) and carry every check's numbers.

A table is a dict ``{"title", "columns", "rows": [{"label", "values"}], "published": [...]}``;
values are fractions, shown in percent. Published rows come from the package asset
``published.json`` (the papers' numbers, each with its source and setting): ``config.published``
names the entry (``table``, e.g. ``"wise_ft/vit_b16_table5"``), pairs our row labels with its
own (``rows``: (ours, theirs) pairs) and maps our columns to its own (``columns``). They are
printed as a comparison only when the run's setting (backbones, recipe, options, data) is the
table's (:func:`setting_differences`); otherwise apart, labelled with what differs. A plot is
a small dataclass whose ``draw(figure)`` draws it; :func:`write` renders each into its PNG.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from glajax import io, methods as M, parallel
from glajax.data import assets
from glajax.experiments import config as config_lib
from glajax.experiments import diagnostics as diagnostics_lib


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
  setting = entry.get("setting", {})
  notes.append(setting.get("text", "") if isinstance(setting, Mapping) else str(setting))
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
          context: Mapping | None = None, effects: bool = False, rows_of: str = "test") -> dict:
  """A report table; ``rows`` are (label, {column: value}), a value a number or an
  ``M.Interval`` (its estimate shown with its 95 % interval); ``labels`` maps column keys to
  the headers shown (the papers' notation); published rows from ``published`` (see the module
  docstring) are attached with their source; ``context`` fills fields of their row names.
  ``effects``: the values are differences (signed, and an interval that excludes 0 marked as
  an effect that appears); ``rows_of``: what the intervals resample ("test", "validation")."""
  columns = list(columns)
  published_rows, source = _published_rows(published, columns, context)
  entry = published_entry(published.get("table") if published else None)[1] or {}
  setting = entry.get("setting")
  return {
      "title": title, "columns": columns,
      "headers": [dict(labels or {}).get(c, c) for c in columns],
      "rows": [_row(label, row, columns) for label, row in rows], "effects": effects,
      "rows_of": rows_of,
      "published": published_rows, "published_source": source,
      "published_setting": setting if isinstance(setting, Mapping) else None,
      "published_apart": [], "published_differs": [],
  }


def _config_value(config, key: str):
  node = config
  for part in key.split("."):
    node = node.get(part) if hasattr(node, "get") else None
  return node


def backbone_name(checkpoint: str) -> str:
  """A checkpoint's backbone as ``published.json``'s ``_checkpoints`` names it (else as given)."""
  return assets.load_json("published.json")["_checkpoints"].get(checkpoint, checkpoint)


def setting_differences(setting: Mapping | None, config) -> list[str]:
  """What in the run ``config`` differs from a published table's ``setting`` (its backbones,
  recipe, recipe options and datasets): one "<what>: ours …, published …" each; [] when the
  table is the run's setting (or states none)."""
  if not setting:
    return []
  differs = []
  ours = sorted(backbone_name(c) for c in config.model.checkpoints)
  if "backbones" in setting and ours != sorted(setting["backbones"]):
    differs.append(f"backbone: ours {', '.join(ours)}, published "
                   f"{', '.join(setting['backbones'])}")
  recipe = setting.get("recipe")
  allowed = [recipe] if isinstance(recipe, str) else list(recipe or [])
  ours_recipe = config.get("train", {}).get("recipe")
  if allowed and ours_recipe not in allowed:
    differs.append(f"recipe: ours {ours_recipe}, published {' or '.join(allowed)}")
  for key, value in setting.get("options", {}).items():
    if _config_value(config, key) != value:
      differs.append(f"{key}: ours {_config_value(config, key)}, published {value}")
  for key, dataset in setting.get("data", {}).items():
    found = config_lib.dataset_spec(config.data.get(key) or "")[0]
    if found != dataset:
      differs.append(f"data.{key}: ours {found}, published {dataset}")
  return differs


def place_published(entry: dict, config) -> dict:
  """Moves ``entry``'s published rows apart (``published_apart``, with ``published_differs``)
  when the run's setting is not the table's; in place, returns ``entry``."""
  differs = setting_differences(entry.get("published_setting"), config)
  if differs and entry.get("published"):
    entry["published_apart"], entry["published"] = entry["published"], []
    entry["published_differs"] = differs
  return entry


def _number(value):
  if value is None:
    return None
  value = float(value)
  return value if np.isfinite(value) else None


def _row(label: str, row: Mapping, columns) -> dict:
  """{"label", "values", "intervals"}: each value's estimate, and [low, high] of the values
  that are intervals (``M.Interval``)."""
  values, intervals = {}, {}
  for c in columns:
    value = row.get(c)
    if isinstance(value, M.Interval):
      intervals[c] = [_number(value.low), _number(value.high)]
      value = value.estimate
    values[c] = _number(value)
  out = {"label": label, "values": values}
  if intervals:
    out["intervals"] = intervals
  return out


def _cell(value, interval=None, signed: bool = False) -> str:
  """A value in percent with its interval, e.g. 81.3 [80.9, 81.7]; a signed effect whose
  interval excludes 0 is bold."""
  if value is None:
    return "–"
  form = "{:+.1f}" if signed else "{:.1f}"
  show = lambda v: form.format(round(100 * v, 1) + 0.0)   # no "-0.0"  # noqa
  text = show(value)
  if interval is None or None in interval:
    return text
  text += " [" + ", ".join(show(v) for v in interval) + "]"
  return f"**{text}**" if signed and (interval[0] > 0 or interval[1] < 0) else text


def markdown_table(entry: dict) -> str:
  """A table in Markdown: our rows, then the published ones in italics, with their source."""
  columns = entry["columns"]
  headers = entry.get("headers") or columns
  lines = [f"### {entry['title']}", "", "| | " + " | ".join(headers) + " |",
           "|---" * (len(columns) + 1) + "|"]
  signed = entry.get("effects", False)
  for row in entry["rows"]:
    intervals = row.get("intervals", {})
    lines.append(f"| {row['label']} | " + " | ".join(
        _cell(row["values"][c], intervals.get(c), signed) for c in columns) + " |")
  if any(row.get("intervals") for row in entry["rows"]):
    lines += ["", f"In brackets: 95 % bootstrap intervals over the {entry.get('rows_of', 'test')} "
              "rows"
              + ("; paired (both rows' models on the same resampled rows), bold where the "
                 "interval excludes 0 (the change appears)." if signed else ".")]
  for row in entry["published"]:
    lines.append(f"| *{row['label']} — published* | "
                 + " | ".join(f"*{_cell(row['values'][c])}*" for c in columns) + " |")
  if entry.get("published_apart"):
    lines += ["", "Published in another setting, not a comparison ("
              + "; ".join(entry["published_differs"]) + "):", "",
              "| | " + " | ".join(headers) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| *{row['label']}* | " + " | ".join(
        f"*{_cell(row['values'][c])}*" for c in columns) + " |" for row in entry["published_apart"]]
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
  skipped = ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard",
             "wandb")
  lines = ["| key | value |", "|---|---|"]
  lines += [f"| `{key}` | `{value}` |" for key, value in _flat(train) if key not in skipped]
  return "\n".join(lines)


def preprocessing_text(record: Mapping) -> str:
  """The transforms, normalisation and prompt templates a run used (``Experiment.preprocessing``),
  as Markdown lines."""
  lines = []
  if record.get("train_text"):
    lines.append(f"- training images: {record['train_text']}")
  lines.append(f"- evaluation images: {record['eval_text']}")
  norm = record["normalization"]
  lines.append(f"- normalisation: mean {tuple(norm['mean'])}, std {tuple(norm['std'])}")
  for what, templates in record.get("prompts", {}).items():
    shown = ", ".join(f"\"{t}\"" for t in templates[:3]) + (
        f" … ({len(templates)} templates)" if len(templates) > 3 else "")
    lines.append(f"- prompts of the {what}: {shown}")
  return "\n".join(lines)


def ledger_table(ledger: Sequence[dict]) -> str:
  """Where every array came from: role, purpose, config key, data and rows."""
  lines = ["| role | purpose | config key | data | rows | classes |", "|---|---|---|---|---|---|"]
  lines += [f"| {e['role']} | {e['purpose']} | `{e['key']}` | {e['data']} | {e['rows']} | "
            f"{e['classes']} |" for e in ledger]
  return "\n".join(lines)


def timings_table(timings: Mapping[str, float], total: float | None = None) -> str:
  """Wall-clock time of each stage, its share of the total and the total (``total``, when
  given, also shows the time outside the stages as "other")."""
  stages = dict(timings)
  spent = sum(stages.values())
  if total is not None and total - spent >= 0.05:
    stages["other (post-hoc methods, data, reports)"] = total - spent
  total = max(total or 0.0, spent)
  lines = ["| stage | seconds | share |", "|---|---:|---:|"]
  lines += [f"| {stage} | {seconds:.1f} | {100 * seconds / max(total, 1e-9):.0f}% |"
            for stage, seconds in stages.items()]
  lines.append(f"| total | {total:.1f} | 100% |")
  return "\n".join(lines)


# -------------------------------------------------------------------------------------- plots

_MARKERS = "osD^v<>pP*"


def _label_points(ax, xy, texts, fontsize: float = 7) -> list:
  """Labels each point of ``xy`` (data coordinates, markers of ``markersize`` 6 or less) with its
  text, beside it where the text's box covers no marker, no earlier label and stays inside the
  figure (the first of eight places around the point that fits; else the least-covering one).
  Call once the figure's layout is final; returns the texts."""
  figure = ax.figure
  renderer = figure.canvas.get_renderer()
  px = figure.dpi / 72
  centres = ax.transData.transform(np.asarray(xy, np.float64).reshape(-1, 2))
  radius = 4 * px  # half a 6-point marker, plus a margin
  markers = [(x - radius, y - radius, x + radius, y + radius) for x, y in centres]
  gap = 6
  places = [(gap, gap, "left", "bottom"), (gap, -gap, "left", "top"),
            (-gap, gap, "right", "bottom"), (-gap, -gap, "right", "top"),
            (0, gap + 2, "center", "bottom"), (0, -gap - 2, "center", "top"),
            (gap + 2, 0, "left", "center"), (-gap - 2, 0, "right", "center")]
  fig_box = figure.bbox.extents
  placed, boxes = [], []
  for point, text in zip(np.asarray(xy).reshape(-1, 2), texts):
    best = None
    for dx, dy, ha, va in places:
      label = ax.annotate(text, tuple(point), textcoords="offset points", xytext=(dx, dy),
                          ha=ha, va=va, fontsize=fontsize)
      box = label.get_window_extent(renderer).extents
      cost = sum(_overlap(box, other) for other in markers + boxes) + (
          0 if _inside(box, fig_box) else 1e6)
      if best is None or cost < best[0]:
        if best is not None:
          best[1].remove()
        best = (cost, label, box)
      else:
        label.remove()
      if cost == 0:
        break
    placed.append(best[1])
    boxes.append(best[2])
  return placed


def _overlap(a, b) -> float:
  """The area two boxes (x0, y0, x1, y1) share."""
  return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _inside(box, outer) -> bool:
  return box[0] >= outer[0] and box[1] >= outer[1] and box[2] <= outer[2] and box[3] <= outer[3]


@dataclasses.dataclass
class WiseFTCurve:
  """ID against mean shifted accuracy along α, each point labelled by its α beside its marker."""
  curve: list[dict]

  def draw(self, figure):
    ax = figure.subplots()
    shift = "avg shifts" if "avg shifts" in self.curve[0] else "ID"
    x = [100 * p["ID"] for p in self.curve]
    y = [100 * p[shift] for p in self.curve]
    ax.plot(x, y, "-", color="C0", lw=1)
    ax.plot(x[1:-1], y[1:-1], "o", color="C0", ms=5, label="WiSE-FT, 0 < α < 1")
    ax.plot(x[:1], y[:1], "s", color="C2", ms=6, label=f"zero-shot (α={self.curve[0]['alpha']:g})")
    ax.plot(x[-1:], y[-1:], "D", color="C3", ms=6,
            label=f"fine-tuned (α={self.curve[-1]['alpha']:g})")
    ax.margins(0.15)
    ax.set_xlabel("ID accuracy (%)")
    ax.set_ylabel("accuracy, mean over shifts (%)" if shift != "ID" else "ID accuracy (%)")
    ax.set_title("WiSE-FT: zero-shot (α=0) to fine-tuned (α=1)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)

  def annotate(self, figure):
    ax = figure.axes[0]
    shift = "avg shifts" if "avg shifts" in self.curve[0] else "ID"
    _label_points(ax, [(100 * p["ID"], 100 * p[shift]) for p in self.curve],
                  [f"α={p['alpha']:g}" for p in self.curve])


@dataclasses.dataclass
class Reliability:
  """One reliability panel per domain: name -> (logits, labels), with ECE in the legend and the
  number of samples in each confidence bin drawn under the curves (right axis)."""
  panels: dict[str, dict[str, tuple]]
  num_bins: int = 15

  def draw(self, figure):
    axes = np.atleast_1d(figure.subplots(1, len(self.panels), squeeze=False)[0])
    figure.set_size_inches(4 * len(self.panels), 4.8)
    edges = np.linspace(0, 1, self.num_bins + 1)
    for ax, (domain, outputs) in zip(axes, self.panels.items()):
      counts_ax = ax.twinx()
      for i, (name, (logits, labels)) in enumerate(outputs.items()):
        diagram = M.reliability_diagram(logits, labels, num_bins=self.num_bins)
        counts = np.asarray(diagram["count"])
        keep = counts > 0
        ece = float(M.ece(logits, labels, num_bins=self.num_bins))
        ax.plot(np.asarray(diagram["confidence"])[keep], np.asarray(diagram["accuracy"])[keep],
                "o-", color=f"C{i}", ms=4, label=f"{name} (ECE {100 * ece:.1f}%, "
                f"n={int(counts.sum())})", zorder=3)
        counts_ax.stairs(counts, edges, color=f"C{i}", alpha=0.35, fill=True)
      ax.plot([0, 1], [0, 1], "k--", lw=0.8)
      ax.set_xlim(0, 1)
      ax.set_ylim(0, 1)
      ax.set_zorder(counts_ax.get_zorder() + 1)  # curves over the bars
      ax.patch.set_visible(False)
      counts_ax.set_ylabel("samples per bin")
      ax.set_xlabel("confidence")
      ax.set_ylabel("accuracy")
      ax.set_title(f"Reliability: {domain}")
      ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))


def prior_fit(log_prior, counts) -> dict:
  """Spearman ρ, Pearson r of the logs and log-log slope of an estimated log prior against the
  normalised log of ``counts`` (slope 1 when the zero-shot logits carry exactly that prior);
  ρ and r are NaN when either is constant, the slope when the counts are."""
  reference = np.log(np.asarray(counts, np.float64) / np.sum(counts))
  estimated = np.asarray(log_prior, np.float64)
  nan = float("nan")
  if np.ptp(reference) == 0:   # equal counts: nothing to correlate with or regress on
    return {"spearman": nan, "pearson_log": nan, "slope": nan}
  slope = float(np.polyfit(reference, estimated, 1)[0])
  if np.ptp(estimated) == 0:   # a constant estimate: slope 0, no correlation
    return {"spearman": nan, "pearson_log": nan, "slope": slope}
  return {"spearman": float(stats.spearmanr(estimated, reference).statistic),
          "pearson_log": float(np.corrcoef(estimated, reference)[0, 1]), "slope": slope}


@dataclasses.dataclass
class PriorPlot:
  """The estimated log prior against a reference (the true prior, or the training label
  frequency): a log-log scatter with y = x, Spearman ρ and the slope in the title. Without a
  reference (or a flat one) the log prior alone, sorted; ``label`` names what is plotted."""
  estimated: np.ndarray
  reference: np.ndarray | None
  reference_label: str = "training label frequency"
  label: str = "estimated log prior"

  def draw(self, figure):
    ax = figure.subplots()
    estimated = np.asarray(self.estimated, np.float64)
    if (self.reference is None or np.ptp(np.asarray(self.reference, np.float64)) == 0
        or np.ptp(estimated) == 0):
      ax.plot(np.sort(estimated)[::-1], "o", ms=3)
      ax.set_xlabel(f"class (sorted by {self.label})")
      ax.set_ylabel(self.label)
      ax.set_title(f"{self.label[0].upper()}{self.label[1:]}, {len(estimated)} classes")
      return
    reference = np.log(np.asarray(self.reference, np.float64) / np.sum(self.reference))
    fit = prior_fit(estimated, self.reference)
    ax.scatter(reference, estimated, s=8, label="one class")
    lo, hi = min(reference.min(), estimated.min()), max(reference.max(), estimated.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xlabel(f"log {self.reference_label}")
    ax.set_ylabel(self.label)
    ax.set_title(f"Label prior: Spearman ρ {fit['spearman']:.2f}, slope {fit['slope']:.2f}")
    ax.legend(fontsize=7, loc="upper left")


@dataclasses.dataclass
class AusucPlot:
  """Acc_{S/Y} against Acc_{U/Y} as γ varies, with the chosen γ's marked (γ = 0 is the
  fine-tuned model itself)."""
  curves: dict[str, tuple]       # name -> (area, {"seen", "absent"})
  points: dict[str, tuple]       # name -> (Acc_{S/Y}, Acc_{U/Y})

  def draw(self, figure):
    ax = figure.subplots()
    figure.set_size_inches(7.5, 4)
    for name, (area, curve) in self.curves.items():
      ax.plot(100 * np.asarray(curve["seen"]), 100 * np.asarray(curve["absent"]), lw=1.2,
              label=f"{name} (AUSUC {100 * area:.1f}%)")
    for i, (name, (seen, absent)) in enumerate(self.points.items()):
      ax.plot(100 * seen, 100 * absent, _MARKERS[i % len(_MARKERS)], ms=7, mec="k", mew=0.6,
              color=f"C{(i + len(self.curves)) % 10}", label=name, zorder=3)
    ax.set_xlabel("Acc_{S/Y}, seen classes (%)")
    ax.set_ylabel("Acc_{U/Y}, absent classes (%)")
    ax.set_title("Seen–absent trade-off as γ varies")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))


@dataclasses.dataclass
class ComposePath:
  """Each recipe's path through its stages: ID against mean-shift accuracy (left) and ID
  accuracy against ID ECE (right), one line per recipe, each point a stage (zero-shot first)."""
  paths: dict[str, list]   # recipe -> [(stage label, {"ID", "avg shifts", "ECE ID": Interval})]

  def draw(self, figure):
    figure.set_size_inches(10, 4.2)
    left, right = figure.subplots(1, 2)
    for i, (recipe, path) in enumerate(self.paths.items()):
      value = lambda row, key: 100 * float(row[key].estimate if hasattr(row[key], "estimate")
                                           else row[key])
      ident = [value(row, "ID") for _, row in path]
      color = f"C{i % 10}"
      if all("avg shifts" in row for _, row in path):
        left.plot(ident, [value(row, "avg shifts") for _, row in path], "-o", color=color,
                  ms=4, lw=1, label=recipe)
        left.plot(ident[:1], [value(path[0][1], "avg shifts")], "s", color="k", ms=6)
      right.plot(ident, [value(row, "ECE ID") for _, row in path], "-o", color=color, ms=4,
                 lw=1, label=recipe)
    left.set_xlabel("ID accuracy (%)")
    left.set_ylabel("accuracy, mean over shifts (%)")
    left.set_title("accuracy: in and out of distribution")
    right.set_xlabel("ID accuracy (%)")
    right.set_ylabel("ID ECE (%)")
    right.set_title("accuracy against calibration")
    for ax in (left, right):
      ax.margins(0.15)
      ax.legend(fontsize=7)

  def annotate(self, figure):
    for ax, key in zip(figure.axes, ("avg shifts", "ECE ID")):
      points, texts = [], []
      for path in self.paths.values():
        for label, row in path:
          if key in row:
            get = lambda k: 100 * float(getattr(row[k], "estimate", row[k]))
            points.append((get("ID"), get(key)))
            texts.append(label.split(" (")[0].replace("+ ", ""))
      _label_points(ax, points, texts, fontsize=6)


def figure_of(plot):
  """A new figure with ``plot`` drawn and laid out (then its point labels placed, which needs
  the final layout); close it with ``matplotlib.pyplot.close``."""
  import matplotlib  # noqa  (matplotlib: when drawing only)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa  (after use("Agg"))
  figure = plt.figure(figsize=(5, 4))
  try:
    plot.draw(figure)
    figure.tight_layout()
    if hasattr(plot, "annotate"):
      plot.annotate(figure)
  except BaseException:
    plt.close(figure)
    raise
  return figure


def render(path: str, plot) -> None:
  """Draws ``plot`` into the PNG ``path``, atomically."""
  figure = figure_of(plot)
  import matplotlib.pyplot as plt  # noqa  (drawing only; after figure_of's use("Agg"))
  try:
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
  parts = [f"# glajax experiment: {report['experiment']}", ""]
  if report.get("warnings"):
    parts += diagnostics_lib.warnings_markdown(report["warnings"]) + [""]
  parts += [f"Produced by `{report['command']}` (config fingerprint {report['fingerprint']}); "
           "every number is in `report.json`, accuracies and ECE in percent.", "", "## Results",
           ""]
  for entry in report["tables"]:
    parts += [markdown_table(entry), ""]
  if report.get("diagnostics"):
    parts += diagnostics_lib.markdown(report["diagnostics"])
  if report.get("timings_s"):
    timings = dict(report["timings_s"])
    total = timings.pop("total", None)
    parts += ["## Timings", "", "This invocation only: stages reused from the cache take no "
              "time.", "", timings_table(timings, total), ""]
  if report.get("preprocessing"):
    parts += ["## Data pipeline", "", preprocessing_text(report["preprocessing"]), ""]
  train = report.get("train_as_run") or report["config"].get("train")
  if train:
    parts += ["## Recipe", "", f"`{train.get('recipe', '?')}` as it ran (the config's `train`"
              + (", resolved for this run" if report.get("train_as_run") else "")
              + "; steps from the data when `total_steps` ≤ 0):", "", recipe_table(train), ""]
  if report.get("ledger"):
    parts += ["## Data", "", "Where every array came from: fitted ones (fine-tuning, priors, "
              "temperatures, γ) never share a row with a test set.", "",
              ledger_table(report["ledger"]), ""]
  if report["plots"]:
    parts += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in report["plots"]] + [""]
  if report["final_models"]:
    parts += ["## Final models", "", "CLIP ViTs in transformers format (`config.json`, "
              "`model.safetensors`), CLIP ResNets in open_clip's (`open_clip_config.json`, "
              "`open_clip_model.safetensors`), classifier heads in `head.npz`, prompt residuals "
              "in `prompt_residuals.npz`.", ""]
    parts += [f"- `{name}`: `{path}`" for name, path in report["final_models"].items()] + [""]
  return "\n".join(parts)


def write(exp, outcome, fingerprint: str) -> dict:
  """Writes report.json, report.md and the plots of a kind's ``outcome`` (``kinds.common.
  Outcome``) into the work directory; returns the report."""
  config = exp.config
  plots = dict(outcome.plots)
  for entry in outcome.tables:
    place_published(entry, config)
  report = {
      "experiment": config.experiment,
      "command": f"glajax run {config.get('config_spec', '<config>')} --workdir {exp.workdir}",
      "fingerprint": fingerprint,
      "config": json.loads(config.to_json_best_effort()),
      "results": outcome.results, "tables": outcome.tables, "plots": list(plots),
      "ledger": list(exp.ledger), "logits_files": list(exp.logits_files),
      "final_models": _final_models(exp.workdir),
      "timings_s": {k: round(v, 2) for k, v in getattr(exp, "timings", {}).items()},
      "preprocessing": exp.preprocessing() if hasattr(exp, "preprocessing") else {},
  }
  report["diagnostics"], findings = diagnostics_lib.collect(exp, outcome)
  report["warnings"] = [f.as_json() for f in findings]
  if outcome.train_as_run:  # a recipe the kind resolved at run time (GLA per shot)
    report["train_as_run"] = outcome.train_as_run
  if hasattr(exp, "started"):  # this invocation's wall-clock time, up to the report
    report["timings_s"]["total"] = round(time.perf_counter() - exp.started, 2)
  if parallel.is_primary():  # one writer; the other processes return the same report
    for filename, plot in plots.items():
      render(exp.path(filename), plot)
    io.write_json(exp.path("report.json"), report)
    io.write_text(exp.path("report.md"), markdown(report))
  parallel.barrier("glajax report")
  return report


# ----------------------------------------------------------------------------------- seeds


def seed_table(entries: Sequence[dict], seeds: Sequence[int]) -> dict:
  """One table over seeds from each seed's same table (rows and columns in the same order):
  each cell's mean and sample standard deviation over the seeds, the mean half-width of the
  seeds' 95 % bootstrap intervals (the test rows' sampling noise, beside the seeds'), and for
  differences how many seeds' intervals exclude 0 on the side of the mean.

    mean = Σ_s v_s / n,  sd = √(Σ_s (v_s − mean)² / (n − 1)),  half = Σ_s (high_s − low_s) / 2n
  """
  first = entries[0]
  rows = []
  for i, row in enumerate(first["rows"]):
    cells = {}
    for c in first["columns"]:
      values = [e["rows"][i]["values"].get(c) for e in entries]
      if any(v is None for v in values):
        cells[c] = None
        continue
      values = np.asarray(values, np.float64)
      intervals = [e["rows"][i].get("intervals", {}).get(c) for e in entries]
      cell = {"mean": float(values.mean()),
              "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
              "values": values.tolist()}
      if all(iv is not None and None not in iv for iv in intervals):
        cell["half_width"] = float(np.mean([(hi - lo) / 2 for lo, hi in intervals]))
        side = np.sign(cell["mean"])
        cell["excludes_zero"] = int(sum((lo > 0) if side > 0 else (hi < 0)
                                        for lo, hi in intervals))
      cells[c] = cell
    rows.append({"label": row["label"], "labels": [e["rows"][i]["label"] for e in entries],
                 "cells": cells})
  return {"title": first["title"], "columns": first["columns"],
          "headers": first.get("headers") or first["columns"],
          "effects": bool(first.get("effects")), "seeds": list(seeds), "rows": rows}


def _seed_cell(cell, signed: bool, n: int) -> str:
  """mean ± sd (bootstrap ±half) in percent; differences with k/n seeds whose interval
  excludes 0."""
  if cell is None:
    return "–"
  show = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")  # noqa
  text = show(cell["mean"]) + (f" ± {100 * cell['sd']:.1f}" if cell["sd"] is not None else "")
  if "half_width" in cell:
    text += f" (±{100 * cell['half_width']:.1f})"
  if signed and "excludes_zero" in cell:
    text += f" {cell['excludes_zero']}/{n}"
  return text


def seed_markdown(combined: dict) -> str:
  """``report.md`` of a run over seeds: each table's cells as mean ± sd over the seeds."""
  seeds = combined["seeds"]
  lines = [f"# {combined['experiment']} over seeds {', '.join(map(str, seeds))}", "",
           f"Produced by `{combined['command']}`. Each seed's own report: "
           + ", ".join(f"[seed {s}](seed_{s}/report.md)" for s in seeds) + ".", "",
           f"A cell is the mean ± standard deviation over the {len(seeds)} seeds (fine-tuning, "
           "data order and every seeded choice redrawn), in percent; in parentheses the mean "
           "half-width of the seeds' 95 % bootstrap intervals over the test rows. A difference "
           "also says in how many seeds its paired interval excludes 0 on the side of the "
           "mean. Row labels are seed "
           f"{seeds[0]}'s (fitted values in them differ by seed).", ""]
  for table in combined["tables"]:
    signed, n = table["effects"], len(seeds)
    lines += [f"### {table['title']}", "", "| | " + " | ".join(table["headers"]) + " |",
              "|---" * (len(table["columns"]) + 1) + "|"]
    lines += [f"| {row['label']} | " + " | ".join(
        _seed_cell(row["cells"][c], signed, n) for c in table["columns"]) + " |"
        for row in table["rows"]]
    lines.append("")
  return "\n".join(lines) + "\n"


def combine_seeds(reports: Mapping[int, dict], command: str) -> dict:
  """The report over seeds of each seed's report (same config but the seed): every table
  whose shape agrees across seeds, by :func:`seed_table`."""
  seeds = list(reports)
  firsts = reports[seeds[0]]
  tables = []
  for i, entry in enumerate(firsts["tables"]):
    same = [reports[s]["tables"][i] for s in seeds if i < len(reports[s]["tables"])]
    if len(same) == len(seeds) and all(
        t["columns"] == entry["columns"] and len(t["rows"]) == len(entry["rows"]) for t in same):
      tables.append(seed_table(same, seeds))
  return {"experiment": firsts["experiment"], "command": command, "seeds": seeds,
          "runs": {str(s): f"seed_{s}" for s in seeds}, "tables": tables}


def write_seeds(workdir: str, combined: dict) -> None:
  """``report.json`` and ``report.md`` of a run over seeds into ``workdir``."""
  if parallel.is_primary():
    io.write_json(os.path.join(workdir, "report.json"), io.finite_or_none(combined),
                  allow_nan=False)
    io.write_text(os.path.join(workdir, "report.md"), seed_markdown(combined))
  parallel.barrier("glajax seeds report")

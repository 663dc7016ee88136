"""Every report plot, rendered from small synthetic data: its axes labels, title and legend, and
no text (point labels, legend entries, titles) covering a marker."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after use("Agg"))
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from glajax import methods as M  # noqa: E402
from glajax.experiments import report  # noqa: E402


def _logits(rng, n=200, c=5, scale=4.0):
  labels = rng.integers(0, c, n).astype(np.int32)
  logits = rng.normal(size=(n, c)).astype(np.float32)
  logits[np.arange(n), labels] += scale
  return logits, labels


def _wise_ft_curve():
  # A typical WiSE-FT curve: shifted accuracy peaks inside, points close together at the top.
  alphas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
  return [{"alpha": a, "ID": 0.60 + 0.2 * a, "avg shifts": 0.40 + 0.2 * a - 0.18 * a * a,
           "sketch": 0.4, "noise": 0.4} for a in alphas]


def _ausuc():
  rng = np.random.default_rng(0)
  logits, labels = _logits(rng, c=10, scale=2.0)
  absent = np.arange(10) >= 6
  logits[:, absent] -= 2.0  # the fine-tuned model's bias against absent classes
  area, curve = M.ausuc(logits, labels, absent, return_curve=True)
  points = {}
  for name, gamma in (("γ = 0 (fine-tuned)", 0.0), ("ALG γ = 2.50", 2.5), ("PCV γ = 3.10", 3.1),
                      ("oracle γ = 2.90 (on test)", 2.9)):
    row = M.seen_absent_accuracies(M.apply_gamma(logits, absent, gamma), labels, absent)
    points[name] = (float(row["acc_s_y"]), float(row["acc_u_y"]))
  return report.AusucPlot({"fine-tuned": (float(area), {k: np.asarray(v)
                                                         for k, v in curve.items()})}, points)


def _reliability():
  rng = np.random.default_rng(1)
  return report.Reliability({domain: {"zero-shot": _logits(rng, scale=s),
                                      "fine-tuned": _logits(rng, scale=2 * s)}
                             for domain, s in (("ID", 3.0), ("sketch", 1.0), ("noise", 0.5))},
                            num_bins=10)


def _prior():
  rng = np.random.default_rng(2)
  counts = np.exp(rng.normal(size=30) * 1.5)
  estimated = np.log(counts) + rng.normal(size=30) * 0.2
  return report.PriorPlot(estimated - np.log(np.exp(estimated).sum()), counts,
                          "true prior (pre-training class frequency)")


PLOTS = {
    "wise_ft": (lambda: report.WiseFTCurve(_wise_ft_curve()),
                dict(title="WiSE-FT", xlabel="ID accuracy (%)",
                     ylabel="accuracy, mean over shifts (%)", legend=True)),
    "reliability": (_reliability, dict(title="Reliability: ID", xlabel="confidence",
                                       ylabel="accuracy", legend=True)),
    "prior": (_prior, dict(title="Spearman ρ", xlabel="log true prior",
                           ylabel="estimated log prior", legend=True)),
    "ausuc": (_ausuc, dict(title="γ varies", xlabel="Acc_{S/Y}", ylabel="Acc_{U/Y}",
                           legend=True)),
}


def _marker_boxes(ax, renderer):
  """Display-space boxes (x0, y0, x1, y1) of every marker drawn in ``ax``."""
  boxes = []
  for line in ax.get_lines():
    if line.get_marker() in (None, "None", "", " ") or not line.get_visible():
      continue
    radius = line.get_markersize() / 2 * ax.figure.dpi / 72
    for x, y in ax.transData.transform(np.column_stack(line.get_data())):
      boxes.append((x - radius, y - radius, x + radius, y + radius))
  for collection in ax.collections:  # scatter points
    offsets = collection.get_offsets()
    if len(offsets) and hasattr(collection, "get_sizes") and len(collection.get_sizes()):
      radius = np.sqrt(collection.get_sizes()[0]) / 2 * ax.figure.dpi / 72
      for x, y in collection.get_offset_transform().transform(offsets):
        boxes.append((x - radius, y - radius, x + radius, y + radius))
  return boxes


def _texts(figure):
  """Every visible, non-empty text of the figure's axes: labels, titles, annotations and legend
  entries."""
  texts = []
  for ax in figure.axes:
    texts += list(ax.texts) + [ax.title, ax.xaxis.label, ax.yaxis.label]
    legend = ax.get_legend()
    if legend is not None:
      texts += list(legend.get_texts())
  return [t for t in texts if t.get_visible() and t.get_text()]


def _overlaps(a, b) -> bool:
  return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


@pytest.fixture(params=sorted(PLOTS))
def drawn(request):
  make, expected = PLOTS[request.param]
  figure = report.figure_of(make())
  figure.canvas.draw()
  yield request.param, figure, expected
  plt.close(figure)


def test_plot_has_labels_title_and_legend(drawn):
  name, figure, expected = drawn
  main = figure.axes[0]
  assert expected["title"] in main.get_title(), (name, main.get_title())
  assert expected["xlabel"] in main.get_xlabel(), (name, main.get_xlabel())
  assert expected["ylabel"] in main.get_ylabel(), (name, main.get_ylabel())
  if expected["legend"]:
    assert main.get_legend() is not None and main.get_legend().get_texts(), name


def test_no_text_covers_a_marker(drawn):
  name, figure, _ = drawn
  renderer = figure.canvas.get_renderer()
  markers = [box for ax in figure.axes for box in _marker_boxes(ax, renderer)]
  assert markers, name
  for text in _texts(figure):
    box = text.get_window_extent(renderer).extents
    covered = [m for m in markers if _overlaps(box, m)]
    assert not covered, (name, text.get_text(), box, covered[:3])


def test_text_stays_inside_the_figure(drawn):
  name, figure, _ = drawn
  renderer = figure.canvas.get_renderer()
  x0, y0, x1, y1 = figure.bbox.extents
  for text in _texts(figure):
    a, b, c, d = text.get_window_extent(renderer).extents
    assert a >= x0 - 1 and b >= y0 - 1 and c <= x1 + 1 and d <= y1 + 1, (name, text.get_text())


def test_wise_ft_labels_every_alpha_beside_its_marker():
  figure = report.figure_of(report.WiseFTCurve(_wise_ft_curve()))
  try:
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert labels == [f"α={a:g}" for a in [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]
  finally:
    plt.close(figure)


def test_reliability_has_a_panel_and_bin_counts_per_domain():
  plot = _reliability()
  figure = report.figure_of(plot)
  try:
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == [f"Reliability: {d}" for d in plot.panels]
    counts_axes = [ax for ax in figure.axes if ax.get_ylabel() == "samples per bin"]
    assert len(counts_axes) == len(plot.panels)
    for ax in counts_axes:  # one histogram per model, with samples in it
      assert len(ax.patches) == 2
      assert all(patch.get_data().values.sum() == 200 for patch in ax.patches)
  finally:
    plt.close(figure)


def test_prior_plot_is_log_log_with_identity_and_fit_in_the_title():
  plot = _prior()
  figure = report.figure_of(plot)
  try:
    ax = figure.axes[0]
    reference = np.log(plot.reference / plot.reference.sum())
    np.testing.assert_allclose(np.sort(ax.collections[0].get_offsets()[:, 0]),
                               np.sort(reference), rtol=1e-6)
    identity = [line for line in ax.get_lines() if line.get_label() == "y = x"]
    assert identity and np.allclose(*identity[0].get_data())
    assert "ρ" in ax.get_title() and "slope" in ax.get_title()
  finally:
    plt.close(figure)


def test_ausuc_marks_every_gamma():
  plot = _ausuc()
  figure = report.figure_of(plot)
  try:
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    for name in plot.points:
      assert name in legend
    assert any(name.startswith("γ = 0") for name in legend)
  finally:
    plt.close(figure)


def test_render_writes_each_png(tmp_path):
  for name, (make, _) in PLOTS.items():
    path = os.path.join(tmp_path, f"{name}.png")
    report.render(path, make())
    assert os.path.getsize(path) > 1000


def test_the_overlap_check_sees_a_label_on_its_marker():
  """The check above is not vacuous: a label drawn on its own marker is caught."""
  figure = plt.figure(figsize=(4, 3))
  try:
    ax = figure.subplots()
    ax.plot([0.0, 1.0], [0.0, 1.0], "o")
    ax.annotate("on top", (1.0, 1.0), ha="center", va="center")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = ax.texts[0].get_window_extent(renderer).extents
    assert any(_overlaps(box, m) for m in _marker_boxes(ax, renderer))
  finally:
    plt.close(figure)


@pytest.mark.filterwarnings("error")
def test_prior_fit_closed_forms_and_constants_without_warnings():
  counts = np.array([50.0, 20.0, 10.0, 5.0, 1.0])
  reference = np.log(counts / counts.sum())
  fit = report.prior_fit(2.0 * reference + 3.0, counts)      # the prior, scaled and shifted
  assert fit["spearman"] == pytest.approx(1.0) and fit["pearson_log"] == pytest.approx(1.0)
  assert fit["slope"] == pytest.approx(2.0)
  assert report.prior_fit(-reference, counts)["spearman"] == pytest.approx(-1.0)
  flat = report.prior_fit(np.zeros(5), counts)               # a constant estimate
  assert np.isnan(flat["spearman"]) and np.isnan(flat["pearson_log"])
  assert flat["slope"] == pytest.approx(0.0, abs=1e-12)
  equal = report.prior_fit(reference, np.full(5, 7.0))       # equal counts: nothing to fit
  assert all(np.isnan(v) for v in equal.values())

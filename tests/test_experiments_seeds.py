"""``glajax run --seeds``: each seed a run of its own sharing one cache, the report over seeds
(mean ± sd beside each seed's bootstrap interval) recomputed with NumPy."""
import json

import numpy as np
import pytest

from glajax import experiments
from glajax.errors import ConfigError
from glajax.experiments import report


def _table(values, intervals, effects=False, label="row"):
  return {"title": "t", "columns": ["ID", "avg shifts"], "headers": ["ID", "avg shifts"],
          "effects": effects,
          "rows": [{"label": label, "values": dict(zip(["ID", "avg shifts"], values)),
                    "intervals": dict(zip(["ID", "avg shifts"], intervals))}]}


def test_seed_table_against_numpy():
  rng = np.random.default_rng(0)
  values = rng.uniform(-0.1, 0.1, (3, 2))
  halves = rng.uniform(0.01, 0.2, (3, 2))
  entries = [_table(v, [[x - h, x + h] for x, h in zip(v, hw)], effects=True, label=f"T={i}")
             for i, (v, hw) in enumerate(zip(values, halves))]
  table = report.seed_table(entries, [0, 1, 2])
  assert table["rows"][0]["label"] == "T=0" and table["rows"][0]["labels"] == ["T=0", "T=1",
                                                                                "T=2"]
  for j, column in enumerate(["ID", "avg shifts"]):
    cell = table["rows"][0]["cells"][column]
    assert cell["mean"] == pytest.approx(values[:, j].mean())
    assert cell["sd"] == pytest.approx(np.std(values[:, j], ddof=1))
    assert cell["half_width"] == pytest.approx(halves[:, j].mean())
    lows, highs = values[:, j] - halves[:, j], values[:, j] + halves[:, j]
    side = np.sign(values[:, j].mean())
    assert cell["excludes_zero"] == int(np.sum(lows > 0) if side > 0 else np.sum(highs < 0))


def test_seed_markdown_and_mismatched_tables():
  a = {"experiment": "gla", "tables": [_table([0.5, 0.25], [[0.4, 0.6], [0.2, 0.3]]),
                                       _table([0.1, 0.2], [[0, 0.2], [0.1, 0.3]])]}
  b = {"experiment": "gla", "tables": [_table([0.7, 0.25], [[0.6, 0.8], [0.2, 0.3]])]}
  combined = report.combine_seeds({0: a, 1: b}, "glajax run x --seeds 0,1 --workdir w")
  assert len(combined["tables"]) == 1   # the second table is not in every seed's report
  text = report.seed_markdown(combined)
  sd = 100 * np.std([0.5, 0.7], ddof=1)
  assert f"| row | 60.0 ± {sd:.1f} (±10.0) | 25.0 ± 0.0 (±5.0) |" in text
  assert "[seed 1](seed_1/report.md)" in text


@pytest.mark.parametrize("seeds", ["", "0,0", "a,1", "-1", "0,2147483648", "1.5"])
def test_bad_seeds_are_refused_naming_the_option(seeds, tmp_path):
  with pytest.raises(ConfigError, match="--seeds"):
    experiments.run_seeds("gla_imagenet:runlocal", str(tmp_path / "w"), seeds)
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_run_over_seeds_end_to_end(tmp_path, capsys):
  from glajax import cli
  workdir = tmp_path / "seeds"
  assert cli.main(["run", "wise_ft:runlocal", "--seeds", "0,1", "--workdir", str(workdir)]) == 0
  assert "over seeds 0, 1" in capsys.readouterr().out
  combined = json.loads((workdir / "report.json").read_text())
  runs = {s: json.loads((workdir / f"seed_{s}" / "report.json").read_text()) for s in (0, 1)}
  assert runs[0]["config"]["seed"] == 0 and runs[1]["config"]["seed"] == 1
  assert combined["seeds"] == [0, 1] and len(combined["tables"]) == len(runs[0]["tables"])
  for t, table in enumerate(combined["tables"]):
    for r, row in enumerate(table["rows"]):
      for column, cell in row["cells"].items():
        values = [runs[s]["tables"][t]["rows"][r]["values"][column] for s in (0, 1)]
        if cell is None:
          assert None in values
          continue
        assert cell["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert cell["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
  assert "mean ± standard deviation over the 2 seeds" in (workdir / "report.md").read_text()
  # the seeds' runs differ (their fine-tuning: the paired differences, ECE included; two
  # near-chance tiny models' accuracies on 100 rows can coincide), the prepared data is shared
  assert runs[0]["tables"][-1]["rows"] != runs[1]["tables"][-1]["rows"]
  assert not (workdir / "seed_0" / "tfds").exists() and (workdir / "tfds").exists()
  # another experiment's directory is refused before any work
  with pytest.raises(ConfigError, match="--workdir"):
    experiments.run_seeds("wise_ft:runlocal", str(workdir / "seed_0"), "0,1")

"""The report's diagnostics (``glajax.experiments.diagnostics``): each check on constructed inputs,
firing when its condition holds and silent otherwise, and the warnings' Markdown."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from glajax import methods as M
from glajax.experiments import diagnostics as D
from glajax.experiments import report


def test_random_models_are_the_tiny_checkpoints():
  found = D.random_models(("tiny:0", "openai/clip-vit-base-patch16", "tiny-rn:3"))
  assert [f.check for f in found] == ["random_model"]
  assert "`tiny:0`" in found[0].cause and "`tiny-rn:3`" in found[0].cause
  assert "model.checkpoints" in found[0].advice
  assert D.random_models(("openai/clip-vit-base-patch16", "/data/models/foundation_0")) == []


def test_near_chance_is_an_interval_reaching_one_over_k():
  accuracies = {"above": M.Interval(0.40, 0.31, 0.49),
                "around": M.Interval(0.11, 0.07, 0.15),
                "below": M.Interval(0.03, 0.01, 0.06),
                "at the edge": M.Interval(0.14, 0.10, 0.18)}
  summary, found = D.near_chance(accuracies, 10)
  assert len(found) == 1 and found[0].check == "chance"
  assert found[0].cause.endswith("around 11.0 % [7.0, 15.0]; below 3.0 % [1.0, 6.0]; "
                                 "at the edge 14.0 % [10.0, 18.0]")   # low ≤ 1/10
  assert summary["above"] == pytest.approx({"accuracy": 0.40, "low": 0.31, "high": 0.49,
                                            "chance": 0.1})
  assert "1/10 = 10.0 %" in found[0].cause
  assert D.near_chance({"above": accuracies["above"]}, 10)[1] == []


def test_near_chance_on_bootstrap_intervals_of_guessing_and_of_a_model():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 400)
  guessing = rng.normal(size=(400, 5))
  good = guessing + 5 * np.eye(5)[labels]
  key = __import__("jax").random.PRNGKey(0)
  interval = lambda z: M.bootstrap(key, M.accuracy_of, M.row_summaries(z, labels))  # noqa
  _, found = D.near_chance({"guessing": interval(guessing), "model": interval(good)}, 5)
  assert ": guessing " in found[0].cause and "model" not in found[0].cause


def _records(values, metric="accuracy"):
  return [{"step": 10 * (i + 1), metric: float(v)} for i, v in enumerate(values)]


def test_training_trend_fires_on_flat_or_falling_accuracy_only():
  rng = np.random.default_rng(0)
  flat = 0.1 + 0.01 * rng.normal(size=40)
  summary, found = D.training_trend("run-a", _records(flat))
  assert summary["checked"] and summary["metric"] == "accuracy" and summary["logged_steps"] == 40
  assert [f.check for f in found] == ["training"] and "not rising" in found[0].cause
  rising = np.linspace(0.1, 0.9, 40) + 0.01 * rng.normal(size=40)
  assert D.training_trend("run-b", _records(rising))[1] == []
  falling = np.linspace(0.9, 0.2, 40)
  assert D.training_trend("run-c", _records(falling))[1]
  constant = np.full(12, 0.25)   # no noise, no rise: se 0, rise 0
  assert D.training_trend("run-d", _records(constant))[1]


def test_training_trend_on_loss_and_too_few_steps():
  assert D.training_trend("run", _records(np.linspace(2.3, 0.4, 20), "loss"))[1] == []
  summary, found = D.training_trend("run", _records(np.linspace(0.4, 2.3, 20), "loss"))
  assert summary["metric"] == "loss" and "loss not falling" in found[0].cause
  summary, found = D.training_trend("run", _records([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]))
  assert summary == {"run": "run", "metric": "accuracy", "logged_steps": 7, "checked": False}
  assert found == []


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "loss": 1.4},
           {"step": 3, "loss": 1.0}]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  assert [r["loss"] for r in D.read_metrics(str(path))] == [2.0, 1.4, 1.0]


def test_learning_rate_check_fires_at_the_largest_candidate_only():
  record = {"learning_rate": 1e-3, "candidates": [1e-5, 1e-4, 1e-3],
            "validation_accuracy": [0.2, 0.5, 0.9]}
  summary, found = D.learning_rate_check(record)
  assert summary["at_largest"] and [f.check for f in found] == ["learning_rate"]
  assert "0.001, is the largest tried (1e-05 (20.0 %), 0.0001 (50.0 %), 0.001 (90.0 %))" in (
      found[0].cause)
  summary, found = D.learning_rate_check({**record, "learning_rate": 1e-4})
  assert not summary["at_largest"] and found == []
  lines = D.markdown({"learning_rate": summary})
  assert "- learning rate: 0.0001 chosen on validation (1e-05 20.0 %, 0.0001 50.0 %, " \
         "0.001 90.0 %)" in lines


def test_prior_check_bounds_and_entropy():
  skewed = np.log(np.asarray([0.7, 0.1, 0.1, 0.05, 0.05]))
  summary, found = D.prior_check(skewed, 1.3, 2e-7, searched=True)
  assert found == [] and summary["entropy"] < 0.99 and not summary["at_bound"]
  assert summary["residual"] == pytest.approx(2e-7)
  low, high = M.priors.TEMPERATURE_RANGE
  for temperature in (high * 28.07, high, low):
    summary, found = D.prior_check(skewed, temperature, None, searched=True)
    assert summary["at_bound"] and [f.check for f in found] == ["prior"]
    assert "search range" in found[0].cause
  # a fixed T (no search) is never "at a bound"
  assert D.prior_check(skewed, 1.0, None, searched=False)[1] == []
  uniform = np.log(np.full(10, 0.1)) + 1e-3 * np.arange(10)
  summary, found = D.prior_check(uniform, 2.0, 1e-6, searched=True)
  assert summary["entropy"] == pytest.approx(1.0, abs=1e-4)
  assert len(found) == 1 and "near uniform" in found[0].cause


def test_pcv_check_fires_when_no_pseudo_split_is_feasible():
  """A source model right on every pseudo-absent row, a fine-tuned one that no γ makes right on
  all of them: M.pcv_gamma refuses, the kind records γ = None, and the check warns."""
  labels = np.asarray([0, 1, 2, 3])
  pseudo_absent = np.asarray([False, False, True, True])
  logits = np.asarray([[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], np.float32)
  with pytest.raises(Exception, match="none of 1 splits"):
    M.pcv_gamma([(logits, labels, pseudo_absent, 1.0)])
  summary, found = D.pcv_check(None, 3)
  assert summary == {"gamma": None, "splits": 3} and [f.check for f in found] == ["pcv"]
  assert "no γ in any of its 3 pseudo splits" in found[0].cause
  assert D.pcv_check(0.7, 3)[1] == [] and D.pcv_check(None, 0)[1] == []
  assert "- PCV: no feasible γ in 3 pseudo splits" in D.markdown({"pcv": summary})
  assert "- PCV: γ = 0.7 over 3 pseudo splits" in D.markdown({"pcv": {"gamma": 0.7,
                                                                       "splits": 3}})


def test_prior_entropy_is_normalised_shannon_entropy():
  prior = np.asarray([0.5, 0.25, 0.25])
  summary, _ = D.prior_check(np.log(prior) + 3.0, 1.0, None, searched=False)  # unnormalised
  assert summary["entropy"] == pytest.approx(-np.sum(prior * np.log(prior)) / np.log(3))


def test_priors_are_found_in_nested_results():
  results = {"wise_ft": {"curve": []},
             "gla": {"log_prior": [0.0], "zs_temperature": 2.0, "zs_temperature_matched": True}}
  assert [name for name, _ in D._priors_in(results)] == ["gla"]


def _fake_exp(tmp_path, checkpoints, runs=()):
  config = SimpleNamespace(model=SimpleNamespace(checkpoints=checkpoints))
  tests = [SimpleNamespace(ref="test-ref")]
  return SimpleNamespace(config=config, runs=dict.fromkeys(runs), tests=lambda: tests,
                         num_classes=lambda ref: 4,
                         cache=lambda *parts: str(tmp_path.joinpath(*parts)))


def test_collect_reads_the_runs_and_the_outcome(tmp_path):
  run = tmp_path / "runs" / "finetuned-abc"
  run.mkdir(parents=True)
  (run / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "loss": 1.4, "accuracy": 0.25}) + "\n" for s in range(1, 13)))
  outcome = SimpleNamespace(
      accuracies={"fine-tuned": M.Interval(0.3, 0.2, 0.4)},
      results={"gla": {"log_prior": np.log(np.full(4, 0.25)).tolist(), "zs_temperature": 40.0,
                       "zs_temperature_matched": True, "prior_residual": 3e-7}})
  diagnostics, found = D.collect(_fake_exp(tmp_path, ("tiny:0",), ["finetuned-abc", "gone"]),
                                 outcome)
  assert [f.check for f in found] == ["random_model", "chance", "training", "prior", "prior"]
  assert [t["run"] for t in diagnostics["training"]] == ["finetuned-abc"]
  text = "\n".join(D.markdown(diagnostics))
  assert "T = 40" in text and "normalised entropy H(π)/log C = 1.0000" in text
  assert "residual 3.00e-07" in text and "model: random (tiny:0)" in text

  good = SimpleNamespace(accuracies={"fine-tuned": M.Interval(0.9, 0.85, 0.95)}, results={})
  assert D.collect(_fake_exp(tmp_path, ("/models/foundation_0",)), good)[1] == []


def test_warnings_open_the_report():
  findings = [D.Finding("random_model", "the model is random", "use a pre-trained one"),
              D.Finding("chance", "zero-shot: at chance", "more data")]
  text = report.markdown({
      "experiment": "own_data", "command": "glajax run x", "fingerprint": "f", "tables": [],
      "plots": [], "final_models": {}, "config": {},
      "warnings": [f.as_json() for f in findings], "diagnostics": {"random_models": ["tiny:0"]}})
  lines = text.splitlines()
  assert lines[0] == "# glajax experiment: own_data"
  assert lines[2] == ("> **Warning:** the model is random. What to do: use a pre-trained one.")
  assert lines[3] == ">" and lines[4].startswith("> **Warning:** zero-shot: at chance.")
  assert lines[6].startswith("Produced by")
  assert "## Diagnostics" in text
  quiet = report.markdown({"experiment": "x", "command": "c", "fingerprint": "f", "tables": [],
                           "plots": [], "final_models": {}, "config": {}, "warnings": []})
  assert "Warning" not in quiet

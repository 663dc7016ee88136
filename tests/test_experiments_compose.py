"""The compose kind (the methods together) on the tiny world: every stage recomputed from the
cached logits with NumPy and SciPy (α on the validation rows, T by NLL, GLA's prior by its
optimality condition), intervals from the same resamples, the leak guard over every fitted
choice, and the config rules checked before any work."""
import json
import os

import jax
import numpy as np
import pytest
from scipy import optimize, special

from glajax import experiments, methods as M
from glajax.errors import ConfigError
from glajax.methods import uncertainty

SPEC = "compose:runlocal"


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("compose")
  return workdir, experiments.run(SPEC, str(workdir))


def _cached(workdir, tag, data):
  found = []
  for name in os.listdir(workdir / "logits"):
    with np.load(workdir / "logits" / name) as f:
      metadata = json.loads(str(f["metadata"]))
      if metadata["tag"].startswith(tag) and metadata["data"] == data:
        found.append((f["logits"].astype(np.float64), f["labels"]))
  assert len(found) == 1, (tag, data, len(found))
  return found[0]


def _ledger(result, purpose):
  return next(e["data"] for e in result["ledger"] if e["purpose"] == purpose)


def _nll_temperature(logits, labels):
  nll = lambda log_t: -np.mean(special.log_softmax(logits / np.exp(log_t), -1)[
      np.arange(len(labels)), labels])
  # over M.fit_temperature's range, T ∈ [0.01, 100]: a minimum at its end is that end
  return float(np.exp(optimize.minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)),
                                               method="bounded", options={"xatol": 1e-8}).x))


def test_every_stage_is_what_the_cached_logits_give(composed):
  workdir, result = composed
  config = experiments.load(SPEC)
  val, test = _ledger(result, "validation"), config.data.test
  for fitted in result["results"].values():
    tags = fitted["logits_tags"]   # α -> the cache tag of θ_α's logits
    # α: the grid point with the best validation accuracy (the first of equal ones)
    scores = {float(a): np.mean(np.argmax(_exact(workdir, t, val)[0], -1)
                                == _exact(workdir, t, val)[1]) for a, t in tags.items()}
    assert fitted["alpha"] == max(sorted(scores), key=lambda a: scores[a])
    # T: the NLL minimiser on the validation logits of the chosen α
    chosen = tags[f"{fitted['alpha']:g}"]
    assert fitted["temperature"] == pytest.approx(
        _nll_temperature(*_exact(workdir, chosen, val)), rel=2e-3)
    # GLA's prior: at the optimum, the debiased zero-shot model's mean probabilities on the
    # prior rows (the fine-tuning rows) equal their class frequencies
    prior_z, prior_y = _exact(workdir, tags["0"], _ledger(result, "prior"))
    log_prior = np.asarray(fitted["log_prior"])
    freq = np.bincount(prior_y, minlength=len(log_prior)) / len(prior_y)
    theta = log_prior - np.log(np.maximum(freq, 1e-300))
    probs = special.softmax(prior_z / fitted["zs_temperature"] - theta, -1).mean(0)
    np.testing.assert_allclose(probs, freq, atol=2e-3)
    # the last row: (z_α/T − log π_ft) + (z_zs/T_zs − log π_p) on the test set
    z_test, y_test = _exact(workdir, chosen, test)
    zs_test, _ = _exact(workdir, tags["0"], test)
    gla = z_test / fitted["temperature"] + zs_test / fitted["zs_temperature"] - log_prior
    last = list(fitted["rows"].values())[-1]
    assert last["ID"]["estimate"] == pytest.approx(np.mean(gla.argmax(-1) == y_test), abs=1e-9)


def _exact(workdir, tag, data):
  """(logits, labels) cached under exactly ``tag`` for ``data``."""
  for name in os.listdir(workdir / "logits"):
    with np.load(workdir / "logits" / name) as f:
      metadata = json.loads(str(f["metadata"]))
      if metadata["tag"] == tag and metadata["data"] == data:
        return f["logits"].astype(np.float64), f["labels"]
  raise AssertionError((tag, data))


def test_intervals_are_the_bootstrap_of_the_cached_rows(composed):
  """The ID accuracy interval of the fine-tuned row: the 2.5/97.5 percentiles over the same
  resamples (``uncertainty.resample_indices`` from the run's key), recomputed with NumPy."""
  workdir, result = composed
  config = experiments.load(SPEC)
  z, y = _cached(workdir, "finetuned", config.data.test)
  row = result["results"]["finetune"]["rows"]["finetune"]["ID"]
  index = np.asarray(uncertainty.resample_indices(jax.random.PRNGKey(config.seed), (len(y),),
                                                  uncertainty.DEFAULT_SAMPLES)[0])
  correct = (z.argmax(-1) == y).astype(np.float64)
  low, high = np.quantile(correct[index].mean(1), [0.025, 0.975])
  assert (row["low"], row["high"]) == pytest.approx((low, high), abs=1e-6)
  effects = result["results"]["finetune"]["effects"]
  for label, cells in effects.items():
    assert " vs " in label and set(cells) == {"Δ ID", "Δ avg shifts", "Δ ECE ID",
                                              "Δ ECE avg shifts"}


def test_no_test_row_reaches_alpha_t_or_the_prior(composed):
  _, result = composed
  fitted = [e for e in result["ledger"] if e["role"] == "fit"]
  assert {e["purpose"] for e in fitted} == {"fine-tuning", "validation", "prior"}
  assert all("test" not in e["data"] for e in fitted)


@pytest.mark.parametrize("override, key", [
    ("data.validation=demo_shapes_tiny@test_photo", "data.validation"),
    ("compose.stages=('temperature', 'wise_ft')", "compose.stages"),
    ("compose.stages=('wise_ft', 'gamma')", "compose.stages"),
    ("compose.recipes=('finetune', 'lp_ft')", "compose.recipes"),
    ("recipes.flyp.recipe=finetune", "recipes.flyp"),
    ("recipes.carot.optimizer.learning_rate=-1.0", "recipes.carot.optimizer.learning_rate"),
    ("compose.alphas=(0.0, 1.5)", "compose.alphas"),
])
def test_bad_configs_are_refused_before_any_work(override, key, tmp_path):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    experiments.run(f"{SPEC},{override}", str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()

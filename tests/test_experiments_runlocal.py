"""Every config's ``runlocal`` variant end to end (slow: each fine-tunes a tiny CLIP on the demo's
tiny world): a complete report, and its numbers recomputed from the cached logits with NumPy."""
import json
import os

import numpy as np
import pytest
from scipy import special

from glajax import experiments
from glajax.data import subsample

pytestmark = pytest.mark.slow


def _run(spec, tmp_path):
  workdir = tmp_path / spec.split(":")[0]
  result = experiments.run(spec, str(workdir))
  assert json.loads((workdir / "report.json").read_text())["tables"] == result["tables"]
  markdown = (workdir / "report.md").read_text()
  for entry in result["tables"]:
    assert entry["title"] in markdown
    for row in entry["rows"]:
      assert row["label"] in markdown
      assert all(v is None or 0.0 <= v <= 1.0 for v in row["values"].values())
  for plot in result["plots"]:
    assert (workdir / plot).stat().st_size > 1000
  for path in result["final_models"].values():
    assert os.listdir(path)
  return workdir, result


def _cached(workdir, tag, spec):
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)
  with np.load(workdir / "logits" / f"{tag}__{safe}.npz") as f:
    return f["logits"].astype(np.float64), f["labels"]


def _rows(result):
  return {row["label"]: row["values"] for row in result["tables"][0]["rows"]}


def _accuracy(logits, labels):
  return np.mean(logits.argmax(-1) == labels)


@pytest.mark.parametrize("spec", ["gla_imagenet:runlocal", "gla_longtail:runlocal",
                                  "gla_fewshot:runlocal"])
def test_gla(spec, tmp_path):
  workdir, result = _run(spec, tmp_path)
  config = experiments.load(spec)
  zs, labels = _cached(workdir, "zeroshot", config.data.eval)
  ft, _ = _cached(workdir, "finetuned", config.data.eval)
  log_prior = np.asarray(result["results"]["log_prior"])
  # The estimate is a normalised log prior at which the debiased model's mean probabilities
  # match the class frequencies of the estimation data (GLA's optimality condition).
  assert special.logsumexp(log_prior) == pytest.approx(0.0, abs=1e-5)
  if config.gla.prior_data == "shots":  # few-shot: the k-shot training examples
    train_z, train_y = _cached(workdir, "zeroshot", config.data.train)
    shots = subsample.k_shot_indices(train_y, config.gla.shots, config.seed)[0]
    prior_z, prior_y = train_z[shots], train_y[shots]
    assert np.all(np.bincount(prior_y) == config.gla.shots)
  else:
    prior_z, prior_y = _cached(workdir, "zeroshot", config.gla.prior_data)
  freq = np.bincount(prior_y, minlength=len(log_prior)) / len(prior_y)
  theta = log_prior - np.log(freq)
  mean_probs = special.softmax(prior_z / result["results"]["prior_temperature"] - theta,
                               axis=-1).mean(0)
  np.testing.assert_allclose(mean_probs, freq, atol=1e-4)
  counts = np.asarray(result["results"]["train_counts"], np.float64)
  ft_prior = np.log(counts / counts.sum()) if config.gla.long_tail else 0.0
  gla = ft / result["results"]["ft_temperature"] - ft_prior + zs - log_prior
  rows = _rows(result)
  assert rows["GLA"]["ID"] == pytest.approx(_accuracy(gla, labels), abs=1e-9)
  assert rows["debiased zero-shot"]["ID"] == pytest.approx(
      _accuracy(zs - log_prior, labels), abs=1e-9)
  assert {"prior.png"} <= set(result["plots"])


def test_backdoor(tmp_path):
  workdir, result = _run("backdoor:runlocal", tmp_path)
  config = experiments.load("backdoor:runlocal")
  logits = [_cached(workdir, f"backbone{m}", config.data.eval) for m in range(2)]
  labels = logits[0][1]
  ensemble = logits[0][0] + logits[1][0]
  counts = np.asarray(result["results"]["train_counts"])
  per_class = np.array([np.mean(ensemble[labels == c].argmax(-1) == c)
                        for c in range(len(counts)) if (labels == c).any()])
  assert _rows(result)["backdoor ensemble"]["all"] == pytest.approx(per_class.mean(), abs=1e-6)
  assert len(result["final_models"]) == 2


# The tiny world's own test split, and one labelled split divided per class (Office-Home style).
ABSENT_SPECS = ["absent_class:runlocal",
                "absent_class:runlocal,absent_class.test_fraction=0.3,"
                "data.train='demo_shapes_quick@train',data.eval='demo_shapes_quick@train'"]


@pytest.mark.parametrize("spec", ABSENT_SPECS)
def test_absent_class(spec, tmp_path):
  workdir, result = _run(spec, tmp_path)
  config = experiments.load(spec)
  ft, labels = _cached(workdir, "finetuned", config.data.eval)
  test_rows = result["results"]["test_rows"]
  if test_rows is not None:  # test examples: 30 % of each class, never fine-tuned on
    ft, labels = ft[test_rows], labels[test_rows]
    assert np.all(np.bincount(labels) == 3)  # of 10 per class
    assert not set(test_rows) & set(result["results"]["pcv_held_out"])
  absent = np.ones(ft.shape[1], bool)
  absent[result["results"]["seen_classes"]] = False
  assert absent.sum() == 50
  shifted = ft + result["results"]["gamma_oracle"] * absent
  rows = _rows(result)
  oracle = next(v for k, v in rows.items() if k.startswith("fine-tuned + oracle"))
  assert oracle["acc_y_y"] == pytest.approx(_accuracy(shifted, labels), abs=1e-6)
  # The oracle γ is the best γ on test: no γ on a fine grid does better.
  best = max(_accuracy(ft + g * absent, labels) for g in np.linspace(-5, 5, 201))
  assert oracle["acc_y_y"] >= best - 1e-9
  assert "ausuc.png" in result["plots"]
  # PCV γ: per pseudo split, a brute-force sweep of every flip point on the held-out training
  # examples of the seen classes, keeping the best overall accuracy whose pseudo-absent accuracy
  # is at least the zero-shot model's (the smallest such γ, as the exact sweep's argmax).
  seen = ~absent
  zs, train_labels = _cached(workdir, "zeroshot", config.data.train)
  held_out = np.asarray(result["results"]["pcv_held_out"])
  on_seen = np.flatnonzero(seen[train_labels])
  assert set(held_out) < set(on_seen) and 0 < held_out.size < on_seen.size
  assert test_rows is None or held_out.size == 50  # round(0.2 · 7): 1 of each seen class
  s_labels = np.searchsorted(np.flatnonzero(seen), train_labels[held_out])
  gammas = []
  assert result["results"]["pcv_seeds"] == list(config.absent_class.pcv_seeds)
  for seed, classes in zip(config.absent_class.pcv_seeds,
                           result["results"]["pcv_pseudo_absent_classes"]):
    pseudo = np.isin(np.flatnonzero(seen), classes)
    assert pseudo.sum() == 25 and np.array_equal(
        pseudo, subsample.class_subset(50, 25, seed)[1])
    pcv, _ = _cached(workdir, f"pcv_{seed}", config.data.train)
    logits = pcv[held_out][:, seen].astype(np.float32)
    rows_absent = pseudo[s_labels]
    source = _accuracy(zs[held_out][:, seen][rows_absent], s_labels[rows_absent])
    delta = np.sort(np.unique(np.where(pseudo, -np.inf, logits).max(-1)
                              - np.where(pseudo, logits, -np.inf).max(-1)))
    edges = np.concatenate([delta[:1] - 2.0, delta, delta[-1:] + 2.0])
    candidates = (edges[:-1] + edges[1:]) / 2
    hits = [(logits + g * pseudo).argmax(-1) == s_labels for g in candidates]
    overall = np.array([h.mean() for h in hits])
    absent_acc = np.array([h[rows_absent].mean() for h in hits])
    feasible = absent_acc >= source  # none: the γ of the best pseudo-absent accuracy
    best = (np.argmax(np.where(feasible, overall, -1.0)) if feasible.any()
            else np.argmax(absent_acc))
    gammas.append(candidates[best])
  assert result["results"]["gamma_pcv"] == pytest.approx(np.mean(gammas), abs=1e-4)
  pcv_row = next(v for k, v in rows.items() if k.startswith("fine-tuned + PCV γ"))
  assert pcv_row["acc_y_y"] == pytest.approx(
      _accuracy(ft + result["results"]["gamma_pcv"] * absent, labels), abs=1e-6)
  assert "fine-tuned + PCV γ" in (workdir / "report.md").read_text()
  assert "pcv_0" not in result["final_models"]


@pytest.mark.parametrize("method", ["flyp", "carot"])
def test_contrastive(method, tmp_path):
  workdir, result = _run(f"{method}:runlocal", tmp_path)
  config = experiments.load(f"{method}:runlocal")
  logits, labels = _cached(workdir, method, config.data.shifts[0])
  probs = special.softmax(logits, axis=-1)
  confidence, correct = probs.max(-1), probs.argmax(-1) == labels
  bins = np.clip(np.ceil(confidence * config.contrastive.ece_bins) - 1, 0, None).astype(int)
  ece = sum(abs(confidence[bins == b].sum() - correct[bins == b].sum())
            for b in range(config.contrastive.ece_bins)) / len(labels)
  assert _rows(result)[method]["ECE test_sketch"] == pytest.approx(ece, abs=1e-5)
  assert method in result["final_models"]


def test_wise_ft_linear_classifier_on_cached_features(tmp_path):
  """WiSE-FT's linear variant: the head trained on cached features of the frozen encoder, so
  every α shares the zero-shot encoder and interpolates the heads only."""
  from safetensors.numpy import load_file
  workdir, result = _run("wise_ft:runlocal,linear", tmp_path)
  config = experiments.load("wise_ft:runlocal,linear")
  features, train_labels = _cached(workdir, "features", config.data.train)
  encoder = load_file(workdir / "models" / "tiny_0" / "model.safetensors")
  merged = load_file(workdir / "final" / "wise_ft_alpha0.5" / "model.safetensors")
  for key in encoder:
    np.testing.assert_array_equal(merged[key], encoder[key], err_msg=key)
  with np.load(workdir / "final" / "finetuned" / "head.npz") as trained, \
       np.load(workdir / "final" / "wise_ft_alpha0.5" / "head.npz") as half:
    zs, _ = _cached(workdir, "wise_alpha0", config.data.eval)
    # The exported α = 0.5 head is halfway between the zero-shot head and the trained one:
    # its logits are the mean of the two models' logits on the same (shared) features.
    ft, labels = _cached(workdir, "wise_alpha1", config.data.eval)
    mid, _ = _cached(workdir, "wise_alpha0.5", config.data.eval)
    np.testing.assert_allclose(mid, (zs + ft) / 2, rtol=1e-4, atol=1e-4)
    assert not np.allclose(zs, ft)  # the head was trained
    assert set(trained) == set(half) == {"kernel", "bias"}
    assert features.shape == (len(train_labels), trained["kernel"].shape[0])  # (N, D)
  rows = _rows(result)
  assert rows["fine-tuned (α=1)"]["ID"] == pytest.approx(_accuracy(ft, labels), abs=1e-9)

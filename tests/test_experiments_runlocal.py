"""Every config's ``runlocal`` variant end to end (slow: each fine-tunes a tiny CLIP on the demo's
tiny world): a complete report, its numbers recomputed from the cached logits with NumPy, and the
leak guard: no test-split row reaches a prior, a temperature or a fit."""
import json
import os

import numpy as np
import pytest
from scipy import special

from glajax import experiments, methods
from glajax.data import pipeline, subsample
from glajax.errors import ConfigError

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
  assert "## Data" in markdown and all(e["data"] in markdown for e in result["ledger"])
  return workdir, result


def _cached(workdir, tag, data):
  """(logits, labels) of the one cached file whose tag starts with ``tag`` and whose rows are
  ``data`` (a ``DataRef.describe()``, or a plain spec)."""
  found = []
  for name in os.listdir(workdir / "logits"):
    with np.load(workdir / "logits" / name) as f:
      metadata = json.loads(str(f["metadata"]))
      if metadata["tag"].startswith(tag) and metadata["data"] == data:
        found.append((f["logits"].astype(np.float64), f["labels"]))
  assert len(found) == 1, (tag, data, len(found))
  return found[0]


def _ledger(result, purpose):
  return next(e for e in result["ledger"] if e["purpose"] == purpose)


def _rows(result):
  return {row["label"]: row["values"] for row in result["tables"][0]["rows"]}


def _accuracy(logits, labels):
  return np.mean(logits.argmax(-1) == labels)


@pytest.mark.parametrize("spec", ["gla_imagenet:runlocal", "gla_longtail:runlocal",
                                  "gla_fewshot:runlocal"])
def test_gla(spec, tmp_path):
  workdir, result = _run(spec, tmp_path)
  config = experiments.load(spec)
  zs, labels = _cached(workdir, "zeroshot", config.data.test)
  ft, _ = _cached(workdir, "finetuned" if "fewshot" not in spec else "prompt_tuned",
                  config.data.test)
  log_prior = np.asarray(result["results"]["log_prior"])
  # The estimate is a normalised log prior at which the debiased model's mean probabilities
  # match the class frequencies of the estimation data (GLA's optimality condition), the
  # estimation data being the training-side rows the ledger names.
  assert special.logsumexp(log_prior) == pytest.approx(0.0, abs=1e-5)
  prior = [e for e in result["ledger"] if e["purpose"].startswith("prior")]
  assert prior and all(e["role"] == "fit" and "test" not in e["data"] for e in prior)
  prior_z, prior_y = (np.concatenate(a) for a in zip(
      *[_cached(workdir, "zeroshot", e["data"]) for e in prior]))
  if config.gla.shots:  # few-shot: the k training shots and the validation shots per class
    assert np.all(np.bincount(prior_y) == config.gla.shots + config.gla.val_shots)
  freq = np.bincount(prior_y, minlength=len(log_prior)) / len(prior_y)
  theta = log_prior - np.log(freq)
  zs_temperature = result["results"]["zs_temperature"]
  mean_probs = special.softmax(prior_z / zs_temperature - theta, axis=-1).mean(0)
  np.testing.assert_allclose(mean_probs, freq, atol=1e-4)
  counts = np.asarray(result["results"]["train_counts"], np.float64)
  ft_prior = np.log(counts / counts.sum())
  gla = (ft / result["results"]["ft_temperature"] - ft_prior + zs / zs_temperature - log_prior)
  rows = _rows(result)
  assert rows["GLA"]["ID"] == pytest.approx(_accuracy(gla, labels), abs=1e-9)
  assert rows["debiased zero-shot"]["ID"] == pytest.approx(
      _accuracy(zs / zs_temperature - log_prior, labels), abs=1e-9)
  assert {"prior.png"} <= set(result["plots"])


@pytest.mark.parametrize("spec", ["gla_fewshot:runlocal", "gla_longtail:runlocal"])
def test_no_test_row_reaches_a_prior_a_temperature_or_a_fit(spec, tmp_path, monkeypatch):
  """The leak guard on GLA's protocols: every array given to the prior estimate, the
  temperature searches and the fine-tuning pipeline comes from training-side rows."""
  seen = {"prior": [], "temperature": [], "fit": []}
  for name, key in (("estimate_log_prior", "prior"), ("match_confidence_temperature",
                                                      "temperature")):
    real = getattr(methods, name)
    monkeypatch.setattr(methods, name, lambda logits, labels, *a, _real=real, _key=key, **k: (
        seen[_key].append(np.asarray(logits)), _real(logits, labels, *a, **k))[1])
  real_batches = pipeline.train_batches
  monkeypatch.setattr(pipeline, "train_batches", lambda name, **k: (
      seen["fit"].append((name, k["split"], k.get("indices"))), real_batches(name, **k))[1])
  workdir, result = _run(spec, tmp_path)
  config = experiments.load(spec)
  test_logits, _ = _cached(workdir, "zeroshot", config.data.test)
  test_ft, _ = _cached(workdir, "finetuned" if "fewshot" not in spec else "prompt_tuned",
                       config.data.test)
  assert seen["prior"] and seen["fit"]
  assert seen["temperature"] or not config.gla.shots
  for logits in seen["prior"] + seen["temperature"]:
    for test in (test_logits, test_ft):  # no row of a test set, from either model
      match = np.isclose(logits[:, None, :], test[None, :, :], atol=1e-6).all(-1)
      assert not match.any()
  test_split = config.data.test.partition("@")[2]
  for name, split, indices in seen["fit"]:
    assert split != test_split and split.startswith("train")
    assert indices is None or len(indices) == config.gla.shots * 100  # the k shots only


def test_prior_on_a_test_split_is_refused_before_any_work(tmp_path):
  workdir = tmp_path / "work"
  for spec, key in (("gla_longtail:runlocal,gla.prior_data='demo_shapes_tiny@test_photo'",
                     "gla.prior_data"),
                    ("gla_fewshot:runlocal,data.validation='demo_shapes_tiny@test_photo'",
                     "data.validation"),
                    ("wise_ft:runlocal,data.train='demo_shapes_tiny@test_sketch'", "data.train")):
    with pytest.raises(ConfigError, match=key):
      experiments.run(spec, str(workdir))
    assert not workdir.exists()


def test_backdoor(tmp_path):
  workdir, result = _run("backdoor:runlocal", tmp_path)
  config = experiments.load("backdoor:runlocal")
  tags = result["results"]["logits_tags"]
  logits = [_cached(workdir, tags[f"{c} (LA loss)"], config.data.test)
            for c in config.model.checkpoints]
  labels = logits[0][1]
  ensemble = logits[0][0] + logits[1][0]
  counts = np.asarray(result["results"]["train_counts"])
  per_class = np.array([np.mean(ensemble[labels == c].argmax(-1) == c)
                        for c in range(len(counts)) if (labels == c).any()])
  assert _rows(result)["backdoor ensemble"]["all"] == pytest.approx(per_class.mean(), abs=1e-6)
  assert "τ = 1" in result["tables"][0]["title"] and "adapter dim" in result["tables"][0]["title"]


# The paper's family (a tiny supervised ResNet, its own head as the source classifier) on the
# tiny world's own test split; CLIP (zero-shot source) on one labelled split divided per class
# (Office-Home style).
ABSENT_SPECS = ["absent_class:runlocal",
                "absent_class:runlocal,clip,absent_class.test_fraction=0.3,"
                "absent_class.pcv_holdout=0.2,data.train='demo_shapes_quick@train',"
                "data.test='demo_shapes_quick@train'"]


@pytest.mark.parametrize("spec", ABSENT_SPECS)
def test_absent_class(spec, tmp_path):
  workdir, result = _run(spec, tmp_path)
  config = experiments.load(spec)
  clip = "clip" in spec
  assert config.model.checkpoints == (("tiny:0",) if clip else ("tiny-resnet:0",))
  source_tag, source_row = ("zeroshot", "zero-shot") if clip else ("own_head", "source")
  assert source_row in _rows(result)
  test = _ledger(result, "test")
  ft, labels = _cached(workdir, "finetuned", test["data"])
  if config.absent_class.test_fraction:  # test examples: 30 % of each class, never fine-tuned on
    assert np.all(np.bincount(labels) == 3)  # of 10 per class
    assert "holdout(0.3, 0) part 1" in test["data"]
    assert "holdout(0.3, 0) part 0" in _ledger(result, "fine-tuning")["data"]
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
  # is at least the zero-shot model's (the first maximum along the curve sorted by seen
  # accuracy: the largest such γ).
  seen = ~absent
  held_out = _ledger(result, "PCV γ")
  zs, held_labels = _cached(workdir, source_tag, held_out["data"])
  assert set(held_labels) <= set(np.flatnonzero(seen))
  s_labels = np.searchsorted(np.flatnonzero(seen), held_labels)
  gammas = []
  assert result["results"]["pcv_seeds"] == list(config.absent_class.pcv_seeds)
  for seed, classes in zip(config.absent_class.pcv_seeds,
                           result["results"]["pcv_pseudo_absent_classes"]):
    pseudo = np.isin(np.flatnonzero(seen), classes)
    assert pseudo.sum() == 25 and np.array_equal(
        pseudo, subsample.class_subset(50, 25, seed)[1])
    pcv_fit = _ledger(result, f"PCV fine-tuning (seed {seed})")
    assert "holdout" in pcv_fit["data"] and pcv_fit["classes"] == 25
    pcv, _ = _cached(workdir, "pcv", held_out["data"])
    logits = pcv[:, seen].astype(np.float32)
    rows_absent = pseudo[s_labels]
    source = _accuracy(zs[:, seen][rows_absent], s_labels[rows_absent])
    delta = np.sort(np.unique(np.where(pseudo, -np.inf, logits).max(-1)
                              - np.where(pseudo, logits, -np.inf).max(-1)))
    edges = np.concatenate([delta[:1] - 2.0, delta, delta[-1:] + 2.0])
    candidates = (edges[:-1] + edges[1:]) / 2
    hits = [(logits + g * pseudo).argmax(-1) == s_labels for g in candidates]
    overall = np.array([h.mean() for h in hits])
    absent_acc = np.array([h[rows_absent].mean() for h in hits])
    feasible = absent_acc >= source
    score = np.where(feasible, overall, -1.0)
    best = (np.flatnonzero(score == score.max())[-1] if feasible.any()  # ties: the largest γ
            else np.argmax(absent_acc))
    gammas.append(candidates[best])
  assert result["results"]["gamma_pcv"] == pytest.approx(np.mean(gammas), abs=1e-4)
  pcv_row = next(v for k, v in rows.items() if k.startswith("fine-tuned + PCV γ"))
  assert pcv_row["acc_y_y"] == pytest.approx(
      _accuracy(ft + result["results"]["gamma_pcv"] * absent, labels), abs=1e-6)
  assert "Acc_{U/Y}" in (workdir / "report.md").read_text()
  assert not any(name.startswith("pcv") for name in result["final_models"])
  if not clip:   # the fine-tuned classifier: a ResNetForImageClassification of the world
    exported = json.loads((workdir / "final" / "finetuned" / "config.json").read_text())
    assert exported["model_type"] == "resnet" and len(exported["id2label"]) == ft.shape[1]


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
  trained = result["results"]["trained"]
  assert trained == {"flyp": "FLYP", "carot": "CaRot"}[method]  # the recipe that ran
  assert _rows(result)[trained]["ECE test_sketch"] == pytest.approx(ece, abs=1e-5)
  assert method in result["final_models"]
  if method == "carot":  # the report names the recipe values that ran
    carot = result["results"]["recipe_values"]["carot"]
    assert (carot["lambda_oc"], carot["lambda_sd"], carot["lambda_vt"]) == (0.2, 1.5, 0.05)
    markdown = (workdir / "report.md").read_text()
    assert "| `carot.lambda_vt` | `0.05` |" in markdown and "| `recipe` | `carot` |" in markdown


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
    zs, _ = _cached(workdir, "zeroshot", config.data.test)
    # The exported α = 0.5 head is halfway between the zero-shot head and the trained one:
    # its logits are the mean of the two models' logits on the same (shared) features.
    ft, labels = _cached(workdir, "linear_probe", config.data.test)
    mid, _ = _cached(workdir, "wise0.5", config.data.test)
    np.testing.assert_allclose(mid, (zs + ft) / 2, rtol=1e-4, atol=1e-4)
    assert not np.allclose(zs, ft)  # the head was trained
    assert set(trained) == set(half) == {"kernel", "bias"}
    assert features.shape == (len(train_labels), trained["kernel"].shape[0])  # (N, D)
  rows = _rows(result)
  assert rows["fine-tuned (α=1)"]["ID"] == pytest.approx(_accuracy(ft, labels), abs=1e-9)

"""Every config's ``runlocal`` variant end to end (slow: each fine-tunes a tiny CLIP on the demo's
tiny world): a complete report, its numbers recomputed from the cached logits with NumPy, and the
leak guard: no test-split row reaches a prior, a temperature or a fit."""
import json
import os

import numpy as np
import pytest
from scipy import special

from glajax import experiments, methods
from glajax.data import pipeline, subsample, transforms
from glajax.errors import ConfigError
from test_official_data import official_transforms

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
      low = -1.0 if entry["effects"] else 0.0   # a difference of two fractions
      assert all(v is None or low <= v <= 1.0 for v in row["values"].values())
  for plot in result["plots"]:
    assert (workdir / plot).stat().st_size > 1000
  for path in result["final_models"].values():
    assert os.listdir(path)
  assert "## Data" in markdown and all(e["data"] in markdown for e in result["ledger"])
  _assert_official_transform(workdir, experiments.load(spec))
  return workdir, result


def _assert_official_transform(workdir, config):
  """The report records the transforms the run used, and they are its recipe's official ones
  (tests/test_official_data.py ports them); the absent-class paper released no data code, so
  its runs use torchvision's ImageNet reference transforms, with which its source weights were
  trained."""
  record = json.loads((workdir / "report.json").read_text())["preprocessing"]
  train, evaluation = official_transforms(config.train.recipe)
  assert transforms.TrainTransform.from_dict(record["train"]) == train
  assert transforms.EvalTransform.from_dict(record["eval"]) == evaluation
  size = config.data.image_size
  text = (workdir / "report.md").read_text()
  assert train.describe(size) in text and evaluation.describe(size) in text


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
    k, cap = config.gla.shots, config.gla.val_shots_max  # ImageNet (cap 0): k; else min(k, 4)
    assert np.all(np.bincount(prior_y) == k + (config.gla.val_shots or (min(k, cap) if cap
                                                                         else k)))
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


SIGLIP = ",model.checkpoints=('tiny-siglip',)"   # the tiny SigLIP instead of the tiny CLIP


@pytest.mark.parametrize("method, model", [("flyp", ""), ("carot", ""), ("flyp", SIGLIP),
                                           ("carot", SIGLIP)])
def test_contrastive(method, model, tmp_path):
  workdir, result = _run(f"{method}:runlocal{model}", tmp_path)
  config = experiments.load(f"{method}:runlocal{model}")
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
  if model == SIGLIP:
    _check_sigmoid_run(workdir, method, config)


def _check_sigmoid_run(workdir, method, config):
  """SigLIP's run: the sigmoid loss with t and b trained (the logged and the exported b moved
  from the tiny model's -10), CaRot's terms logged; the zero-shot logits are SigLIP's own,
  exp(t)·cos + b with t = log 10 and b = -10: within [-20, 0]."""
  from safetensors.numpy import load_file
  (run,) = [d for d in (workdir / "runs").iterdir() if d.name.startswith(method)]
  lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
  assert {"sigmoid_loss", "logit_bias"} <= set(lines[-1]) and "clip_loss" not in lines[-1]
  if method == "carot":
    assert {"orthogonality", "self_distillation", "cross_projection"} <= set(lines[-1])
  start = load_file(workdir / "models" / "tiny-siglip_0" / "model.safetensors")["logit_bias"]
  final = load_file(workdir / "final" / method / "model.safetensors")["logit_bias"]
  assert start == -10.0 and final != start and lines[-1]["logit_bias"] != -10.0
  zs, _ = _cached(workdir, "zeroshot", config.data.test)
  assert zs.max() <= 1e-4 and zs.min() >= -20 - 1e-4 and zs.mean() < -5


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
  # α alone at 1.0 (a legal sweep): the report still shows the exported α = 0.5 it plots, reusing
  # everything cached (the α sweep is not part of the experiment's fingerprint).
  again = experiments.run("wise_ft:runlocal,linear,wise_ft.alphas=(1.0,)", str(workdir))
  assert [p["alpha"] for p in again["results"]["curve"]] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("spec", ["carot:rn50,runlocal",
                                  "wise_ft:runlocal,model.checkpoints=('tiny-rn:0',)"])
def test_resnet_clip_end_to_end(spec, tmp_path):
  """A ModifiedResNet CLIP through CaRot (W_v: its attention pool's c_proj) and through
  end-to-end fine-tuning with WiSE-FT: complete reports, models exported in open_clip's format."""
  workdir, result = _run(spec, tmp_path)
  assert experiments.load(spec).model.checkpoints == ("tiny-rn:0",)
  for path in result["final_models"].values():
    files = os.listdir(path)
    assert "open_clip_config.json" in files and "open_clip_model.safetensors" in files, files
  if spec.startswith("carot"):
    assert result["results"]["trained"] == "CaRot"
  else:
    assert {"finetuned", "wise_ft_alpha0.5"} <= set(result["final_models"])




def test_wise_ft_end_to_end_on_siglip(tmp_path):
  """WiSE-FT's end-to-end recipe on the tiny SigLIP: the exported α = 0.5 model is halfway
  between the zero-shot checkpoint and the fine-tuned one, tensor by tensor, the head's bias
  halfway from SigLIP's b = -10; the text tower, t and b are not trained; accuracies are the
  cached logits'."""
  from safetensors.numpy import load_file
  spec = f"wise_ft:runlocal{SIGLIP}"
  workdir, result = _run(spec, tmp_path)
  config = experiments.load(spec)
  zs = load_file(workdir / "models" / "tiny-siglip_0" / "model.safetensors")
  ft = load_file(workdir / "final" / "finetuned" / "model.safetensors")
  half = load_file(workdir / "final" / "wise_ft_alpha0.5" / "model.safetensors")
  assert set(zs) == set(ft) == set(half)
  for key in zs:
    np.testing.assert_allclose(half[key], (zs[key] + ft[key]) / 2, atol=1e-6, err_msg=key)
    if key.startswith("text_model.") or key.startswith("logit_"):
      np.testing.assert_array_equal(ft[key], zs[key], err_msg=key)
  assert not np.array_equal(ft["vision_model.head.probe"], zs["vision_model.head.probe"])
  with np.load(workdir / "final" / "finetuned" / "head.npz") as trained, \
       np.load(workdir / "final" / "wise_ft_alpha0.5" / "head.npz") as mid:
    np.testing.assert_allclose(mid["bias"], (trained["bias"] - 10.0) / 2, atol=1e-6)
  rows = _rows(result)
  for label, tag in (("zero-shot (α=0)", "zeroshot"), ("fine-tuned (α=1)", "finetuned"),
                     ("WiSE-FT α=0.5", "wise0.5")):
    logits, labels = _cached(workdir, tag, config.data.test)
    assert rows[label]["ID"] == pytest.approx(_accuracy(logits, labels), abs=1e-9)
  zs_logits, _ = _cached(workdir, "zeroshot", config.data.test)
  assert zs_logits.max() <= 1e-4 and zs_logits.min() >= -20 - 1e-4   # exp(t)·cos + b


def test_gla_fewshot_keeps_the_best_validation_epoch(tmp_path):
  """GLA.FS's rn50_ep50 recipe with TEST.FINAL_MODEL best_val on the tiny world: one GLA
  accuracy on the validation shots per epoch, the first best kept (Dassl's ``curr_result >
  best_result``), and the kept model's validation GLA accuracy, recomputed with NumPy from its
  cached logits (z_ft/T + z_zs/T_zs − log π_p, T searched to 1 pp), is the kept score."""
  spec = ("gla_fewshot:runlocal,gla.final_model=best_val,gla.fewshot_recipe=rn50_ep50,"
          "train.total_steps=12")
  workdir, result = _run(spec, tmp_path)
  config = experiments.load(spec)
  chosen = result["results"]["best_val"]
  history = [tuple(h) for h in chosen["history"]]
  steps_per_epoch = history[0][0]
  assert [s for s, _ in history] == list(range(steps_per_epoch, 13, steps_per_epoch))
  scores = [score for _, score in history]
  first_best = history[int(np.argmax(scores))]
  assert (chosen["epoch_step"], chosen["val_gla_accuracy"]) == first_best
  val = _ledger(result, "validation")["data"]
  ft, labels = _cached(workdir, "prompt_tuned", val)
  zs, _ = _cached(workdir, "zeroshot", val)
  temperature = float(methods.match_confidence_temperature(ft, labels, tol=1.0))
  fused = ft / temperature + zs / result["results"]["zs_temperature"] - np.asarray(
      result["results"]["log_prior"])
  assert 100 * _accuracy(fused, labels) == pytest.approx(chosen["val_gla_accuracy"], abs=1e-4)
  as_run = json.loads((workdir / "report.json").read_text())["train_as_run"]
  assert as_run["batch_size"] == 32 and as_run["optimizer"]["learning_rate"] == 2e-5
  assert config.gla.shots == 1

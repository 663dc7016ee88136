"""Your own data in one command (``configs/custom.py``, kind ``own_data``): folder and CSV datasets
named by path without registering anything, the per-class test hold-out, and the whole run on a
generated folder of tiny images with a tiny random CLIP."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from glajax import experiments
from glajax.data import builders, registry
from glajax.errors import ConfigError, DatasetError
from glajax.experiments import config as C
from glajax.experiments import roles, runner
from glajax.experiments.kinds import own_data

CLASSES = {"red_things": (200, 30, 30), "green_things": (30, 180, 40),
           "blue_things": (30, 40, 210)}


def _folder(root, per_class: int = 15, split: str = "") -> str:
  """Class subfolders of 40-px PNGs: noise around each class's colour."""
  rng = np.random.default_rng(0)
  for name, colour in CLASSES.items():
    folder = os.path.join(root, split, name)
    os.makedirs(folder, exist_ok=True)
    for i in range(per_class):
      pixels = np.clip(np.asarray(colour) + rng.integers(-40, 40, (40, 40, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
  return str(root)


def test_folder_is_named_by_path_without_registering(tmp_path):
  root = _folder(tmp_path / "images", per_class=2)
  registered = dict(registry._REGISTERED)
  config = C.load(f"configs/custom.py:runlocal,data.folder={root}")
  assert config.data.train == config.data.test == f"folder:{root}@train"
  uses = experiments.validate(config)
  assert registry._REGISTERED == registered and f"folder:{root}" not in registry.names()
  info = registry.get(f"folder:{root}")
  assert info.classnames == ("blue things", "green things", "red things")
  assert info.source.root == tmp_path / "images"
  by_purpose = roles.by_purpose(uses)
  assert by_purpose["test"].ref.steps == (roles.holdout(0.2, 0, 1),)
  assert by_purpose["fine-tuning"].ref.steps == (roles.holdout(0.2, 0, 0),)
  assert roles.disjoint(by_purpose["fine-tuning"].ref, by_purpose["test"].ref)


def test_train_test_folders_and_csv(tmp_path):
  root = tmp_path / "split"
  _folder(root, per_class=2, split="train")
  _folder(root, per_class=1, split="test")
  assert builders.folder_splits(root) == ("train", "test")
  config = C.load(f"configs/custom.py:runlocal,data.folder={root}")
  assert (config.data.train, config.data.test) == (f"folder:{root}@train", f"folder:{root}@test")
  uses = roles.by_purpose(experiments.validate(config))
  assert uses["test"].ref.steps == () and uses["test"].key == "data.test"

  csv = tmp_path / "labels.csv"
  csv.write_text("path,label\nsplit/train/red_things/0.png,red\nsplit/train/blue_things/0.png,"
                 f"blue\n{root}/test/red_things/0.png,red,test\n")
  info = registry.get(registry.local_name(csv))
  assert info.classnames == ("blue", "red") and info.source.splits == ("train", "test")
  assert info.source.examples(info.source.root, "train") == [
      ("split/train/red_things/0.png", 1), ("split/train/blue_things/0.png", 0)]
  bad = tmp_path / "bad.csv"
  bad.write_text("a.png\n")
  with pytest.raises(DatasetError, match="path,label"):
    registry.get(registry.local_name(bad))


def test_bad_own_data_configs(tmp_path):
  with pytest.raises(ConfigError, match="data.folder"):
    experiments.validate(C.load("configs/custom.py"))
  with pytest.raises(DatasetError, match="data.folder"):  # the key the user set
    experiments.validate(C.load(f"configs/custom.py:data.folder={tmp_path / 'missing'}"))
  root = _folder(tmp_path / "images", per_class=2)
  with pytest.raises(ConfigError, match="test_fraction"):
    experiments.validate(C.load(f"configs/custom.py:data.folder={root},"
                                "own_data.test_fraction=0.0"))
  with pytest.raises(ConfigError, match="gla.prior_data"):
    experiments.validate(C.load(f"configs/custom.py:data.folder={root},gla.shots=2"))
  # a learning rate the choice would silently replace; a candidate that is not a rate
  with pytest.raises(ConfigError, match=r"train.optimizer.learning_rate: expected one of "
                     r"own_data.learning_rates=\(1e-05, 0.0001, 0.001\).*found 0.0003"):
    experiments.validate(C.load(f"configs/custom.py:data.folder={root},"
                                "train.optimizer.learning_rate=3e-4"))
  for rates in ("(0.0,1e-05)", "(1e-05,1e-05)"):
    with pytest.raises(ConfigError, match="own_data.learning_rates: expected distinct"):
      experiments.validate(C.load(f"configs/custom.py:data.folder={root},"
                                  f"own_data.learning_rates={rates}"))
  # the recipe's rate alone: no validation hold-out taken from the training side
  uses = roles.by_purpose(experiments.validate(C.load(
      f"configs/custom.py:data.folder={root},own_data.learning_rates=None,"
      "train.optimizer.learning_rate=3e-4"), check_files=False))
  assert own_data.CHOICE not in uses


@pytest.mark.slow
def test_own_data_end_to_end(tmp_path):
  root = _folder(tmp_path / "images")
  workdir = tmp_path / "run"
  result = experiments.run(f"configs/custom.py:runlocal,data.folder={root}", str(workdir))
  titles = [t["title"] for t in result["tables"] if not t["effects"]]
  assert titles[0].startswith("WiSE-FT on folder:") and titles[1].startswith("GLA on folder:")
  effects = [t["title"] for t in result["tables"] if t["effects"]]
  assert effects == ["WiSE-FT: paired differences (95 % intervals on the same test rows)",
                     "GLA: paired differences (95 % intervals on the same test rows)"]
  assert set(result["results"]) == {"recipe", "wise_ft", "gla"}
  assert {"wise_ft_curve.png", "reliability.png", "prior.png"} <= set(result["plots"])
  ledger = {e["purpose"]: e for e in result["ledger"]}
  assert ledger["test"]["rows"] == 9 and ledger["fine-tuning"]["rows"] == 36  # 3 of 15 per class
  # one fine-tuning run shared by WiSE-FT and GLA
  assert len(os.listdir(workdir / "runs")) == 1
  export = workdir / "final" / "finetuned"
  config = json.loads((export / "config.json").read_text())
  assert config["id2label"] == {"0": "blue things", "1": "green things", "2": "red things"}
  assert (export / "preprocessor_config.json").is_file()
  markdown = (workdir / "report.md").read_text()
  assert "own_data.test_fraction" in markdown and "holdout(0.2, 0) part 1" in markdown
  # a random tiny model: the report opens with that and with its accuracies at chance (1/3)
  lines = markdown.splitlines()
  assert lines[2].startswith("> **Warning:** the model is random: `tiny:0`")
  assert lines[4].startswith("> **Warning:** test accuracy within noise of chance (1/3 = 33.3 %")
  checks = [w["check"] for w in result["warnings"]]
  assert checks[:2] == ["random_model", "chance"]
  assert "GLA prior (gla): T = " in markdown and "normalised entropy" in markdown


def test_learning_rate_chosen_on_a_validation_hold_out_of_the_training_side(tmp_path):
  root = _folder(tmp_path / "images")
  workdir = tmp_path / "run"
  rates = (1e-4, 1e-3, 1e-2)
  result = experiments.run(f"configs/custom.py:runlocal,data.folder={root},"
                           f"own_data.learning_rates={rates},own_data.extensions=0", str(workdir))
  ledger = {e["purpose"]: e for e in result["ledger"]}
  # 15 per class: 3 tested, 12 on the training side, of which 1 validates the choice
  assert (ledger["test"]["rows"], ledger["prior (fine-tuning)"]["rows"]) == (9, 36)
  assert (ledger["fine-tuning"]["rows"], ledger["learning rate"]["rows"]) == (33, 3)
  assert "holdout(0.2, 0) part 0 → holdout(0.1, 0) part 1" in ledger["learning rate"]["data"]
  # the choice recomputed with NumPy from each candidate's cached validation logits
  files = [f for f in result["logits_files"] if f["purpose"] == "learning rate"]
  assert len(files) == 3 and len(os.listdir(workdir / "runs")) == 3
  accuracy = []
  for f in files:
    with np.load(workdir / f["file"]) as z:
      accuracy.append(float(np.mean(np.argmax(z["logits"], 1) == z["labels"])))
  record = result["results"]["recipe"]
  assert record["candidates"] == list(rates)
  np.testing.assert_allclose(record["validation_accuracy"], accuracy, atol=1e-6)
  chosen = rates[int(np.argmax(accuracy))]   # the first maximum: ties go to the smaller rate
  assert record["learning_rate"] == chosen == result["train_as_run"]["optimizer"]["learning_rate"]
  # WiSE-FT and GLA read the chosen candidate's run (no fourth run); only it is diagnosed
  assert [t["run"] for t in result["diagnostics"]["training"]] == [
      files[int(np.argmax(accuracy))]["tag"]]
  table = result["tables"][0]
  assert table["title"].startswith("Learning rate, chosen on") and table["rows_of"] == "validation"
  assert [row["label"] for row in table["rows"]] == [
      f"lr {r:g}" + (" (chosen)" if r == chosen else "") for r in rates]
  markdown = (workdir / "report.md").read_text()
  assert "intervals over the validation rows" in markdown
  assert f"- learning rate: {chosen:g} chosen on validation" in markdown


@pytest.mark.parametrize("peak, extensions, tried, chosen", [
    (1e-4, 2, [1e-5, 1e-4, 1e-3], 1e-4),              # inside the grid: no extension
    (1e-2, 2, [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], 1e-2),  # extended until the largest loses
    (1e-1, 1, [1e-5, 1e-4, 1e-3, 1e-2], 1e-2),        # extensions spent: still the largest
    (1e-5, 2, [1e-5, 1e-4, 1e-3], 1e-5)])
def test_grid_search_extends_past_the_largest_winner(peak, extensions, tried, chosen):
  score = lambda r: -abs(np.log10(r) - np.log10(peak))   # noqa: a single peak in log rate
  got, scores, best = own_data.grid_search((1e-3, 1e-5, 1e-4), score, extensions)
  np.testing.assert_allclose(got, tried, rtol=1e-9)
  assert best == pytest.approx(chosen, rel=1e-9) and set(scores) == set(got)
  # ties go to the smaller rate
  assert own_data.grid_search((1e-4, 1e-3, 1e-2), lambda r: 0.5, 2)[2] == 1e-4


def test_epochs_raised_to_the_minimum_steps():
  train = C.load("configs/custom.py:data.folder=x").train   # batch 128, 10 epochs
  # ⌈1294 / 128⌉ = 11 steps an epoch: ⌈300 / 11⌉ = 28 epochs
  assert own_data.epochs_for(train, 1294, 300) == 28
  assert own_data.epochs_for(train, 50_000, 300) == 10   # 391 steps an epoch: the recipe's 10
  assert own_data.epochs_for(train, 100, 0) == 10


def test_full_custom_config_and_runlocal_without_a_folder(tmp_path):
  root = _folder(tmp_path / "images", per_class=2)
  config = experiments.load(f"custom:data.folder={root}")
  experiments.validate(config, check_files=False)
  assert config.model.checkpoints == ("openai/clip-vit-base-patch16",)
  assert config.data.image_size is None and config.train.model.dtype == "bfloat16"
  assert config.train.total_steps == -1 and config.train.optimizer.warmup_epochs == 1
  # runlocal alone runs on the demo's tiny world (its own test split): nothing held out
  uses = roles.by_purpose(experiments.validate(experiments.load("custom:runlocal")))
  assert uses["test"].ref.spec == "demo_shapes_tiny@test_photo"


def test_image_size_from_the_checkpoint_and_a_mismatch_refused_before_any_work(tmp_path):
  root = _folder(tmp_path / "images", per_class=2)
  checkpoint = runner.tiny_checkpoint(str(tmp_path / "model"), image_size=48)
  config = C.load(f"configs/custom.py:data.folder={root},model.checkpoints=('{checkpoint}',)")
  assert config.data.image_size is None
  experiments.validate(config)
  assert C.with_image_size(config).data.image_size == 48 and config.data.image_size is None
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"data.image_size: expected .*own image size 48.*"
                                        r"found 32"):
    experiments.run(f"configs/custom.py:data.folder={root},model.checkpoints=('{checkpoint}',),"
                    "data.image_size=32", str(workdir))
  assert not workdir.exists() and sorted(os.listdir(tmp_path)) == ["images", "model"]

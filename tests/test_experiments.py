"""``glajax run``: config loading and overrides, validation before any work, work-directory
claims, report tables, and one tiny end-to-end run (WiSE-FT) checked against closed forms."""
import json
import os

import numpy as np
import pytest

from glajax import experiments
from glajax.errors import CheckpointError, ConfigError, DatasetError
from glajax.experiments import config as config_lib
from glajax.experiments import report, roles, runner


def test_overrides_reach_the_config():
  config = experiments.load("wise_ft:runlocal,seed=3,wise_ft.alphas=(0.0, 0.25, 1.0),"
                            "wise_ft.export_alpha=0.25,train.optimizer.learning_rate=1e-4")
  assert config.seed == 3
  assert config.wise_ft.alphas == (0.0, 0.25, 1.0)
  assert config.wise_ft.export_alpha == 0.25
  assert config.train.optimizer.learning_rate == 1e-4
  assert config.model.checkpoints == ("tiny:0",)  # the runlocal arg was applied first
  same = experiments.load(os.path.join(config_lib.configs_dir(), "wise_ft.py") + ":runlocal")
  assert same.data.train == config.data.train


def test_unknown_key_names_it_and_lists_the_valid_ones():
  """The closest keys first, then only the keys of the section the mistyped key is in (not the
  whole config's): a mistyped key is found at a glance."""
  with pytest.raises(ConfigError) as info:
    experiments.load("wise_ft:runlocal,wise_ft.alpha=0.3")
  message = str(info.value)
  assert message.index("did you mean 'wise_ft.alphas'") < message.index("expected")
  assert "wise_ft.ece_bins" in message and "train.batch_size" not in message
  with pytest.raises(ConfigError) as info:
    experiments.load("wise_ft:runlocal,bogus=1")
  assert "under one of data, experiment, model" in str(info.value)
  with pytest.raises(ConfigError, match="wise_ft.alphas"):
    experiments.load("wise_ft:wise_ft.alphas.first=1")  # below a leaf
  with pytest.raises(ConfigError, match="runlocal"):
    experiments.load("wise_ft:runlcal")  # unknown get_config token
  with pytest.raises(ConfigError, match="wise_ft"):
    experiments.load("no_such_config")


def test_wrong_value_type_is_a_config_error():
  with pytest.raises(ConfigError, match="seed"):
    experiments.load("wise_ft:seed=(1, 2)")


def _full_configs():
  yield "wise_ft", None
  yield "wise_ft", "linear"
  yield "gla_imagenet", None
  for dataset in config_lib.FEWSHOT_DATASETS:
    yield "gla_fewshot", dataset
  yield "gla_longtail", "imagenet_lt"
  yield "gla_longtail", "places_lt"
  for dataset in ("imagenet_lt", "places_lt", "inaturalist2018", "cifar100_lt"):
    yield "backdoor", dataset
  yield "absent_class", "imagenet_r"
  yield "absent_class", "imagenet_sketch"
  for domain in ("art", "clipart", "product", "real_world"):
    yield "absent_class", f"office_home,{domain}"
  yield "flyp", None
  yield "carot", None
  yield "carot", "rn50"


# Configs on a supervised ResNet-50 with Mai et al.'s recipe: float32, and "epochs" of 500
# iterations as a step count (OSU-MLB/Fine-Tuning-Is-Fine-If-Calibrated py/util/cmd.py).
RESNET_CONFIGS = {("absent_class", "imagenet_r"), ("absent_class", "imagenet_sketch")}


@pytest.mark.parametrize("name,arg", list(_full_configs()))
def test_full_configs_build_and_name_known_datasets_and_checkpoints(name, arg):
  config = experiments.load(name + (f":{arg}" if arg else ""))
  experiments.validate(config, check_files=False)
  if (name, arg) in RESNET_CONFIGS:
    assert config.model.checkpoints == ("timm/resnet50.tv_in1k",)
    assert config.train.total_steps == 50 * 500 and config.train.model.dtype == "float32"
    return
  for checkpoint in config.model.checkpoints:
    assert checkpoint in (*config_lib.BACKBONES, config_lib.OPENAI_RN50)  # never a tiny model
  assert config.train.total_steps == -1  # the papers' epochs, not a step count
  # float32 where the official code evaluates in float32 (backdoor: trainer.py), else bfloat16
  dtype = "float32" if name == "backdoor" else "bfloat16"
  assert config.data.image_size == 224 and config.train.model.dtype == dtype


def test_full_configs_follow_the_papers():
  wise = experiments.load("wise_ft")
  assert wise.data.shifts == ("imagenet_v2@test", "imagenet_r@test", "imagenet_sketch@test",
                              "objectnet@test", "imagenet_a@test")
  assert (wise.data.train, wise.data.test) == ("imagenet2012@train", "imagenet2012@validation")
  assert wise.wise_ft.alphas[0] == 0.0 and wise.wise_ft.alphas[-1] == 1.0
  assert len(wise.wise_ft.alphas) == 11
  assert experiments.load("wise_ft:linear").wise_ft.linear  # a head on cached features
  backdoor = experiments.load("backdoor:imagenet_lt")
  assert backdoor.model.checkpoints == config_lib.BACKBONES
  assert backdoor.train.model.activation == "quick_gelu"  # clip.build_model rebuilds all three
  carot_rn50 = experiments.load("carot:rn50")
  assert carot_rn50.model.checkpoints == ("timm/resnet50_clip.openai",)
  assert carot_rn50.published.table is None  # no published RN50 row to print beside it
  assert experiments.load("carot:rn50,runlocal").model.checkpoints == ("tiny-rn:0",)
  for ratio in (10, 50, 100):
    config = experiments.load(f"backdoor:cifar100_lt,backdoor.imbalance_ratio={ratio}")
    assert (config.data.train, config.backdoor.imbalance_ratio) == ("cifar100@train", ratio)
    assert config.train.model.adapter_dim == 4  # 2^floor(log2(100 / 24))
  assert experiments.load("absent_class:imagenet_r").absent_class.num_seen == 100
  assert experiments.load("absent_class:imagenet_sketch").absent_class.num_seen == 500
  office_home = experiments.load("absent_class:office_home").absent_class
  assert (office_home.num_seen, office_home.test_fraction) == (30, 0.3)  # of 65 classes, 7:3
  # The paper's ImageNet-supervised ResNet-50 (torchvision's weights) and optimiser where glajax
  # has its source model; CLIP's zero-shot head for Office-Home and with the clip arg.
  absent = experiments.load("absent_class:imagenet_r").train
  assert (absent.recipe, absent.batch_size) == ("finetune_sgd", 64)
  assert (absent.optimizer.learning_rate, absent.optimizer.weight_decay) == (1e-3, 1e-4)
  assert absent.optimizer.nesterov and absent.optimizer.momentum == 0.9
  assert absent.optimizer.groups[0]["lr_scale"] == 0.1  # the backbone at 0.1·lr
  for spec in ("absent_class:imagenet_r,clip", "absent_class:office_home"):
    clip = experiments.load(spec)
    assert (clip.model.checkpoints, clip.train.recipe) == (("openai/clip-vit-base-patch16",),
                                                          "finetune")
  for shots in (1, 2, 4, 8, 16):
    assert experiments.load(f"gla_fewshot:dtd,gla.shots={shots}").gla.shots == shots
  dtd = experiments.load("gla_fewshot:dtd")  # validation shots from DTD's own validation split
  assert (dtd.data.validation, dtd.gla.val_shots, dtd.gla.prior_data) == (
      "dtd@validation", 0, "training")
  imagenet = experiments.load("gla_fewshot:imagenet2012")  # k more shots of the training split
  assert (imagenet.data.validation, imagenet.gla.val_shots, imagenet.gla.val_shots_max) == (
      "imagenet2012@train", 0, 0)
  for spec in ("wise_ft", "carot", "gla_fewshot:dtd", "absent_class", "backdoor"):
    assert experiments.load(spec).train.recipe  # the recipe a config names is the one that runs
  assert experiments.load("carot").train.carot.lambda_oc == 0.2
  assert experiments.load("flyp").train.carot.lambda_oc == 0.0


def test_missing_dataset_dir_or_checkpoint_fails_before_any_work(tmp_path):
  workdir = tmp_path / "work"
  cases = [
      ("wise_ft:runlocal,data.manual_dir='/no/such/dir'", DatasetError, "/no/such/dir"),
      ("wise_ft:runlocal,data.data_dir='/no/such/tfds'", DatasetError, "/no/such/tfds"),
      ("wise_ft:runlocal,model.checkpoints=('/no/such/checkpoint',)", CheckpointError,
       "/no/such/checkpoint"),
      ("wise_ft:runlocal,model.checkpoints=('nobody/no-such-clip',)", CheckpointError,
       "nobody/no-such-clip"),  # offline (conftest): not in the hub cache
      (f"gla_longtail:runlocal,data.train='imagenet_lt@train',data.data_dir='{tmp_path}'",
       DatasetError, "manual_dir"),  # needs a manual download, not prepared
      ("wise_ft:runlocal,data.train='no_such_dataset@train'", DatasetError, "no_such_dataset"),
      ("gla_fewshot:runlocal,data.validation=None", ConfigError, "data.validation"),
      ("absent_class:imagenet_r,data.test='imagenet_r@test[80%:]'", ConfigError, "data.test"),
      ("wise_ft:data.manual_dirs.objectnet='/no/objectnet'", DatasetError, "/no/objectnet"),
      (f"wise_ft:data.data_dir='{tmp_path}'", DatasetError,
       "data.manual_dirs.imagenet2012"),  # the full config: ImageNet is not prepared there
  ]
  for spec, error, needle in cases:
    with pytest.raises(error, match=needle):
      experiments.run(spec, str(workdir))
    assert not workdir.exists()  # nothing was written


def test_workdir_of_another_experiment_is_refused(tmp_path):
  claim = lambda spec, d: runner.claim_workdir(  # noqa
      experiments.load(spec), str(tmp_path / d), experiments.fingerprint(experiments.load(spec)))
  first = experiments.fingerprint(experiments.load("wise_ft:runlocal"))
  claim("wise_ft:runlocal", "a")
  claim("wise_ft:runlocal,data.eval_batch_size=8", "a")  # same experiment: not fingerprinted
  claim("wise_ft:runlocal,wise_ft.alphas=(0.0, 0.25, 1.0)", "a")  # post-hoc: re-run on logits
  claim("wise_ft:runlocal,train.sharding=fsdp,train.log_every=3", "a")  # placement, logging
  with pytest.raises(ConfigError, match=first):
    claim("wise_ft:runlocal,seed=1", "a")
  with pytest.raises(ConfigError, match=first):
    claim("wise_ft:runlocal,train.optimizer.learning_rate=0.5", "a")
  with pytest.raises(ConfigError, match="another --workdir"):
    experiments.run("absent_class:runlocal", str(tmp_path / "a"))
  (tmp_path / "b" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ConfigError, match="unknown experiment"):
    claim("wise_ft:runlocal", "b")


def test_report_table_shows_published_numbers_alongside():
  """Published rows come from the package's published.json, mapped to our rows and columns,
  in percent, with their source and setting."""
  published = {"table": "wise_ft/vit_b16_table5", "columns": {"ID": "IN", "shift": "R"},
               "rows": (("fine-tuned", "fine-tuned end-to-end (alpha=1)"),)}
  entry = report.table("T", ["ID", "shift"], [("zero-shot", {"ID": 0.5, "shift": 0.25}),
                                              ("fine-tuned", {"ID": 0.75, "shift": np.nan})],
                       published)
  text = report.markdown_table(entry)
  assert "| zero-shot | 50.0 | 25.0 |" in text
  assert "| fine-tuned | 75.0 | – |" in text  # NaN is shown as missing, never as a number
  assert "| *fine-tuned — published* | *81.3* | *65.6* |" in text  # Table 5: IN 81.3, R 65.6
  assert "Wortsman et al." in text and "Table 5" in text
  claims = report.markdown_table(report.table("T", ["ID"], [("a", {"ID": 0.5})],
                                              {"table": "backdoor"}))
  assert "+1.67" in claims  # a paper with headline claims only: cited as such
  with pytest.raises(KeyError):
    report.table("T", ["ID"], [], {"table": "wise_ft/no_such_table"})


def _gla_table(config):
  rows = [("GLA", {"ID": 0.6, "head": 0.7, "medium": 0.6, "tail": 0.5})]
  return report.place_published(report.table("GLA", ["ID", "head", "medium", "tail"], rows,
                                             config.published, context={"shots": 4}), config)


def test_published_rows_are_a_comparison_only_in_the_tables_setting():
  """GLA's few-shot table is RN50 with rn50_ep50_shot{k} and the best validation epoch: the
  ViT-B/16 config prints it apart, naming each difference; the default config is that setting
  and prints it as the comparison (GLA.FS's 4-shot RN50 number, 63.31)."""
  differing = experiments.load("gla_fewshot:imagenet2012,vit_b16,gla.shots=4")
  entry = _gla_table(differing)
  assert entry["published"] == [] and entry["published_apart"][0]["values"]["ID"] == 0.6331
  assert entry["published_differs"] == [
      "backbone: ours CLIP ViT-B/16, published CLIP RN50",
      "gla.fewshot_recipe: ours vit_b16_ep50, published rn50_ep50",
      "gla.final_model: ours last_step, published best_val"]
  text = report.markdown_table(entry)
  assert "| *GLA — published* |" not in text
  assert "Published in another setting, not a comparison (backbone: ours CLIP ViT-B/16" in text
  assert "| *GLA* | *63.3* |" in text
  matching = experiments.load("gla_fewshot:imagenet2012,gla.shots=4")
  assert (matching.model.checkpoints, matching.gla.fewshot_recipe, matching.gla.final_model) == (
      ("timm/resnet50_clip.openai",), "rn50_ep50", "best_val")
  entry = _gla_table(matching)
  assert entry["published_apart"] == [] and entry["published_differs"] == []
  assert "| *GLA — published* | *63.3* |" in report.markdown_table(entry)
  other_data = experiments.load("gla_fewshot:imagenet2012,gla.shots=4,data.test=imagenet_v2@test")
  assert _gla_table(other_data)["published_differs"] == [
      "data.test: ours imagenet_v2, published imagenet2012"]
  wise_ft = experiments.load("wise_ft")
  assert report.setting_differences(report.published_entry(
      wise_ft.published.table)[1]["setting"], wise_ft) == []  # the paper configs' own setting


def test_every_published_row_a_config_names_exists():
  for spec in ("wise_ft", "wise_ft:linear", "flyp", "carot", "gla_fewshot", "gla_fewshot:dtd",
               "gla_fewshot:vit_b16",
               "gla_fewshot:imagenet2012,gla.shots=4", "gla_imagenet",
               "backdoor", "absent_class"):
    config = experiments.load(spec)
    paper, entry = report.published_entry(config.published.table)
    assert paper["source"]
    for _, theirs in config.published.rows:
      assert theirs.format(shots=config.gla.shots if "gla" in config else 0) in entry["rows"], (
          spec, theirs)


def _params(directory):
  from safetensors.numpy import load_file
  return load_file(os.path.join(directory, "model.safetensors"))


def test_tiny_wise_ft_end_to_end(tmp_path, capsys, monkeypatch):
  """The runlocal WiSE-FT config: report complete, numbers equal to their cached logits, the
  exported α = 0.5 model the average of the zero-shot and fine-tuned weights, and a second run
  resumes without recomputing anything."""
  from glajax import cli
  workdir = tmp_path / "wise"
  assert cli.main(["run", "wise_ft:runlocal", "--workdir", str(workdir)]) == 0
  printed = capsys.readouterr().out
  assert str(workdir / "report.md") in printed and str(workdir / "final") in printed
  result = json.loads((workdir / "report.json").read_text())
  assert {"wise_ft_curve.png", "reliability.png"} <= set(result["plots"])
  for plot in result["plots"]:
    assert (workdir / plot).stat().st_size > 1000
  labels = [row["label"] for row in result["tables"][0]["rows"]]
  assert labels == ["zero-shot (α=0)", "WiSE-FT α=0.5", "fine-tuned (α=1)"]
  assert result["tables"][0]["columns"] == ["ID", "test_sketch", "test_noise", "avg shifts"]
  tag = next(n for n in os.listdir(workdir / "runs") if n.startswith("finetuned-"))
  cached = np.load(workdir / "logits" / f"{tag}__demo_shapes_tiny_test_photo.npz")
  assert cached["logits"].shape == (100, 100)  # the tiny world's photo test set, 100 classes
  accuracy = np.mean(cached["logits"].argmax(-1) == cached["labels"])
  # the report's statistics are float32: equal to NumPy's float64 within its rounding
  assert result["tables"][0]["rows"][2]["values"]["ID"] == pytest.approx(accuracy, abs=1e-7)
  # Each shift's paired change (WiSE-FT's per-shift tables) against the two cached logits.
  zs_tag = next(n.split("__")[0] for n in os.listdir(workdir / "logits")
                if n.startswith("zeroshot-"))
  change = result["results"]["effects"]["fine-tuned (α=1) vs zero-shot (α=0)"]
  for split in ("test_sketch", "test_noise"):
    accuracies = []
    for run in (tag, zs_tag):
      with np.load(workdir / "logits" / f"{run}__demo_shapes_tiny_{split}.npz") as f:
        accuracies.append(np.mean(f["logits"].argmax(-1) == f["labels"]))
    cell = change[f"Δ {split}"]
    assert cell["estimate"] == pytest.approx(accuracies[0] - accuracies[1], abs=1e-6)
    assert cell["low"] <= cell["estimate"] <= cell["high"]
  assert "Δ test_sketch" in result["tables"][-1]["columns"]
  # WiSE-FT in closed form on the exported transformers-format tensors.
  zeroshot = _params(workdir / "models" / "tiny_0")
  finetuned = _params(workdir / "final" / "finetuned")
  merged = _params(workdir / "final" / "wise_ft_alpha0.5")
  vision = [k for k in zeroshot if k.startswith("vision_model.")]
  assert any(not np.allclose(zeroshot[k], finetuned[k]) for k in vision)  # it was trained
  for key in zeroshot:
    np.testing.assert_allclose(merged[key], 0.5 * zeroshot[key] + 0.5 * finetuned[key],
                               rtol=1e-6, atol=1e-6)
  assert "head.npz" in os.listdir(workdir / "final" / "wise_ft_alpha0.5")
  markdown = (workdir / "report.md").read_text()
  assert "WiSE-FT on demo_shapes_tiny (finetune): accuracy, ID and shifts" in markdown
  # Resume: everything is cached, nothing is recomputed.
  stamps = {p: p.stat().st_mtime_ns for p in (workdir / "logits").iterdir()}
  again = experiments.run("wise_ft:runlocal", str(workdir))
  assert again["tables"] == result["tables"]
  assert stamps == {p: p.stat().st_mtime_ns for p in (workdir / "logits").iterdir()}
  # Another process of a multi-host run computes the same report and writes nothing.
  from glajax import parallel as mesh
  monkeypatch.setattr(mesh, "is_primary", lambda: False)
  for name in ("report.json", "report.md", "wise_ft_curve.png"):
    (workdir / name).unlink()
  assert experiments.run("wise_ft:runlocal", str(workdir))["tables"] == result["tables"]
  assert not any((workdir / name).exists() for name in ("report.json", "report.md",
                                                        "wise_ft_curve.png"))


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
  from glajax import cli
  assert cli.main(["run", "wise_ft:runlocal,bogus=1", "--workdir", str(tmp_path / "w")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("glajax run: ") and "'bogus'" in err and "wise_ft" in err and "\n" not in err[:-1]
  assert not (tmp_path / "w").exists()


def test_roles_guard_in_closed_form():
  """The disjointness rule: different splits, or different parts of one partition."""
  train = roles.DataRef("d", "train")
  test = roles.DataRef("d", "test")
  fit = lambda ref: roles.Use(roles.FIT, "f", "key.fit", ref)  # noqa: E731
  tested = lambda ref: roles.Use(roles.TEST, "t", "key.test", ref)  # noqa: E731
  roles.check_plan([fit(train), tested(test)])
  holdout = lambda part: train.then(roles.holdout(0.3, 0, part))  # noqa: E731
  roles.check_plan([fit(holdout(0).then(roles.classes(5, 0))), tested(holdout(1))])
  shots = lambda part: train.then(roles.shots((2, 2), 0, part))  # noqa: E731
  roles.check_plan([fit(shots(0)), fit(shots(1)), tested(test)])
  for bad in ([fit(test), tested(test)], [fit(holdout(1)), tested(holdout(1))],
              [fit(train), tested(holdout(1))],
              [fit(train.then(roles.holdout(0.2, 0, 0))), tested(holdout(1))]):
    with pytest.raises(ConfigError, match="key.fit"):
      roles.check_plan(bad)
  sliced = lambda split: roles.DataRef("d", split)  # noqa: E731
  roles.check_plan([fit(sliced("train[:90%]")), tested(sliced("train[90%:]")),
                    tested(sliced("validation")), tested(sliced("test+validation[50%:]"))])
  for fitted, tests in (("train[:90%]", "train[50%:]"), ("train", "train[90%:]"),
                        ("train[:900]", "train[90%:]"), ("train[-10%:]", "train[:5%]"),
                        ("validation[:50%]", "test+validation[40%:]")):
    with pytest.raises(ConfigError, match="key.fit"):
      roles.check_plan([fit(sliced(fitted)), tested(sliced(tests))])
  labels = np.repeat(np.arange(10), 10)
  a, b = (roles.rows(shots(p), labels, 10) for p in (0, 1))
  assert not set(a) & set(b) and len(a) == len(b) == 20

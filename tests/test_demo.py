"""The demo's pieces (effect thresholds, report, pre-training inputs); the reduced run is slow."""
import json
import os

import numpy as np
import pytest

from glajax.data import world
from glajax.demo import effects as effects_lib
from glajax.demo import parts, pretrain, report


def _interval(estimate, half=0.01):
  return {"estimate": estimate, "low": estimate - half, "high": estimate + half}


def _reports(debias=0.05, ood=0.03, log_prior=None, half=0.01):
  """Parts' reports as the runner writes them, reduced to what the effects read: each kind's
  paired differences (``results["effects"]``)."""
  gla = {"debiased zero-shot vs zero-shot": {"Δ ID": _interval(debias, half),
                                             "Δ ECE ID": _interval(0.02)},
         "GLA vs fine-tuned": {"Δ ID": _interval(0.05), "Δ ECE ID": _interval(-0.01)}}
  wise = {"fine-tuned (α=1) vs zero-shot (α=0)": {"Δ ID": _interval(0.2),
                                                  "Δ test_sketch": _interval(ood),
                                                  "Δ avg shifts": _interval(0.01)},
          "WiSE-FT α=0.5 vs zero-shot (α=0)": {"Δ avg shifts": _interval(0.05),
                                               "Δ ID": _interval(0.15)},
          "WiSE-FT α=0.5 vs fine-tuned (α=1)": {"Δ avg shifts": _interval(0.05 - ood),
                                                "Δ ID": _interval(-0.05)}}
  return {"gla": {"results": {"effects": gla, "log_prior": log_prior}},
          "wise_ft": {"results": {"effects": wise}}}


TRUE_COUNTS = np.arange(1, 101)


def test_effects_are_judged_by_their_intervals():
  effects = effects_lib.effects(_reports(log_prior=np.log(TRUE_COUNTS / TRUE_COUNTS.sum())),
                                TRUE_COUNTS)
  spearman = effects["prior_spearman"]
  assert spearman["value"] == pytest.approx(1.0) and spearman["appeared"] is True
  assert spearman["interval"]["low"] == pytest.approx(1.0)   # every resample is monotone
  assert effects["debias_gain"]["appeared"] is True
  assert effects["debias_gain"]["cost"] == _interval(0.02)      # its ECE, beside it
  assert effects["finetune_id_gain"]["value"] == pytest.approx(0.2)
  sketch = effects["finetune_sketch_drop"]
  assert sketch["appeared"] is False  # sketch accuracy went up: not the effect
  assert sketch["value"] == pytest.approx(0.03) and sketch["cost"] == _interval(0.01)
  # WiSE-FT against both endpoints: the least favourable comparison is reported
  wise = effects["wise_ft_ood_gain"]
  assert wise["value"] == pytest.approx(0.02) and wise["appeared"]
  assert wise["comparison"] == "WiSE-FT α=0.5 vs fine-tuned (α=1)"
  assert effects["gla_id_gain"]["value"] == pytest.approx(0.05)
  assert effects["carot_ece_change"] == {**effects["carot_ece_change"], "measured": False,
                                         "appeared": False, "value": None}
  # a gain whose interval reaches 0 has not appeared, however large its estimate
  effects = effects_lib.effects(_reports(debias=0.03, ood=0.06, half=0.04), TRUE_COUNTS)
  assert effects["debias_gain"]["value"] == pytest.approx(0.03)
  assert not effects["debias_gain"]["appeared"]
  assert not effects["wise_ft_ood_gain"]["appeared"]   # below the fine-tuned model's OOD
  noisy = np.log(TRUE_COUNTS) + np.random.default_rng(0).normal(0, 3, 100)
  effects = effects_lib.effects(_reports(debias=0.0, ood=-0.03, log_prior=noisy), TRUE_COUNTS)
  assert not effects["prior_spearman"]["appeared"]       # far below 0.9
  low, high = effects["prior_spearman"]["interval"]["low"], effects["prior_spearman"][
      "interval"]["high"]
  assert low < effects["prior_spearman"]["value"] < high
  assert not effects["debias_gain"]["appeared"]
  assert effects["finetune_sketch_drop"]["appeared"]
  assert not effects_lib.effect_appeared("debias_gain", _interval(float("nan")))
  assert not effects_lib.effect_appeared("debias_gain", None)


def test_spearman_interval_against_scipy():
  """The percentile bootstrap over classes, recomputed with SciPy's Spearman on the same
  resamples."""
  from scipy import stats
  rng = np.random.default_rng(1)
  estimated = np.log(TRUE_COUNTS) + rng.normal(0, 1, 100)
  got = effects_lib.spearman_interval(estimated, TRUE_COUNTS, num_samples=200, seed=3)
  draws, resample = [], np.random.default_rng(3)
  for _ in range(200):
    take = resample.integers(0, 100, 100)
    draws.append(stats.spearmanr(estimated[take], TRUE_COUNTS[take])[0])
  assert got["estimate"] == pytest.approx(stats.spearmanr(estimated, TRUE_COUNTS)[0])
  assert [got["low"], got["high"]] == pytest.approx(np.percentile(draws, [2.5, 97.5]))


def test_report_states_each_effect_honestly(tmp_path):
  reports = _reports(log_prior=np.zeros(100))
  reports["gla"]["tables"], reports["gla"]["plots"] = [], []
  results = {"effects": effects_lib.effects(reports, TRUE_COUNTS),
             "timings_s": {"pretrain": 1.0, "gla": 2.0},
             "prior": {"spearman": float("nan")}}
  files = report.write(str(tmp_path), results, {"gla": reports["gla"]}, TRUE_COUNTS, quick=True)
  assert "NaN" not in open(files["json"]).read()  # strict JSON: NaN is written as null
  text = open(files["markdown"]).read()
  assert "**did not appear in this world**" in text
  assert "not measured (part missing)" in text  # backdoor, absent-class, CaRot: no reports
  assert "+5.0 [+4.0, +6.0] pp" in text and "Δ ECE ID +2.0 [+1.0, +3.0] pp" in text
  assert "glajax demo --workdir" in text and "--quick" in text
  assert "| total | 3.0 |" in text  # a timing table, not a dict
  for effect in effects_lib.EFFECTS.values():
    assert effect.why in text
  saved = json.load(open(files["json"]))
  assert saved["prior"]["spearman"] is None and saved["effects"]["debias_gain"]["appeared"]
  assert files["plots"] == [str(tmp_path / "prior.png")]


def test_demo_parts_are_ordinary_configs_with_checked_plans(tmp_path):
  """Each part is a config of a registered kind, validated and its data plan checked by the
  same code as `glajax run`; the recipe each names is the one its report will say ran."""
  from glajax import experiments
  foundations = [str(tmp_path / f"foundation_{i}") for i in range(2)]
  for directory in foundations:  # stand-ins for pre-trained checkpoints: their config.json
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump({"model_type": "clip", "vision_config": {"patch_size": 8, "image_size": 32}}, f)
    open(os.path.join(directory, "model.safetensors"), "wb").close()  # its weights, unread
  configs = parts.configs(parts.SCALES["quick"], foundations)
  assert set(configs) == {"gla", "wise_ft", "backdoor", "absent_class", "flyp", "carot",
                          "compose"}
  for name, config in configs.items():
    experiments.validate(config, check_files=False)
    assert config.experiment in experiments.KINDS
  assert (configs["flyp"].train.recipe, configs["carot"].train.recipe) == ("flyp", "carot")
  assert configs["backdoor"].model.checkpoints == tuple(foundations)
  assert configs["wise_ft"].data.validation == "demo_shapes_quick@validation"
  # Mai et al.'s optimiser (py/util/model.py, py/util/cmd.py): SGD, Nesterov momentum 0.9, no
  # warmup, the backbone at 0.1× the head's learning rate
  absent = configs["absent_class"].train
  assert (absent.recipe, absent.optimizer.name, absent.optimizer.nesterov) == (
      "finetune_sgd", "sgd", True)
  assert absent.optimizer.learning_rate == parts.SCALES["quick"].absent_lr
  assert absent.optimizer.warmup_steps == 0
  assert [(g["pattern"], g["lr_scale"]) for g in absent.optimizer.groups] == [("<image>", 0.1)]
  # GLA's few-shot setting: prompt tuning on one shot per class, the prior from every training
  # photo (training-side rows, never a test split), the shots' validation from @validation
  gla = configs["gla"]
  assert (gla.train.recipe, gla.gla.shots, gla.train.template) == (
      "prompt_tuning", 1, world.TEMPLATES[0])
  assert gla.gla.prior_data == "demo_shapes_quick@train"
  assert gla.data.validation == "demo_shapes_quick@validation"


def test_caption_ids_match_the_stored_captions(tmp_path):
  builder = world.builder("tiny", data_dir=str(tmp_path))
  builder.download_and_prepare()
  texts = pretrain.caption_texts()
  assert len(texts) == world.NUM_CLASSES
  stored = list(builder.as_dataset(split="pretrain_1", shuffle_files=False).as_numpy_iterator())
  captioned = pretrain.caption_dataset(builder, "pretrain_1")
  for ex, cap in zip(stored[:50], captioned.take(50).as_numpy_iterator()):
    assert texts[cap["label"]] == ex["caption"].decode()
  arrays = pretrain.caption_arrays(builder, "pretrain_1")  # what pre-training reads: all of it
  assert arrays["image"].dtype == np.uint8 and arrays["label"].dtype == np.int32
  assert arrays["image"].shape == (len(stored), 32, 32, 3) and len(stored) == 400
  np.testing.assert_array_equal(arrays["image"], np.stack([ex["image"] for ex in stored]))
  assert [texts[i] for i in arrays["label"]] == [ex["caption"].decode() for ex in stored]


def test_device_crops_match_the_pipeline():
  """augment_images = preprocess.train_transform (no flip) on the device: a window resized back
  like TF's crop-then-resize, then CLIP normalisation."""
  import jax
  import tensorflow as tf
  from glajax.data import preprocess, transforms
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
  windows = np.array([[0, 0, 32, 32], [1, 1, 29, 31], [3, 6, 28, 26]], np.float32)
  resized = pretrain._resize_windows(images, *windows.T)  # pylint: disable=protected-access
  for image, (top, left, h, w), out in zip(images, windows.astype(int), np.asarray(resized)):
    expected = tf.image.resize(image[top:top + h, left:left + w], (32, 32), method="bicubic",
                               antialias=True).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-3)
  uint8 = images.astype(np.uint8)
  whole = pretrain.augment_images(uint8, jax.random.key(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(whole, preprocess.normalize(tf.constant(uint8)).numpy(), atol=1e-5)
  crops = jax.jit(pretrain.augment_images)(uint8, jax.random.key(1))
  np.testing.assert_array_equal(crops, jax.jit(pretrain.augment_images)(uint8, jax.random.key(1)))
  assert crops.shape == (3, 32, 32, 3) and crops.dtype == np.float32
  assert not np.allclose(crops, whole, atol=0.1)  # the crops do crop
  low = (0 - np.asarray(transforms.CLIP_MEAN)) / transforms.CLIP_STD
  high = (1 - np.asarray(transforms.CLIP_MEAN)) / transforms.CLIP_STD
  assert np.all(crops >= low - 1e-5) and np.all(crops <= high + 1e-5)


def test_foundation_config_shapes():
  config = pretrain.foundation_config(pretrain.PretrainSpec(width=64, layers=2))
  assert config.vision.image_size == 32 and config.vision.grid_size == 4
  assert config.vision.hidden_size == config.text.hidden_size == 64
  assert config.text.vocab_size == 49408  # the real CLIP BPE vocabulary
  assert config.vision.unroll == config.text.unroll == 2   # the blocks inline, no scan loop


def test_scales_and_world_configs_agree():
  configs = {c.name for c in world.DemoShapes.BUILDER_CONFIGS}
  for scale in parts.SCALES.values():
    assert scale.world_config in configs
    assert scale.batch_size % 8 == 0 and scale.pretrain.batch_size % 8 == 0  # 8-device mesh


@pytest.mark.slow
def test_pretrain_is_cached(tmp_path):
  """A few contrastive steps lower the loss; the second call loads the save_clip checkpoint."""
  import glajax
  builder = world.builder("tiny", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  spec = pretrain.PretrainSpec(width=32, steps=12, batch_size=64, learning_rate=5e-3,
                               warmup_steps=2)
  tokenizer = glajax.load_tokenizer()
  model = pretrain.pretrain(builder, 1, spec, str(tmp_path), tokenizer=tokenizer, progress=False)
  (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("pretrain_1-")]
  log = [json.loads(line) for line in open(run / "metrics.jsonl")]
  assert log[-1]["loss"] < log[0]["loss"]
  again = pretrain.pretrain(builder, 1, spec, str(tmp_path), tokenizer=tokenizer, progress=False)
  np.testing.assert_allclose(again.logit_scale[...], model.logit_scale[...], atol=1e-6)
  np.testing.assert_allclose(again.visual_projection.kernel[...],
                             model.visual_projection.kernel[...], atol=1e-6)


# Effects `glajax demo --quick` must show, with the thresholds this test holds them to (the
# report states each effect's own threshold from effects.EFFECTS). Measured on 2 CPU cores (1
# device, seed 0, world 4.0.0): prior Spearman 0.889 [0.837, 0.920] (slope 0.82), debias +19.7
# [+15.0, +24.0] pp, fine-tune ID +27.3 [+22.5, +32.3], GLA over one-shot prompt tuning +6.5
# [+3.7, +9.2], temperature's ID ECE −14.1 [−16.7, −7.8], LA vs CE +15.5 [+12.4, +18.8], ALG γ
# absent +3.3 [+1.4, +5.5] and PCV γ absent +43.3 [+37.8, +49.3] (Mai et al.'s SGD), CaRot vs
# FLYP OOD ECE −8.1 [−9.9, −5.7]. Not asserted: what the quick world (600 test rows per domain,
# no cue) does not resolve (fine-tuning's sketch change −3.0 [−6.7, +0.7], WiSE-FT α = 0.5 −7.2
# against the fine-tuned model, the backdoor ensemble −0.3, compose's GLA stage on CaRot +0.5
# [−1.0, +2.0]).
QUICK_THRESHOLDS = {
    "prior_spearman": 0.7,
    "debias_gain": 0.02,
    "finetune_id_gain": 0.04,
    "gla_id_gain": 0.02,
    "pcv_absent_gain": 0.1,
}
# ... of which these appear under the report's rule (the paired interval excludes 0).
QUICK_APPEAR = ("debias_gain", "finetune_id_gain", "gla_id_gain", "temperature_ece_change",
                "la_vs_ce_gain", "alg_absent_gain", "pcv_absent_gain", "carot_ece_change")


@pytest.mark.slow
def test_quick_demo_shows_its_effects(tmp_path):
  import glajax.demo
  results = glajax.demo.run(str(tmp_path), quick=True, progress=False)
  effects = results["effects"]
  assert all(effect["measured"] for effect in effects.values())
  for name, threshold in QUICK_THRESHOLDS.items():
    assert effects[name]["value"] > threshold, (name, effects[name]["value"])
  for name in QUICK_APPEAR:
    assert effects[name]["appeared"], (name, effects[name]["interval"])
  for effect in effects.values():   # the verdict is the interval's
    interval = effect["interval"]
    assert interval["low"] <= effect["value"] <= interval["high"]
  # The caption loss's optimum is log p(caption | image): log-prior estimates with slope ≈ 1.
  assert 0.6 < results["prior"]["slope"] < 1.4
  for name in ("report.md", "report.json", "prior.png", "wise_ft/wise_ft_curve.png",
               "wise_ft/reliability.png", "absent_class/ausuc.png", "gla/report.md"):
    assert (tmp_path / name).is_file(), name
  text = (tmp_path / "report.md").read_text()
  for effect in effects.values():
    assert effect["description"] in text
  for index in range(2):  # the cache a second run starts from (see test_pretrain_is_cached)
    assert (tmp_path / "models" / "quick_seed0" / f"foundation_{index}" / "config.json").is_file()


def test_a_rerun_keeps_the_first_runs_timings(tmp_path):
  import glajax.demo as demo
  assert demo._first_run_timings(str(tmp_path), "quick", 0) is None  # noqa  pylint: disable=protected-access
  (tmp_path / "report.json").write_text(json.dumps(
      {"scale": "quick", "seed": 0, "timings_s": {"pretrain": 50.0, "gla": 20.0}}))
  first = demo._first_run_timings(str(tmp_path), "quick", 0)  # noqa  pylint: disable=protected-access
  assert first == {"pretrain": 50.0, "gla": 20.0}
  assert demo._first_run_timings(str(tmp_path), "quick", 1) is None  # noqa  another seed
  results = {"effects": {}, "timings_s": first, "rerun_timings_s": {"pretrain": 1.0, "gla": 2.0}}
  text = report.markdown(results, {}, "glajax demo --workdir w")
  assert "in 70 s (first run)" in text and "reused the cache: 3 s" in text

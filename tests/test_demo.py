"""The demo's pieces: effect thresholds, the report, pre-training inputs; the reduced run is slow."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax.demo import pretrain, report, stages, world


def _fake_results(**values):
  results = {"prior": {"spearman": values.get("prior", 0.95)},
             "debiased_zeroshot": {"gain_photo": values.get("debias", 0.05)},
             "finetune": {"id_gain": 0.2, "ood_change": values.get("ood", 0.03)}}
  return results


def test_effects_thresholds_and_missing_stages():
  effects = stages.effects(_fake_results(prior=0.95, debias=0.05, ood=0.03))
  assert effects["prior_spearman"]["appeared"] is True
  assert effects["debias_gain"]["appeared"] is True
  assert effects["finetune_id_gain"]["appeared"] is True
  assert effects["finetune_ood_change"]["appeared"] is False  # OOD went up: not the effect
  assert effects["carot_ece_change"] == {**effects["carot_ece_change"], "measured": False,
                                         "appeared": False, "value": None}
  effects = stages.effects(_fake_results(prior=0.89, debias=0.0, ood=-0.01))
  assert not effects["prior_spearman"]["appeared"]       # 0.89 < 0.9
  assert not effects["debias_gain"]["appeared"]          # a gain must be > 0
  assert effects["finetune_ood_change"]["appeared"]
  assert not stages.effect_appeared("debias_gain", float("nan"))


def test_report_states_each_effect_honestly(tmp_path):
  results = _fake_results(prior=0.2)
  results["effects"] = stages.effects(results)
  results["timings_s"] = {"world": 1.0}
  files = report.write(str(tmp_path), results, arrays={}, quick=True)
  text = open(files["markdown"]).read()
  assert "| estimated prior correlates with the true pre-training prior (Spearman ρ) | +0.200 | " \
         ">= 0.9 | **did not appear in this world** |" in text
  assert "not measured (stage missing)" in text
  assert "glajax demo --workdir" in text and "--quick" in text
  saved = json.load(open(files["json"]))
  assert saved["prior"]["spearman"] == 0.2 and saved["effects"]["debias_gain"]["appeared"]
  assert files["plots"] == []  # no stage produced plot data


def test_token_table_cut_is_exact_for_the_causal_text_tower():
  """Cutting the ids after the longest text's EOS gives the same text features (tol 1e-6)."""
  from glajax.models.clip import CLIP, CLIPConfig
  rng = np.random.default_rng(0)
  lengths = [3, 7, 5]
  ids = np.zeros((3, 77), np.int32)
  for row, length in enumerate(lengths):
    ids[row, 0] = 49406
    ids[row, 1:length + 1] = rng.integers(1, 1000, length)
    ids[row, length + 1] = 49407
  table = pretrain.token_table(lambda texts: ids, ["a", "b", "c"])
  assert table.shape == (3, max(lengths) + 2)
  model = CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model.encode_text(jnp.asarray(table)),
                             model.encode_text(jnp.asarray(ids)), atol=1e-6)


def test_caption_ids_match_the_stored_captions(tmp_path):
  builder = world.builder("tiny", data_dir=str(tmp_path))
  builder.download_and_prepare()
  texts = pretrain.caption_texts()
  assert len(texts) == world.NUM_CLASSES * len(world.DOMAINS)
  stored = builder.as_dataset(split="pretrain_1", shuffle_files=False)
  captioned = pretrain.caption_dataset(builder, "pretrain_1")
  for ex, cap in zip(stored.take(50).as_numpy_iterator(), captioned.take(50).as_numpy_iterator()):
    assert texts[cap["label"]] == ex["caption"].decode()


def test_foundation_config_shapes():
  config = pretrain.foundation_config(pretrain.PretrainSpec(width=64, layers=2))
  assert config.vision.image_size == 32 and config.vision.grid_size == 4
  assert config.vision.hidden_size == config.text.hidden_size == 64
  assert config.text.vocab_size == 49408  # the real CLIP BPE vocabulary


def test_scales_and_world_configs_agree():
  configs = {c.name for c in world.DemoShapes.BUILDER_CONFIGS}
  for scale in stages.SCALES.values():
    assert scale.world_config in configs
    assert scale.batch_size % 8 == 0 and scale.pretrain.batch_size % 8 == 0  # 8-device mesh

"""Every recipe trains a tiny CLIP on generated data through the engine."""
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax.models.clip import CLIP, CLIPConfig
from glajax.models.heads import LinearHead
from glajax import evaluate
from glajax.train import engine, recipes
from glajax.parallel import make_mesh
from glajax.train.prompt_tuning import tokenize_prompts
from glajax.zeroshot import zeroshot_head
from conftest import needs_devices

CLASSES, BATCH, SIZE = 4, 16, 32
_COLORS = np.random.default_rng(5).normal(size=(CLASSES, 1, 1, 3)).astype(np.float32)


_CLIPS = {}


def _clip(dtype=jnp.float32, resnet=False, **overrides):
  """A tiny random CLIP, a ViT or (``resnet``) a ModifiedResNet (built once per settings; the
  engine never mutates its input model)."""
  overrides = {"text_num_hidden_layers": 1,
               **({} if resnet else {"vision_num_hidden_layers": 1}), **overrides}
  key = (jnp.dtype(dtype).name, resnet, tuple(sorted(overrides.items())))
  if key not in _CLIPS:
    _CLIPS[key] = CLIP(CLIPConfig.tiny(resnet=resnet, **overrides), dtype=dtype,
                       param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  return nnx.clone(_CLIPS[key])


@functools.partial(jax.jit, static_argnums=2)
def _encode_with(state, images, graphdef):
  return nnx.merge(graphdef, state).encode_image(images)


def _encode_image(clip, images):
  graphdef, state = nnx.split(clip)
  return _encode_with(state, images, graphdef)


def _images(rng, labels):
  noise = rng.normal(size=(len(labels), SIZE, SIZE, 3)).astype(np.float32)
  return _COLORS[labels] + 0.5 * noise


def _data(start):
  step = start
  while True:
    step += 1
    rng = np.random.default_rng(step)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    yield {"image": _images(rng, labels), "label": labels}


def _eval_batches():
  rng = np.random.default_rng(999)
  labels = np.arange(16, dtype=np.int32) % CLASSES
  yield {"image": _images(rng, labels), "label": labels, "mask": np.ones(16, np.int32)}


def _one_device():
  """Recipe tests run on one device (cheaper on 2 cores); mesh invariance is tested separately."""
  return make_mesh(jax.devices()[:1])


def _engine_config(config, total):
  config.total_steps = total
  config.log_every = 1
  config.checkpoint_every = 0
  config.progress = False
  config.optimizer.warmup_steps = 2
  return config


def _losses(workdir, key="loss"):
  return [json.loads(line)[key] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _changed(before, after):
  return {k for k in before if not np.array_equal(before[k], after[k])}


def _zeroshot_head(clip):
  """A stand-in zero-shot head: the class colours' image embeddings, normalised, · exp(s)."""
  feats = _encode_image(clip, jnp.broadcast_to(_COLORS, (CLASSES, SIZE, SIZE, 3)))
  return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True) * 100.0


def test_finetune_loss_falls_text_tower_frozen_and_exports(tmp_path):
  clip = _clip(jnp.bfloat16)   # the recipe's bfloat16 compute, float32 params
  config = _engine_config(recipes.finetune(), 10)
  config.optimizer.learning_rate = 1e-3
  task = recipes.classifier_task(clip, LinearHead.from_zeroshot(_zeroshot_head(clip)), config)
  before = _flat(engine.split_model(task.model)[1])
  model, _ = engine.fit(task.model, task.loss_fn, config, _data, str(tmp_path), mesh=_one_device())
  task.export(model, str(tmp_path / "final"))
  logits, _ = evaluate.evaluate_logits(model, task.logits_fn, _eval_batches(), _one_device())
  history = _losses(tmp_path)
  assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])
  changed = _changed(before, _flat(engine.split_model(model)[1]))
  assert any(k.startswith("backbone/vision_model/") for k in changed)
  assert "head/kernel" in changed
  assert not any(k.startswith("backbone/text_model/") for k in changed)
  assert "backbone/logit_scale" not in changed
  assert logits.shape == (16, CLASSES)
  # The export: transformers-format CLIP + head, reloadable.
  config.model.update(dtype="float32", remat="block", unroll=2)
  reloaded = recipes.load_model(config, tmp_path / "final")
  assert reloaded.config.vision.remat == reloaded.config.text.remat == "block"
  assert reloaded.config.vision.unroll == reloaded.config.text.unroll == 2
  batch = next(_eval_batches())
  np.testing.assert_allclose(_encode_image(reloaded, batch["image"]),
                             _encode_image(_clip_f32_copy(model.backbone), batch["image"]), 1e-4, 1e-4)
  head = np.load(tmp_path / "final" / "head.npz")
  np.testing.assert_array_equal(head["kernel"], np.asarray(model.head.kernel[...]))


def _clip_f32_copy(clip):
  """The same parameters in a float32-compute CLIP."""
  graphdef, params = nnx.split(_clip(jnp.float32))
  return nnx.merge(graphdef, nnx.to_pure_dict(nnx.state(clip)))


@pytest.mark.slow
@needs_devices(2)
def test_tiny_clip_one_device_equals_eight(tmp_path):
  config = _engine_config(recipes.finetune(), 3)
  config.optimizer.learning_rate = 1e-3
  results = []
  for name, mesh in (("one", make_mesh(jax.devices()[:1])), ("eight", make_mesh())):
    clip = _clip(vision_remat="dots")   # rematerialised blocks, under the mesh
    task = recipes.classifier_task(clip, LinearHead.from_zeroshot(_zeroshot_head(clip)), config)
    model, _ = engine.fit(task.model, task.loss_fn, config, _data, str(tmp_path / name),
                          mesh=mesh)
    results.append(_flat(engine.split_model(model)[1]))
  # AdamW turns a parameter's near-zero gradient (e.g. k_proj's bias, exactly 0 in theory) into
  # a step of up to lr whose sign is rounding noise, which differs between meshes: atol 0.1·lr.
  for k in results[0]:
    np.testing.assert_allclose(results[0][k], results[1][k], rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.mark.slow
def test_linear_probe_on_cached_features_then_lp_ft(tmp_path):
  clip = _clip()
  config = recipes.lp_ft()
  lp, ft = _engine_config(config.lp, 20), _engine_config(config.ft, 2)
  lp.optimizer.learning_rate = 1.0   # the head's weights are ~100 / sqrt(D)
  features, labels = recipes.cache_features(clip, _eval_batches())
  np.testing.assert_allclose(features, _encode_image(clip, next(_eval_batches())["image"]),
                             1e-5, 1e-5)

  def feature_data(start):
    for batch in _data(start):
      yield {"features": np.asarray(_encode_image(clip, batch["image"])), "label": batch["label"]}

  wrong_head = np.roll(_zeroshot_head(clip), 1, axis=0)   # a head to correct
  task = recipes.linear_probe_task(LinearHead.from_zeroshot(wrong_head), lp)
  head, _ = engine.fit(task.model, task.loss_fn, lp, feature_data, str(tmp_path / "lp"),
                       mesh=_one_device())
  task.export(head, str(tmp_path / "lp" / "final"))
  history = _losses(tmp_path / "lp")
  assert history[-1] < 0.5 * history[0]
  assert (tmp_path / "lp" / "final" / "head.npz").exists()
  task = recipes.classifier_task(clip, head, ft)
  # LP-FT's second stage starts from the probed head.
  np.testing.assert_array_equal(task.model.head.kernel[...], head.kernel[...])
  engine.fit(task.model, task.loss_fn, ft, _data, str(tmp_path / "ft"), mesh=_one_device())


class _WordTokenizer:
  """A word-level stand-in for the CLIP tokenizer: SOT, one id per word or '.', EOT, zero pad."""

  def __init__(self):
    self.vocab = {}

  def __call__(self, texts):
    out = np.zeros((len(texts), 77), np.int32)
    for row, text in enumerate(texts):
      words = text.replace(".", " .").split()
      ids = [49406] + [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in words] + [49407]
      out[row, :len(ids)] = ids
    return out


@pytest.mark.parametrize("recipe, resnet", [pytest.param("flyp", False, marks=pytest.mark.slow),
                                            ("carot", False), ("carot", True)])
def test_contrastive_recipes(tmp_path, recipe, resnet):
  """FLYP and CaRot; on a ResNet CLIP CaRot's W_v is the attention pool's c_proj kernel."""
  clip = _clip(resnet=resnet)
  config = _engine_config(getattr(recipes, recipe)(), 4)
  config.optimizer.learning_rate = 1e-3
  if recipe == "carot":
    config.carot.teacher.every = 2
  tok, names = _WordTokenizer(), ["red", "green", "blue", "grey"]
  templates = ["a photo of a {}.", "a {} thing.", "{}"]
  task = recipes.contrastive_task(clip, tok, names, templates, config)
  assert task.model.prompt_ids[...].shape == (CLASSES, 3, 8)   # cut after the longest prompt's EOS
  model, state = engine.fit(task.model, task.loss_fn, config, _data, str(tmp_path),
                            mesh=_one_device(), teacher_update=task.teacher_update)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all(np.isfinite(l["loss"]) for l in lines)
  init_scale = float(_clip(resnet=resnet).logit_scale[...])
  assert float(model.backbone.logit_scale[...]) != init_scale       # FLYP trains the logit scale
  if recipe == "flyp":   # the evaluation path is the same for both; test it once
    logits, _ = evaluate.evaluate_logits(task.eval_model(model), task.logits_fn,
                                         _eval_batches(), _one_device())
    # Evaluation uses the zero-shot head rebuilt from the fine-tuned text tower.
    head = zeroshot_head(model.backbone, tok, names, templates, show_progress=False)
    want = recipes.ImageClassifier(model.backbone, LinearHead.from_zeroshot(head))(
        next(_eval_batches())["image"])
    np.testing.assert_allclose(logits[:len(want)], want, 1e-4, 1e-4)
  if recipe == "carot":
    assert {"orthogonality", "self_distillation", "clip_loss"} <= set(lines[0])
    total = (lines[0]["clip_loss"] + 0.2 * lines[0]["orthogonality"]
             + 0.05 * lines[0]["cross_projection"] + 1.5 * lines[0]["self_distillation"])
    assert lines[0]["loss"] == pytest.approx(total, rel=1e-5)
    assert state.teacher is not None
    w_v = clip.image_projection_kernel()
    penalty = np.linalg.norm(np.asarray(w_v).T @ np.asarray(w_v) - np.eye(w_v.shape[1]))
    assert lines[0]["orthogonality"] == pytest.approx(penalty, rel=1e-5)   # on the initial W_v
  else:
    assert state.teacher is None and "orthogonality" not in lines[0]
  assert (state.batch_stats is not None) == resnet   # model.train(): a ResNet's statistics train


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_sets_its_batch_norm_mode_and_says_why(name):
  """Each recipe (each stage of LP-FT) sets ``batch_stats`` itself, from the official code's
  ``model.train()`` / ``.eval()``, and its docstring says so."""
  config = recipes.RECIPES[name](**({"num_classes": 10} if name == "backdoor_peft" else {}))
  stages = [config[k] for k in ("lp", "ft")] if name == "lp_ft" else [config]
  for stage in stages:
    assert stage.batch_stats in engine.BATCH_STATS
  assert "BatchNorm" in recipes.RECIPES[name].__doc__ and "batch_stats" in (
      recipes.RECIPES[name].__doc__)


def test_backdoor_peft_trains_adapters_and_cosine_classifier(tmp_path):
  config = _engine_config(recipes.backdoor_peft(num_classes=100), 20)
  assert config.model.adapter_dim == 4          # 2^floor(log2(100 / (2 · 12)))
  assert recipes.adapter_dim(1000, 12) == 32 and recipes.adapter_dim(10, 12) == 1
  assert recipes.adapter_dim(1000, 24) == 16    # ViT-L: C / 48
  config.optimizer.update(learning_rate=0.05, steps_per_epoch=5)   # the per-epoch cosine
  clip = _clip(adapter_dim=config.model.adapter_dim)
  text = np.random.default_rng(1).normal(size=(CLASSES, 16)).astype(np.float32)
  counts = np.array([40, 20, 5, 2])
  task = recipes.backdoor_task(clip, text, counts, config)
  before = _flat(engine.split_model(task.model)[1])
  model, _ = engine.fit(task.model, task.loss_fn, config, _data, str(tmp_path),
                            mesh=_one_device())
  changed = _changed(before, _flat(engine.split_model(model)[1]))
  assert changed and all("/adapter/" in k or k.startswith("head/") for k in changed)
  assert any("/adapter/" in k for k in changed) and "head/weight" in changed
  history = _losses(tmp_path)
  assert np.mean(history[-5:]) < np.mean(history[:5])
  with pytest.raises(ValueError, match="train_counts"):
    recipes.backdoor_task(clip, text, np.array([3, 0, 1, 1]), config)


def test_tokenize_prompts_marks_context_and_name_tokens():
  ids, context, name = tokenize_prompts(_WordTokenizer(), ["cat", "sea lion"], "a photo of a {}.",
                                        49407)
  assert ids.shape == (2, 9)
  np.testing.assert_array_equal(context[0], [-1, 0, 1, 2, 3, -1, 4, -1, -1])
  np.testing.assert_array_equal(context[1], [-1, 0, 1, 2, 3, -1, -1, 4, -1])
  np.testing.assert_array_equal(name[1], [0, 0, 0, 0, 0, 1, 1, 0, 0])


def _prompt_task(resnet=False):
  config = _engine_config(recipes.prompt_tuning(), 15)
  # one warmup epoch of 3 steps at 1e-5 (the recipe's), then a per-epoch cosine
  config.optimizer.update(learning_rate=0.003, warmup_steps=0, steps_per_epoch=3)
  tok, names = _WordTokenizer(), ["red", "green", "blue", "grey"]
  return (recipes.prompt_tuning_task(_clip(resnet=resnet), tok, names, config), tok, names,
          config)


@pytest.mark.parametrize("resnet", [False, True])
def test_prompt_tuning_starts_at_the_zero_shot_classifier(resnet):
  task, tok, names, config = _prompt_task(resnet)
  clip = task.model.backbone
  batch = next(_eval_batches())
  ids = tok([config.template.format(n) for n in names])   # (C, 77): untrimmed
  # CLIP's own logits_per_image with one prompt per class: the zero-shot classifier.
  want = nnx.jit(lambda model, images, ids: model(images, ids))(clip, batch["image"], ids)
  got = nnx.jit(lambda model, images: model(images))(task.model, batch["image"])
  np.testing.assert_allclose(got, want, 1e-4, 1e-4)


@pytest.mark.slow
def test_prompt_tuning_trains_residuals_only(tmp_path):
  task, _, _, config = _prompt_task()
  before = _flat(engine.split_model(task.model)[1])
  fixed = next(_data(0))   # fitting one batch: the loss must fall
  model, _ = engine.fit(task.model, task.loss_fn, config, lambda start: itertools.repeat(fixed),
                        str(tmp_path), mesh=_one_device())
  changed = _changed(before, _flat(engine.split_model(model)[1]))
  assert changed == {"context_residual", "name_residual"}
  history = _losses(tmp_path)
  assert history[-1] < 0.9 * history[0]

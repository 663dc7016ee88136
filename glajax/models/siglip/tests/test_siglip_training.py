"""SigLIP through the recipes: FLYP and CaRot with the sigmoid loss and ``logit_bias`` trained,
the zero-shot classifier with SigLIP's bias (its logits are the model's own), and WiSE-FT's
end-to-end fine-tuning and weight interpolation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax import methods as M
from glajax.models.heads import ImageClassifier, LinearHead
from glajax.models.siglip import SiglipConfig, init_siglip
from glajax.models.siglip.tokenizer import byte_tokenizer
from glajax.models.tokenizer import Tokenizer
from glajax.parallel import make_mesh
from glajax.train import engine, losses, recipes
from glajax.zeroshot import zeroshot_head

CLASSES, BATCH, SIZE = 3, 8, 32
NAMES = ["red", "green", "blue"]
_COLORS = np.random.default_rng(5).normal(size=(CLASSES, 1, 1, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(byte_tokenizer(), 64)


def _siglip():
  config = SiglipConfig.tiny(vision=dict(num_hidden_layers=1), text=dict(num_hidden_layers=1),
                             logit_bias_init_value=-2.0)
  return init_siglip(config, seed=0)


def _batch(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
  images = _COLORS[labels] + 0.5 * rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
  return {"image": images, "label": labels}


def _data(start):
  step = start
  while True:
    step += 1
    yield _batch(step)


def _config(recipe, steps=3):
  config = getattr(recipes, recipe)()
  config.update(total_steps=steps, log_every=1, checkpoint_every=0, progress=False,
                batch_size=BATCH)
  config.optimizer.update(learning_rate=1e-3, warmup_steps=1)
  if "carot" in config:
    config.carot.teacher.every = 1
  return config


def _mesh():
  return make_mesh(jax.devices()[:1])


def test_flyp_loss_is_the_sigmoid_loss(tokenizer):
  """One template per class: the loss of a batch is SigLIP's sigmoid loss of its images against
  their class prompts (NumPy), and b receives a gradient."""
  model = _siglip()
  config = _config("flyp")
  task = recipes.contrastive_task(model, tokenizer, NAMES, ["a photo of a {}."], config)
  assert task.model.prompt_ids[...].shape == (CLASSES, 1, 64)   # never cut: pooled at the end
  batch = _batch(0)
  loss, metrics = jax.jit(task.loss_fn)(task.model, batch, jax.random.key(0))
  image = np.asarray(model.encode_image(batch["image"]), np.float64)
  text = np.asarray(model.encode_text(task.model.prompt_ids[...][batch["label"], 0]), np.float64)
  cos = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (
      text / np.linalg.norm(text, axis=1, keepdims=True)).T
  logits = np.exp(float(model.logit_scale[...])) * cos + float(model.logit_bias[...])
  want = np.logaddexp(0, -(2 * np.eye(BATCH) - 1) * logits).sum() / BATCH
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert set(metrics) == {"sigmoid_loss", "logit_scale", "logit_bias"}
  grads = nnx.grad(lambda m: task.loss_fn(m, batch, jax.random.key(0))[0],
                   argnums=nnx.DiffState(0, nnx.Param))(task.model)
  assert abs(float(grads.backbone.logit_bias[...])) > 1e-4


@pytest.mark.slow
def test_flyp_trains_the_scale_and_bias(tokenizer, tmp_path):
  model = _siglip()
  config = _config("flyp")
  task = recipes.contrastive_task(model, tokenizer, NAMES, ["a photo of a {}."], config)
  trained, state = engine.fit(task.model, task.loss_fn, config, _data, str(tmp_path),
                              mesh=_mesh(), teacher_update=task.teacher_update)
  assert state.teacher is None
  assert float(trained.backbone.logit_bias[...]) != -2.0
  assert float(trained.backbone.logit_scale[...]) != float(model.logit_scale[...])
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert lines[-1]["logit_bias"] == pytest.approx(float(trained.backbone.logit_bias[...]),
                                                  abs=1e-2)


@pytest.mark.slow
def test_carot_on_siglip(tokenizer, tmp_path):
  """CaRot's terms on SigLIP: W_v = the MAP head's W_o, the sigmoid self-distillation against
  the EMA teacher; the logged loss is their weighted sum."""
  model = _siglip()
  config = _config("carot")
  task = recipes.contrastive_task(model, tokenizer, NAMES, ["a photo of a {}.", "a {} one."],
                                  config)
  trained, state = engine.fit(task.model, task.loss_fn, config, _data, str(tmp_path),
                              mesh=_mesh(), teacher_update=task.teacher_update)
  assert state.teacher is not None
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  first = lines[0]
  w_o = np.asarray(model.image_projection_kernel(), np.float64)
  assert first["orthogonality"] == pytest.approx(
      np.linalg.norm(w_o.T @ w_o - np.eye(32)), rel=1e-5)
  w_t = np.asarray(model.text_projection_kernel(), np.float64)
  assert first["cross_projection"] == pytest.approx(np.linalg.norm(w_o @ w_t.T), rel=1e-5)
  total = (first["sigmoid_loss"] + 0.2 * first["orthogonality"]
           + 0.05 * first["cross_projection"] + 1.5 * first["self_distillation"])
  assert first["loss"] == pytest.approx(total, rel=1e-5)
  assert "clip_loss" not in first and all(np.isfinite(l["loss"]) for l in lines)
  assert float(trained.backbone.logit_bias[...]) != -2.0


def test_sigmoid_self_distillation_in_the_task(tokenizer):
  """The task's L_SD is ``losses.sigmoid_self_distillation_loss`` with each model's own t and
  b; it is zero in gradient when the teacher is the student."""
  model = _siglip()
  config = _config("carot")
  task = recipes.contrastive_task(model, tokenizer, NAMES, ["a photo of a {}."], config)
  teacher = nnx.clone(task.model)
  teacher.backbone.logit_bias[...] = jnp.asarray(1.5)
  batch = _batch(3)
  _, metrics = task.loss_fn(task.model, batch, jax.random.key(0), teacher)
  image = model.encode_image(batch["image"])
  text = model.encode_text(task.model.prompt_ids[...][batch["label"], 0])
  want = losses.sigmoid_self_distillation_loss(
      image, text, model.logit_scale[...], model.logit_bias[...], image, text,
      model.logit_scale[...], jnp.asarray(1.5))
  np.testing.assert_allclose(metrics["self_distillation"], want, rtol=1e-5)


def test_zeroshot_classifier_logits_are_siglips_own(tokenizer):
  """With one template, the zero-shot classifier's logits (head W = exp(t)·normalise(f_txt),
  bias b) are the model's logits_per_image against the class prompts."""
  model = _siglip()
  templates = ["a photo of a {}."]
  head = zeroshot_head(model, tokenizer, NAMES, templates, show_progress=False)
  classifier = ImageClassifier(model, LinearHead.from_zeroshot(head, model.logit_bias))
  images = _batch(1)["image"]
  ids = tokenizer([templates[0].format(n) for n in NAMES])
  np.testing.assert_allclose(jax.jit(lambda c, x: c(x))(classifier, images),
                             jax.jit(lambda m, x, t: m(x, t))(model, images, ids), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(classifier.head.bias[...]), [-2.0] * CLASSES)


@pytest.mark.slow
def test_wise_ft_end_to_end_and_interpolation(tokenizer, tmp_path):
  """WiSE-FT's ``finetune`` recipe on SigLIP (image tower + the zero-shot head with its bias);
  θ_α = (1 − α)·θ_zs + α·θ_ft gives the endpoints at α = 0 and 1 and, at α = ½, the mean of
  the parameters."""
  model = _siglip()
  head = zeroshot_head(model, tokenizer, NAMES, ["a photo of a {}."], show_progress=False)
  config = _config("finetune")
  task = recipes.classifier_task(model, LinearHead.from_zeroshot(head, model.logit_bias), config)
  zs = task.model
  ft, _ = engine.fit(zs, task.loss_fn, config, _data, str(tmp_path), mesh=_mesh())
  _, p_zs, rest = engine.split_model(zs)
  graphdef, p_ft, _ = engine.split_model(ft)
  assert not np.array_equal(np.asarray(p_zs["head"]["bias"]), np.asarray(p_ft["head"]["bias"]))
  assert np.array_equal(np.asarray(p_zs["backbone"]["logit_bias"]),
                        np.asarray(p_ft["backbone"]["logit_bias"]))   # unused by the classifier
  images = _batch(7)["image"]
  merged = lambda alpha: nnx.merge(graphdef, M.wise_ft(p_zs, p_ft, alpha), rest)
  run = jax.jit(lambda m, x: m(x))
  np.testing.assert_allclose(run(merged(0.0), images), run(zs, images), atol=1e-6)
  np.testing.assert_allclose(run(merged(1.0), images), run(ft, images), atol=1e-6)
  half = M.wise_ft(p_zs, p_ft, 0.5)
  jax.tree.map(lambda h, a, b: np.testing.assert_allclose(h, (a + b) / 2, atol=1e-6),
               half, p_zs, p_ft)


def test_prompt_tuning_is_refused_by_name(tokenizer):
  """GLA's prompt tuning places residuals on the tokens before the EOS a CLIP pools at; SigLIP
  pools at the last position, so the recipe refuses it before any work."""
  from glajax import InputError  # noqa: E402
  with pytest.raises(InputError, match="EOS.*siglip"):
    recipes.prompt_tuning_task(_siglip(), tokenizer, NAMES, recipes.prompt_tuning())

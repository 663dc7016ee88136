"""Every model family through the same checks (the interface of ``glajax.models.family``), and the
architecture claim that a new family needs only its folder and one registry line.

Each registered family's tiny variants are built, run under ``jax.jit``, exported and reloaded
(bit-identical), given a zero-shot head (families with text) or their own classifier's head
(supervised classifiers) and fine-tuned for two steps with the ``finetune`` recipe, which must
change the image tower and the head and nothing else; the fine-tuned classifier is exported
with its class names and reloads with the trained weights.
"""
import importlib
import inspect
import re
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glajax
from glajax import CheckpointError, ConfigError
from glajax.models import family as family_lib
from glajax.models import heads, layers, registry
from glajax.models.family import ExportInfo
from glajax.train import engine, recipes
from glajax.parallel import key_path
from glajax.train.state import make_optimizer

IMAGE_SIZE = 32
CLASSES = ("cat", "dog", "bird")


def _variants():
  return [(f.name, v) for f in registry.FAMILIES.values() for v in f.tiny]


def _name(variant: str) -> str:
  return registry.TINY + (f"-{variant}" if variant else "")


def _images(model, n=4, seed=0):
  return np.random.default_rng(seed).normal(size=(n, model.spec.image_size,
                                                  model.spec.image_size, 3)).astype(np.float32)


def _encode(model, images):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))(state, images))


@pytest.mark.parametrize("family,variant", _variants())
def test_spec_encoders_and_groups(family, variant):
  model = registry.tiny_model(_name(variant), IMAGE_SIZE, seed=0)
  assert registry.family_of(model).name == family
  spec = registry.spec_of(model)
  assert spec.family == family and spec.image_size == IMAGE_SIZE
  assert len(spec.mean) == len(spec.std) == 3 and min(spec.std) > 0
  assert (spec.loss in family_lib.LOSSES) == spec.has_text
  images = _images(model)
  embedded = _encode(model, images)
  assert embedded.dtype == np.float32 and embedded.ndim == 2 and np.isfinite(embedded).all()
  features = np.asarray(model.image_features(images))
  assert features.shape[0] == 4 and np.isfinite(features).all()
  kernel = model.image_projection_kernel()
  if kernel is not None:
    assert kernel.shape == (features.shape[1], embedded.shape[1])
  if not spec.has_text:   # a supervised classifier: its own head, no contrastive scale
    assert model.logit_scale is None and model.logit_bias is None
    kernel, bias = model.classifier()
    assert kernel.shape == (embedded.shape[1], bias.shape[0]) and np.isfinite(kernel).all()
  groups = model.param_groups()
  assert set(groups) <= set(family_lib.GROUPS)
  paths = [key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]]
  matched = {g: [p for p in paths if re.search(r, p)] for g, r in groups.items()}
  assert matched["image"], "the image group matches no parameter"
  assert not set(matched["image"]) & set(matched.get("text", ())), "image and text overlap"
  uncovered = [p for p in paths if not any(p in m for m in matched.values())]
  assert not uncovered, f"parameters in no group: {uncovered[:5]}"


@pytest.mark.parametrize("family,variant", _variants())
def test_export_reloads_bit_identical(family, variant, tmp_path):
  model = registry.tiny_model(_name(variant), IMAGE_SIZE, seed=1)
  directory = registry.save_model(model, tmp_path / "export")
  found, _ = registry.locate(directory)
  assert found.name == family
  reloaded = glajax.load_model(directory)
  images = _images(model, seed=2)
  np.testing.assert_array_equal(_encode(reloaded, images), _encode(model, images))


@pytest.mark.parametrize("family,variant", _variants())
def test_zero_shot_head_and_two_finetuning_steps(family, variant, tmp_path):
  """The zero-shot head (text families) or the model's own head on three of its classes
  (supervised classifiers), then ``finetune`` for 2 steps: the image group and the head change,
  every other parameter stays bit-identical; the classifier's export reloads as trained."""
  model = registry.tiny_model(_name(variant), IMAGE_SIZE, seed=3)
  dim = _encode(model, _images(model, 1)).shape[1]
  tok = None
  if model.spec.has_text:
    directory = registry.save_model(model, tmp_path / "ckpt")
    tok = glajax.load_tokenizer(directory)
    zs = np.asarray(glajax.zeroshot_head(model, tok, CLASSES, ["a {}."], show_progress=False))
    assert zs.shape == (3, dim) and np.isfinite(zs).all()
    head = heads.LinearHead.from_zeroshot(zs)
  else:
    kernel, bias = model.classifier()
    head = heads.LinearHead(kernel[:, :3], bias[:3], normalize=False)
  config = recipes.finetune()
  config.update(batch_size=4, total_steps=2, checkpoint_every=0, log_every=1, progress=False,
                tensorboard=False)
  config.optimizer.update(learning_rate=1e-2, warmup_steps=1)
  task = recipes.classifier_task(model, head, config)
  before = nnx.to_pure_dict(nnx.state(task.model, nnx.Param))
  images = _images(model, 4, seed=4)
  data = lambda start: iter([{"image": images, "label": np.array([0, 1, 2, 0], np.int32)}] * 2)
  trained, _ = engine.fit(task.model, task.loss_fn, config, data, str(tmp_path / "run"),
                          mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  after = nnx.to_pure_dict(nnx.state(trained, nnx.Param))
  groups = task.model.param_groups()
  trained_regex = [groups["image"], groups["head"]]
  for path, old in jax.tree_util.tree_flatten_with_path(before)[0]:
    name = key_path(path)
    new = after
    for key in path:
      new = new[key.key]
    if not any(re.search(r, name) for r in trained_regex):
      np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=name)
  changed = [key_path(p) for (p, o), (_, n) in zip(
      jax.tree_util.tree_flatten_with_path(before)[0], jax.tree_util.tree_flatten_with_path(
          after)[0]) if not np.array_equal(np.asarray(o), np.asarray(n))]
  assert any(re.search(groups["image"], c) for c in changed)
  assert any(c.startswith("head/") for c in changed)
  exported = str(tmp_path / "classifier")
  task.export(trained, exported, ExportInfo(CLASSES, tok, IMAGE_SIZE))
  again = glajax.load_model(exported)
  images = _images(model, seed=5)
  np.testing.assert_array_equal(_encode(again, images), _encode(trained.backbone, images))
  if not model.spec.has_text:   # the fine-tuned head is the exported model's own classifier
    for ours, theirs in zip(again.classifier(), trained.head.as_linear()):
      np.testing.assert_array_equal(ours, theirs)


def test_every_loader_takes_the_run_options_of_the_one_table():
  """``layers.RUN_OPTIONS`` is the one list of a tower's run-time options: a family takes all of
  them or none, every format's loader by the table's names and defaults, and every recipe's
  ``model`` section starts at the same defaults; each option reaches the towers that have it
  and an export's architecture leaves it out."""
  defaults = {k: default for k, (default, _) in layers.RUN_OPTIONS.items()}
  taking = []
  for family in registry.FAMILIES.values():
    taken = set(defaults) & set(family.load_options)
    assert taken in (set(), set(defaults)), (family.name, taken)
    for fmt in family.formats:
      params = inspect.signature(fmt.load).parameters
      assert {k: params[k].default for k in taken} == {k: defaults[k] for k in taken}, fmt
    taking += [family.name] * bool(taken)
  assert sorted(taking) == ["clip", "siglip"]
  models = {name: (recipe(3) if name == "backdoor_peft" else recipe()).get("model")
            for name, recipe in recipes.RECIPES.items()}
  assert sum(m is not None for m in models.values()) >= 6, models
  for name, model in models.items():
    assert model is None or {k: model[k] for k in defaults} == defaults, name
  text = glajax.models.clip.CLIPConfig.tiny().text
  changed = layers.with_run_options(text, remat="block", attention="xla", unroll=2)
  assert (changed.remat, changed.attention, changed.unroll) == ("block", "xla", 2)
  assert layers.without_run_options(changed) == text
  resnet = glajax.models.clip.CLIPConfig.tiny(resnet=True).vision
  assert layers.with_run_options(resnet, remat="dots", unroll=2).remat == "dots"


def test_unknown_group_and_option_are_refused():
  model = registry.tiny_model(registry.TINY, IMAGE_SIZE)
  config = recipes.finetune()
  config.optimizer.trainable = ("<vision>",)
  task = recipes.classifier_task(model, heads.LinearHead(np.zeros((16, 2), np.float32)), config)
  _, params, _ = engine.split_model(task.model)
  with pytest.raises(ConfigError, match=r"optimizer.trainable.*<image>.*'<vision>'"):
    make_optimizer(config.optimizer, params, 10, engine.param_groups(task.model))
  with pytest.raises(ConfigError, match="options.*clip.*bogus"):
    registry._check_options(registry.FAMILIES["clip"], {"bogus": 1})
  with pytest.raises(ConfigError, match="model.checkpoints.*tiny-nothing"):
    registry.tiny_model("tiny-nothing", IMAGE_SIZE)


# ------------------------------------------------------------------------------------------
# A new family: one folder, one registry line.

_TOY_FAMILY = '''
"""A toy family: mean-pooled pixels through a linear map; bag-of-token-embeddings text."""
import json, os
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file
from glajax.models import checkpoints, family

class Toy(nnx.Module):
  logit_bias = None

  def __init__(self, width=8, dim=4, vocab=50, rngs=None):
    self.config = dict(width=width, dim=dim, vocab=vocab)
    self.pixels = nnx.Linear(3, width, rngs=rngs)
    self.proj = nnx.Linear(width, dim, use_bias=False, rngs=rngs)
    self.tokens = nnx.Embed(vocab, dim, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(2.0))

  @property
  def spec(self):
    return family.ModelSpec("toy", 32, (0.5,) * 3, (0.5,) * 3, has_text=True, loss="softmax",
                            context_length=8, vocab_size=self.config["vocab"], eos_token_id=None)

  @staticmethod
  def param_groups():
    return {"image": r"^(pixels|proj)/", "text": r"^tokens/", "scale": r"^logit_scale$"}

  def image_features(self, images):
    return jnp.tanh(self.pixels(images.mean(axis=(1, 2))))

  def image_projection_kernel(self):
    return self.proj.kernel[...]

  def encode_image(self, images):
    return self.proj(self.image_features(images)).astype(jnp.float32)

  def embed_tokens(self, ids):
    return self.tokens(ids)

  def encode_text(self, ids, inputs_embeds=None):
    embeds = self.embed_tokens(ids) if inputs_embeds is None else inputs_embeds
    return embeds.mean(axis=1).astype(jnp.float32)

  def text_projection_kernel(self):
    return None

def detect(path):
  return os.path.isfile(os.path.join(path, "toy.json"))

def load(path, dtype=jnp.float32, param_dtype=jnp.float32, image_size=None, seed=0):
  config = json.load(open(os.path.join(path, "toy.json")))
  graphdef, flat, expected = checkpoints.abstract(lambda: Toy(**config, rngs=nnx.Rngs(seed)))
  return checkpoints.assemble(graphdef, flat, load_file(os.path.join(path, "toy.st")))

def save(model, directory, info=None, classifier=None, extra_files=None, overwrite=False):
  def write(tmp):
    json.dump(model.config, open(os.path.join(tmp, "toy.json"), "w"))
    save_file(checkpoints.host_params(model), os.path.join(tmp, "toy.st"))
    checkpoints.write_files(tmp, extra_files or {})
  return checkpoints.write_export(directory, write, overwrite=overwrite)

class _Tok:
  context_length = 8
  def __call__(self, texts):
    return np.asarray([[sum(map(ord, w)) % 50 for w in (t.split() + ["."] * 8)[:8]]
                       for t in texts], np.int32)

FAMILY = family.Family(
    name="toy", types=(Toy,), formats=(family.Format("toy", detect, load, ("toy.json",)),),
    save=save, tiny={"toy": lambda image_size, seed: Toy(rngs=nnx.Rngs(seed))},
    tokenizer=lambda path, **options: _Tok())
'''


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
  """The toy family as a folder of its own, then its one registry line."""
  folder = tmp_path / "toyfamily"
  folder.mkdir()
  (folder / "__init__.py").write_text(textwrap.dedent(_TOY_FAMILY))
  monkeypatch.syspath_prepend(str(tmp_path))
  module = importlib.import_module("toyfamily")
  monkeypatch.setitem(registry.FAMILIES, "toy", module.FAMILY)   # the registry line
  yield module
  sys.modules.pop("toyfamily", None)


def test_a_new_family_needs_its_folder_and_one_registry_line(toy_family, tmp_path):
  from glajax.experiments import config as config_lib  # noqa  (after the registry line)
  from glajax.experiments import runner  # noqa  (after the registry line)
  assert "tiny-toy" in registry.tiny_names() and config_lib.is_tiny("tiny-toy:3")
  directory = runner.tiny_checkpoint(str(tmp_path / "tiny_toy"), 32, 0, "tiny-toy")
  model = glajax.load_model(directory)
  assert isinstance(model, toy_family.Toy)
  tok = glajax.load_tokenizer(directory)
  head = np.asarray(glajax.zeroshot_head(model, tok, ["a", "b"], ["{} x"], show_progress=False))
  classifier = heads.ImageClassifier(model, heads.LinearHead.from_zeroshot(head))
  images = _images(model)
  logits = np.asarray(classifier(images))
  assert logits.shape == (4, 2)
  recipes.export_classifier(classifier, str(tmp_path / "exported"))
  again = glajax.load_model(str(tmp_path / "exported"))
  np.testing.assert_array_equal(_encode(again, images), _encode(model, images))
  with pytest.raises(CheckpointError, match="toy"):
    glajax.load_model(str(tmp_path))   # no family's checkpoint: every format is named

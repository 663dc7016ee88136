"""zeroshot_head against a per-prompt NumPy reference and against CLIP's own logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax import InputError
from glajax.models.clip import CLIP, CLIPConfig
from glajax.models.registry import load_tokenizer
from glajax.zeroshot import zeroshot_head

CLASSES = ["cat", "dog", "golden retriever"]
TEMPLATES = ["a photo of a {}.", "a bad photo of the {}.", lambda c: f"itap of a {c}."]


@pytest.fixture(scope="module")
def model():
  return CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


def _reference(model, tok, classnames, templates):
  rows = []
  for c in classnames:
    texts = [t(c) if callable(t) else t.format(c) for t in templates]
    emb = np.asarray(model.encode_text(tok(texts)), np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    w = emb.mean(0)
    rows.append(w / np.linalg.norm(w))
  return np.exp(float(model.logit_scale[...])) * np.stack(rows)


def test_matches_reference_with_padded_last_batch(model, tok, monkeypatch):
  traces = []
  encode_text = CLIP.encode_text
  monkeypatch.setattr(CLIP, "encode_text", lambda self, ids, inputs_embeds=None: (
      traces.append(ids.shape), encode_text(self, ids, inputs_embeds))[1])
  head = zeroshot_head(model, tok, CLASSES, TEMPLATES, batch_size=4, show_progress=False)
  assert traces == [(4, 77)]  # 9 prompts in batches of 4 (last one padded): one compilation
  monkeypatch.undo()
  assert head.shape == (3, 16) and head.dtype == jnp.float32
  np.testing.assert_allclose(head, _reference(model, tok, CLASSES, TEMPLATES), rtol=1e-5,
                             atol=1e-5)
  same = zeroshot_head(model, tok, CLASSES, TEMPLATES, batch_size=256, show_progress=False)
  np.testing.assert_allclose(same, head, atol=1e-5)


def test_single_template_head_gives_clip_logits(model, tok):
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  head = zeroshot_head(model, tok, CLASSES, ["a photo of a {}."], show_progress=False)
  image = model.encode_image(images)
  logits = image / jnp.linalg.norm(image, axis=-1, keepdims=True) @ head.T
  expected = jax.jit(lambda m, x, t: m(x, t))(model, images,
                                                tok([f"a photo of a {c}." for c in CLASSES]))
  np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_shipped_imagenet_assets(tok):
  import json
  from importlib import resources
  assets = resources.files("glajax.data") / "assets"
  classnames = json.loads((assets / "imagenet_classnames.json").read_text())
  templates = json.loads((assets / "openai_imagenet_templates.json").read_text())
  assert len(classnames) == 1000 and len(templates) == 80
  assert all("{}" in t for t in templates)


@pytest.mark.parametrize("kwargs, match", [
    (dict(classnames=[]), "classnames"),
    (dict(templates=["no placeholder"]), "templates"),
    (dict(batch_size=0), "batch_size")])
def test_bad_arguments(model, tok, kwargs, match):
  args = dict(classnames=CLASSES, templates=TEMPLATES) | kwargs
  with pytest.raises(InputError, match=match):
    zeroshot_head(model, tok, args.pop("classnames"), args.pop("templates"), **args)

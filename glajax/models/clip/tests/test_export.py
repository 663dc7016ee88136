"""Exports that transformers users take: ``CLIPProcessor.from_pretrained`` and the
image-classification pipeline on an exported fine-tuned classifier give glajax's predictions."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

import glajax
from glajax.models.clip import export as hf_export
from glajax.models.clip import CLIPConfig, init_clip
from glajax.models.clip.modeling import MEAN
from glajax.models.family import ExportInfo
from glajax.models.heads import CosineClassifier, ImageClassifier, LinearHead
from glajax.train import recipes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CLASSNAMES = ("red circle", "green square", "blue triangle")


@pytest.fixture(scope="module")
def tokenizer():
  return glajax.load_tokenizer(None)


def _images(count: int = 6, seed: int = 0):
  """Generated PIL images of several sizes and aspect ratios (the processor resizes and crops)."""
  rng = np.random.default_rng(seed)
  images = []
  for i in range(count):
    width, height = int(rng.integers(36, 80)), int(rng.integers(36, 80))
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    box = [width // 4, height // 4, 3 * width // 4, 3 * height // 4]
    (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
    images.append(image)
  return images


def _classifier(features: str):
  clip = init_clip(CLIPConfig.tiny(image_size=32), seed=1)
  rng = np.random.default_rng(2)
  if features == "projected":   # a fine-tuned-looking linear head: CLIP-scale logits, a bias
    kernel = 100 * rng.normal(size=(clip.config.projection_dim, len(CLASSNAMES))) / 4
    head = LinearHead(kernel.astype(np.float32), rng.normal(size=len(CLASSNAMES)))
  else:                          # backdoor adjustment's cosine classifier (scale 25)
    head = CosineClassifier(rng.normal(size=(len(CLASSNAMES),
                                             clip.config.vision.hidden_size)).astype(np.float32))
  return ImageClassifier(clip, head, features=features)


@pytest.mark.parametrize("features", ["projected", "pre_projection"])
def test_pipeline_and_processor_give_glajax_predictions(tmp_path, tokenizer, features):
  model = _classifier(features)
  directory = tmp_path / f"export_{features}"
  recipes.export_classifier(model, str(directory),
                            ExportInfo(CLASSNAMES, tokenizer, 32))
  files = set(os.listdir(directory))
  assert {"config.json", "model.safetensors", "head.npz", "preprocessor_config.json",
          hf_export.CODE_FILE} <= files
  assert "tokenizer.json" in files or "vocab.json" in files

  processor = transformers.CLIPProcessor.from_pretrained(directory)
  images = _images()
  pixels = processor(images=images, return_tensors="np")["pixel_values"]
  assert pixels.shape == (len(images), 3, 32, 32)
  ours = np.asarray(model(jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  text = ["a photo of a red circle.", "a sketch of a blue triangle."]
  ids = processor(text=text, padding="max_length", max_length=77, return_tensors="np")
  np.testing.assert_array_equal(ids["input_ids"], tokenizer(text))
  long = ["a photo of " + "a very " * 60 + "red circle."]   # truncated at CLIP's 77 tokens
  assert processor.tokenizer.model_max_length == 77
  np.testing.assert_array_equal(
      processor(text=long, truncation=True, padding="max_length", return_tensors="np")[
          "input_ids"], tokenizer(long))

  hf_model = transformers.AutoModelForImageClassification.from_pretrained(
      directory, trust_remote_code=True)
  with torch.no_grad():
    theirs = hf_model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
  # float32 on both sides, summed in other orders: the CLIP parity tests see ≤ 1.4e-6 of each
  # output's scale; 1e-5 of the logits' scale leaves room for the head and is far below any gap
  # that changes a prediction here.
  scale = max(1.0, float(np.abs(ours).max()))
  np.testing.assert_allclose(theirs, ours, atol=1e-5 * scale, rtol=0)

  pipe = transformers.pipeline("image-classification", model=str(directory),
                               trust_remote_code=True)
  results = pipe(images, top_k=len(CLASSNAMES))
  probs = np.exp(ours - ours.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for result, logits, p in zip(results, ours, probs):
    assert result[0]["label"] == CLASSNAMES[int(np.argmax(logits))]
    scores = {r["label"]: r["score"] for r in result}
    np.testing.assert_allclose([scores[c] for c in CLASSNAMES], p, atol=1e-5)


def test_export_stays_a_clip_checkpoint_and_refuses_the_pipeline_without_trust(tmp_path,
                                                                              tokenizer):
  model = _classifier("projected")
  directory = str(tmp_path / "export")
  recipes.export_classifier(model, directory, ExportInfo(CLASSNAMES, tokenizer, 32))
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  assert config["id2label"] == {"0": "red circle", "1": "green square", "2": "blue triangle"}
  assert config["label2id"]["blue triangle"] == 2
  with open(os.path.join(directory, glajax.models.checkpoints.EXPORT_MARKER)) as f:
    written = json.load(f)["files"]
  assert "preprocessor_config.json" in written and hf_export.CODE_FILE in written
  # glajax and transformers' CLIPModel read the same CLIP (the classifier tensors are skipped).
  reloaded = glajax.load_clip(directory)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(reloaded.encode_image(pixels)),
                             np.asarray(model.backbone.encode_image(pixels)), atol=1e-6)
  clip = transformers.CLIPModel.from_pretrained(directory)
  with torch.no_grad():
    theirs = clip.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  theirs = getattr(theirs, "pooler_output", theirs)
  np.testing.assert_allclose(theirs.numpy(), np.asarray(model.backbone.encode_image(pixels)),
                             atol=1e-5)
  # Without trust_remote_code transformers would run its own CLIPForImageClassification, another
  # function: the export's custom pipeline makes it refuse instead.
  with pytest.raises(ValueError, match="trust_remote_code"):
    transformers.pipeline("image-classification", model=directory)


def test_clip_export_has_processor_files(tmp_path, tokenizer):
  clip = init_clip(CLIPConfig.tiny(image_size=32), seed=0)
  directory = str(tmp_path / "clip")
  recipes._export_backbone(recipes.ContrastiveModel(clip, np.zeros((2, 1, 4), np.int32)), directory,
                       ExportInfo(("a", "b"), tokenizer, 32))
  processor = transformers.CLIPProcessor.from_pretrained(directory)
  assert processor.image_processor.crop_size == {"height": 32, "width": 32}
  assert processor.image_processor.size == {"shortest_edge": 32}
  np.testing.assert_allclose(processor.image_processor.image_mean, MEAN)


def test_bad_export_inputs():
  with pytest.raises(ValueError, match="tokenizer"):
    hf_export.processor_files(object(), 32)
  with pytest.raises(ValueError, match="image_size"):
    hf_export.preprocessor_config(0)
  with pytest.raises(ValueError, match="class names"):
    hf_export.classifier_export(np.zeros((4, 3)), np.zeros(3), ["a", "b"], "projected")

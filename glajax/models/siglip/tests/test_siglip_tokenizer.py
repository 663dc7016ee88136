"""SigLIP's tokenizers, built offline: glajax's byte-level one (tiny models), a Gemma-class one
(SigLIP 2: lowercased, right-padded) and SentencePiece's SiglipTokenizer (SigLIP, when the
``sentencepiece`` package is installed), each against transformers' own tokenizer on the same
files; a checkpoint without tokenizer files is refused, naming what it needs."""
import io
import json
import os
import shutil

import numpy as np
import pytest

import glajax
from glajax import CheckpointError
from glajax.models.siglip import SiglipConfig, init_siglip, save_siglip
from glajax.models.siglip import tokenizer as siglip_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a Cat.", "Ünïcode ✓", "a very " * 20 + "long caption", ""]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """A tiny SigLIP exported by the family (``glajax.save_model``): its byte tokenizer with it."""
  model = init_siglip(SiglipConfig.tiny(), seed=0)
  return glajax.save_model(model, tmp_path_factory.mktemp("tiny") / "export")


def _gpt2_byte_chars():
  """GPT-2's byte -> character map (openai/gpt-2 ``src/encoder.py`` ``bytes_to_unicode``):
  printable bytes are themselves, the others chr(256 + n) in byte order. The byte tokenizer's
  ids follow the sorted characters after its 3 special tokens."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def test_byte_tokenizer_ids(tiny_export):
  tok = glajax.load_tokenizer(tiny_export)
  ids = tok(TEXTS)
  assert ids.shape == (4, 64) and ids.dtype == np.int32
  chars = _gpt2_byte_chars()
  byte_ids = {b: 3 + i for i, b in enumerate(sorted(range(256), key=chars.__getitem__))}
  for text, row in zip(TEXTS, ids):
    want = [byte_ids[b] for b in text.encode("utf-8")[:63]] + [1]   # </s> kept last when cut
    np.testing.assert_array_equal(row, want + [0] * (64 - len(want)), err_msg=text)
  # transformers users of the export tokenize the same way
  hf = transformers.AutoTokenizer.from_pretrained(tiny_export)
  np.testing.assert_array_equal(hf(TEXTS, padding="max_length", truncation=True,
                                   return_tensors="np")["input_ids"], ids)
  assert tok.context_length == 64 and tok.vocab_size == 259


def test_byte_tokenizer_without_its_files(tiny_export, tmp_path):
  """A tiny checkpoint whose tokenizer files were removed: glajax rebuilds its byte tokenizer
  (its config.json names it); any other SigLIP checkpoint without them is refused."""
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(tiny_export, name), bare / name)
  np.testing.assert_array_equal(glajax.load_tokenizer(str(bare))(TEXTS),
                                glajax.load_tokenizer(tiny_export)(TEXTS))
  config = json.loads((bare / "config.json").read_text())
  del config["glajax_tokenizer"]
  (bare / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="tokenizer files.*tokenizer.json or spiece.model"):
    glajax.load_tokenizer(str(bare))
  with pytest.raises(CheckpointError, match="tokenizer files"):
    siglip_tokenizer.load_tokenizer(None)


def _gemma_like(directory):
  """A tiny tokenizer.json read by transformers' GemmaTokenizer (SigLIP 2's class): single
  characters, "▁" for spaces, <eos> appended, no BOS; its class pads on the left."""
  from tokenizers import Tokenizer, models, normalizers, processors  # noqa
  letters = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.▁"))
  vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *letters])}
  raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  raw.normalizer = normalizers.Replace(" ", "▁")
  raw.post_processor = processors.TemplateProcessing(single="$A <eos>",
                                                     special_tokens=[("<eos>", 1)])
  os.makedirs(directory)
  raw.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "GemmaTokenizer", "pad_token": "<pad>", "eos_token": "<eos>",
               "bos_token": "<bos>", "unk_token": "<unk>", "add_bos_token": False,
               "add_eos_token": True, "model_max_length": 64}, f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(SiglipConfig.tiny().to_hf() | {"glajax_tokenizer": None}, f)
  return transformers.AutoTokenizer.from_pretrained(directory)


def test_gemma_tokenizer_is_lowercased_and_padded_on_the_right(tmp_path):
  hf = _gemma_like(str(tmp_path / "gemma"))
  assert "Gemma" in type(hf).__name__ and hf.padding_side == "left"
  tok = glajax.load_tokenizer(str(tmp_path / "gemma"))
  texts = ["A Photo of a CAT.", "dog"]
  ids = tok(texts)
  hf.padding_side = "right"
  want = hf([t.lower() for t in texts], padding="max_length", max_length=64,
            return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(ids, want)
  assert ids[1, 3] == 1 and (ids[1, 4:] == 0).all()   # "dog" </s> then padding on the right
  np.testing.assert_array_equal(tok(["A Dog"]), tok(["a dog"]))


def test_sentencepiece_tokenizer(tmp_path):
  """SigLIP's own tokenizer class on a SentencePiece model trained here: glajax's ids are
  SiglipTokenizer's with padding to 64 (it lowercases and strips punctuation itself)."""
  spm = pytest.importorskip("sentencepiece")
  corpus = ["a photo of a cat", "a photo of a dog", "a sketch of a bird", "the plane flies",
            "an origami of a red circle", "a blurry photo of the green square"] * 20
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model,
                                 vocab_size=32, model_type="unigram", pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, character_coverage=1.0)
  directory = tmp_path / "siglip"
  directory.mkdir()
  (directory / "spiece.model").write_bytes(model.getvalue())
  hf = transformers.SiglipTokenizer(str(directory / "spiece.model"))
  hf.save_pretrained(directory)
  save_config = SiglipConfig.tiny(text=dict(vocab_size=32)).to_hf()
  del save_config["glajax_tokenizer"]
  (directory / "config.json").write_text(json.dumps(save_config))
  tok = glajax.load_tokenizer(str(directory))
  texts = ["A photo of a CAT!", "an origami of a red circle.", "bird " * 80]
  want = hf(texts, padding="max_length", truncation=True, max_length=64,
            return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(tok(texts), want)
  assert hf.pad_token_id == hf.eos_token_id == 1   # pads with </s>, as big_vision (pad_value=1)
  np.testing.assert_array_equal(tok(["A photo of a CAT!"]), tok(["a photo of a cat"]))


def test_missing_sentencepiece_is_named(tmp_path, monkeypatch):
  """transformers raises ImportError for SiglipTokenizer without SentencePiece; the error says
  what to install."""
  directory = tmp_path / "siglip"
  directory.mkdir()
  (directory / "spiece.model").write_bytes(b"")
  (directory / "config.json").write_text(json.dumps({"model_type": "siglip"}))

  def missing(*args, **kwargs):
    raise ImportError("SiglipTokenizer requires the SentencePiece library but it was not found")

  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
  with pytest.raises(CheckpointError, match="pip install sentencepiece"):
    glajax.load_tokenizer(str(directory))


def test_export_with_a_checkpoints_tokenizer_is_read_by_transformers(tiny_export, tmp_path):
  """save_model with an ExportInfo writes the tokenizer's files and SigLIP's processor config:
  transformers' SiglipProcessor reads the export and gives glajax's ids and pixels' shape."""
  from glajax.models.family import ExportInfo  # noqa: E402
  model = glajax.load_model(tiny_export)
  tok = glajax.load_tokenizer(tiny_export)
  directory = glajax.save_model(model, tmp_path / "export", info=ExportInfo(("a", "b"), tok, 32))
  processor = transformers.AutoProcessor.from_pretrained(directory)
  assert type(processor.image_processor).__name__.startswith("SiglipImageProcessor")
  assert processor.image_processor.size == {"height": 32, "width": 32}
  np.testing.assert_allclose(processor.image_processor.image_mean, [0.5] * 3)
  pixels = processor(images=[np.zeros((40, 50, 3), np.uint8)], return_tensors="np")
  assert pixels["pixel_values"].shape == (1, 3, 32, 32)
  np.testing.assert_allclose(pixels["pixel_values"], -1.0)   # (0 / 255 - 0.5) / 0.5
  np.testing.assert_array_equal(processor(text=TEXTS, padding="max_length", truncation=True,
                                          return_tensors="np")["input_ids"], tok(TEXTS))
  assert save_siglip  # the family's save writes through save_siglip

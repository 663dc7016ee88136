"""glajax's CLIP tokenizer against an independent re-implementation of OpenAI's simple_tokenizer."""
import gzip
import json
from importlib import resources

import numpy as np
import pytest
import regex

from glajax import CheckpointError, InputError
from glajax.models.clip import CLIPConfig
from glajax.models.registry import load_tokenizer


def _openai_bytes_to_unicode():
  """As in openai/CLIP simple_tokenizer.py."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(2**8):
    if b not in bs:
      bs.append(b)
      cs.append(2**8 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


class _SimpleTokenizer:
  """OpenAI CLIP's simple_tokenizer (without ftfy, which is a no-op on these clean texts)."""

  def __init__(self, merges):
    self.byte_encoder = _openai_bytes_to_unicode()
    vocab = list(self.byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    self.encoder = dict(zip(vocab, range(len(vocab))))
    self.bpe_ranks = dict(zip(merges, range(len(merges))))
    self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                             r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def bpe(self, token):
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:])}
      bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if bigram not in self.bpe_ranks:
        break
      new, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
          new.append(word[i] + word[i + 1])
          i += 2
        else:
          new.append(word[i])
          i += 1
      word = tuple(new)
    return list(word)

  def tokenize(self, text, context_length=77):
    text = regex.sub(r"\s+", " ", text).strip().lower()
    ids = [self.encoder["<|startoftext|>"]]
    for token in regex.findall(self.pat, text):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids += [self.encoder[t] for t in self.bpe(token)]
    ids.append(self.encoder["<|endoftext|>"])
    if len(ids) > context_length:  # clip.tokenize(truncate=True)
      ids = ids[:context_length]
      ids[-1] = self.encoder["<|endoftext|>"]
    return ids


@pytest.fixture(scope="module")
def openai_reference():
  asset = resources.files("glajax.data") / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
  lines = gzip.decompress(asset.read_bytes()).decode("utf-8").split("\n")
  return _SimpleTokenizer([tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]])


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


TEXTS = ["a photo of a cat.", "A PHOTO of the Golden-Retriever, 2 dogs!!",
         "it's a  tiny\tthing's origami   ", "café crème brûlée 3.14", "naïve 日本語 🐱 x",
         "a bad photo of the {}.", "the quick brown fox jumps over the lazy dog " * 12, ""]


def _check_row(row, expected, pad_id):
  n = len(expected)
  assert list(row[:n]) == expected
  assert (row[n:] == pad_id).all()


def test_known_ids_and_shapes(tok, openai_reference):
  ids = tok(["a photo of a cat."])
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  expected = [49406, 320, 1125, 539, 320, 2368, 269, 49407]
  assert openai_reference.tokenize("a photo of a cat.") == expected
  _check_row(ids[0], expected, tok.pad_token_id)
  assert (tok.eos_token_id, tok.vocab_size, tok.context_length) == (49407, 49408, 77)
  assert tok.vocab_size == CLIPConfig.vit_b32().text.vocab_size


def test_matches_openai_simple_tokenizer(tok, openai_reference):
  ids = tok(TEXTS)
  assert ids.shape == (len(TEXTS), 77)
  for row, text in zip(ids, TEXTS):
    _check_row(row, openai_reference.tokenize(text), tok.pad_token_id)


def test_truncation_keeps_eos(tok):
  row = tok(["word " * 200])[0]
  assert row[0] == 49406 and row[-1] == tok.eos_token_id
  assert (row == tok.eos_token_id).sum() == 1


def test_single_string_and_bad_input(tok):
  np.testing.assert_array_equal(tok("a photo of a cat."), tok(["a photo of a cat."]))
  with pytest.raises(InputError, match="texts"):
    tok(["fine", 3])


def _tiny_vocab_dir(path, merges):
  byte_chars = list(_openai_bytes_to_unicode().values())
  tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  (path / "config.json").write_text(json.dumps(CLIPConfig.tiny().to_hf()))
  return len(tokens)


def test_checkpoint_tokenizer_from_tiny_vocabulary(tmp_path):
  merges = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>")]
  size = _tiny_vocab_dir(tmp_path, merges)
  tok = load_tokenizer(tmp_path, context_length=12)
  reference = _SimpleTokenizer(merges)
  texts = ["the cat of the cats", "a catalogue of THE cat!", "x " * 20]
  ids = tok(texts)
  assert ids.shape == (3, 12)
  assert tok.vocab_size == size and tok.eos_token_id == size - 1
  for row, text in zip(ids, texts):
    _check_row(row, reference.tokenize(text, context_length=12), tok.pad_token_id)


def test_checkpoint_without_tokenizer_files_gets_openai(tmp_path, tok):
  (tmp_path / "config.json").write_text(json.dumps(CLIPConfig.tiny().to_hf()))
  np.testing.assert_array_equal(load_tokenizer(tmp_path)(TEXTS[:3]), tok(TEXTS[:3]))


def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match="no such directory"):
    load_tokenizer(tmp_path / "nope")

"""CLIP's byte-level BPE tokenizer (a glajax ``Tokenizer``: batched, padded and truncated to a
fixed context length).

A checkpoint directory with tokenizer files gives its own tokenizer (transformers'
``CLIPTokenizer``); otherwise the OpenAI CLIP tokenizer is built offline from the merges shipped
in ``glajax/data/assets/clip_bpe_simple_vocab_16e6.txt.gz``.
"""
from __future__ import annotations

import functools
import gzip
import os
from importlib import resources

import numpy as np

from glajax.errors import CheckpointError, bad_argument
from glajax.methods import _checks
from glajax.models.checkpoints import resolve_checkpoint
from glajax.models.clip import params_openai
from glajax.models.tokenizer import Tokenizer

CONTEXT_LENGTH = 77
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_NUM_MERGES = 49152 - 256 - 2  # OpenAI's simple_tokenizer keeps merges[1:1 + this]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible map from the 256 bytes to printable characters, in CLIP's order.

  Printable bytes map to themselves and come first; the others follow as chr(256 + n).
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable},
          **{b: chr(256 + n) for n, b in enumerate(others)}}


@functools.cache
def _openai_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
  """OpenAI CLIP's 49408-token vocabulary and its BPE merges, from the shipped asset.

  vocab = byte chars, the same with ``</w>``, one token per merge, then <|startoftext|> (49406)
  and <|endoftext|> (49407).
  """
  asset = resources.files("glajax.data") / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
  lines = gzip.decompress(asset.read_bytes()).decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
  tokens = list(_bytes_to_unicode().values())
  tokens += [t + "</w>" for t in tokens]
  tokens += ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}, merges


def _openai_tokenizer():
  from transformers import CLIPTokenizer  # noqa  (transformers: a checkpoint's own tokenizer only)
  vocab, merges = _openai_vocab_and_merges()
  return CLIPTokenizer(vocab=vocab, merges=list(merges))


def load_tokenizer(path_or_hub_id: str | os.PathLike | None = None, *,
                   context_length: int = CONTEXT_LENGTH) -> Tokenizer:
  """The checkpoint's CLIP tokenizer, or OpenAI's (built offline) for ``None``, a checkpoint
  without tokenizer files or an OpenAI ``.pt``.

  ``tok = load_tokenizer(...); tok(["a photo of a cat."])`` -> (1, 77) int32 ids.
  """
  _checks.positive_int("context_length", context_length, 2)  # before building a tokenizer
  if path_or_hub_id is None:
    return Tokenizer(_openai_tokenizer(), context_length)
  directory = resolve_checkpoint(path_or_hub_id, allow_patterns=["*.json", "*.txt"],
                                 file_suffixes=params_openai.SUFFIXES)
  if os.path.isfile(directory) or not any(os.path.exists(os.path.join(directory, f))
                                          for f in _TOKENIZER_FILES):  # OpenAI's .pt: its BPE
    return Tokenizer(_openai_tokenizer(), context_length)
  from transformers import CLIPTokenizer  # noqa  (transformers: a checkpoint's own tokenizer only)
  try:
    hf_tokenizer = CLIPTokenizer.from_pretrained(directory)
  except Exception as e:  # unreadable or corrupt tokenizer files: OSError, JSON and other errors
    raise bad_argument("path_or_hub_id", "readable CLIP tokenizer files (vocab.json, merges.txt)",
                       f"{directory} ({type(e).__name__}: {str(e)[:300]})",
                       CheckpointError) from e
  return Tokenizer(hf_tokenizer, context_length)

"""SigLIP's tokenizers (a glajax ``Tokenizer``: batched, padded to the fixed length 64 the text
tower was trained with, truncated with the end token kept).

* a checkpoint's own, through transformers' ``AutoTokenizer``: SigLIP's SentencePiece
  ``SiglipTokenizer`` (``spiece.model``; needs the ``sentencepiece`` package; it lowercases and
  strips punctuation itself) or SigLIP 2's Gemma tokenizer (``tokenizer.json``), whose texts are
  lowercased first as big_vision does (``configs/proj/image_text/SigLIP2_demo.ipynb``:
  ``lower(key="text")|tok(length=64, model="gemma", bos="no", eos="sticky")``). Padding is on
  the right whatever the tokenizer class's default (Gemma's is the left): the text tower pools
  at the last position, and big_vision pads after the text;
* :func:`byte_tokenizer`: glajax's offline byte-level tokenizer of the tiny models (<pad> 0,
  </s> 1, <unk> 2, then the 256 bytes; </s> appended), saved with every tiny export.
"""
from __future__ import annotations

import os

from glajax.errors import CheckpointError, bad_argument
from glajax.methods import _checks
from glajax.models import checkpoints
from glajax.models.siglip.modeling import BYTE_VOCAB_SIZE, CONTEXT_LENGTH, TOKENIZER_KEY
from glajax.models.siglip.params_hf import HUB_PATTERNS
from glajax.models.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")
BYTE_SPECIALS = ("<pad>", "</s>", "<unk>")


def byte_tokenizer():
  """The tiny models' tokenizer as a transformers fast tokenizer: each UTF-8 byte one token
  (GPT-2's byte-to-character map, no merges) after the special tokens, </s> appended."""
  import tokenizers  # noqa  (transformers' tokenizers package: tokenizers only)
  from transformers import PreTrainedTokenizerFast  # noqa  (transformers: tokenizers only)
  byte_level = tokenizers.pre_tokenizers.ByteLevel
  vocab = {token: i for i, token in enumerate([*BYTE_SPECIALS, *sorted(byte_level.alphabet())])}
  raw = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  raw.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=False)
  raw.decoder = tokenizers.decoders.ByteLevel()
  raw.post_processor = tokenizers.processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>", model_max_length=CONTEXT_LENGTH)
  assert len(tokenizer) == BYTE_VOCAB_SIZE, len(tokenizer)
  return tokenizer


def _config_value(directory: str, key: str, default=None):
  try:
    config = checkpoints.read_json(directory, "config.json")
  except CheckpointError:
    return default
  if key == "context_length":
    return (config.get("text_config") or {}).get("max_position_embeddings", default)
  return config.get(key, default)


def load_tokenizer(path_or_hub_id, *, context_length: int | None = None) -> Tokenizer:
  """The tokenizer of a SigLIP checkpoint (a directory or hub id): its own files, or glajax's
  byte-level one where its ``config.json`` names it (tiny models). ``context_length``: the text
  tower's length (default: the checkpoint's ``max_position_embeddings``, 64).

  ``tok = load_tokenizer(...); tok(["a photo of a cat."])`` -> (1, 64) int32 ids.
  """
  if context_length is not None:
    _checks.positive_int("context_length", context_length, 2)  # before reading any file
  if path_or_hub_id is None:
    raise bad_argument("path_or_hub_id", "a SigLIP checkpoint (directory or hub id) with its "
                       "tokenizer files", None, CheckpointError)
  directory = checkpoints.resolve_checkpoint(path_or_hub_id, allow_patterns=list(HUB_PATTERNS))
  length = context_length or _config_value(directory, "context_length", CONTEXT_LENGTH)
  if not any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES):
    if _config_value(directory, TOKENIZER_KEY) == "bytes":
      return Tokenizer(byte_tokenizer(), length)
    raise bad_argument("path_or_hub_id", f"a SigLIP checkpoint with its tokenizer files "
                       f"({' or '.join(TOKENIZER_FILES)})",
                       f"none in {checkpoints.describe(directory)}", CheckpointError)
  from transformers import AutoTokenizer  # noqa  (transformers: a checkpoint's own tokenizer only)
  try:
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
  except ImportError as e:   # SiglipTokenizer is SentencePiece's
    raise bad_argument("path_or_hub_id", "a tokenizer whose Python packages are installed "
                       "(SigLIP's spiece.model needs `pip install sentencepiece`)",
                       f"{directory} ({e})", CheckpointError) from None
  except Exception as e:  # unreadable or corrupt tokenizer files: OSError, JSON and other errors
    raise bad_argument("path_or_hub_id", "readable SigLIP tokenizer files "
                       f"({' or '.join(TOKENIZER_FILES)})",
                       f"{directory} ({type(e).__name__}: {str(e)[:300]})",
                       CheckpointError) from e
  hf_tokenizer.padding_side = "right"   # pooled at the last position: padded as trained
  gemma = "gemma" in type(hf_tokenizer).__name__.lower()
  return Tokenizer(hf_tokenizer, length, lowercase=gemma)

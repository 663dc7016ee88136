"""The tokenizer every text tower takes: texts -> fixed-length int32 ids, batched, padded and
truncated, around a transformers tokenizer (each family builds its own: ``family.tokenizer``)."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from glajax.errors import bad_argument
from glajax.methods import _checks


class Tokenizer:
  """``tok(texts) -> (len(texts), context_length) int32``: the transformers tokenizer's ids
  (CLIP: BOS, BPE ids, EOS), padded with its pad id to ``context_length``.

  Texts longer than the context are truncated, keeping the tokenizer's end token last. CLIP
  pools at the first EOS and attends causally, so its pad id does not change the features;
  SigLIP pads to its fixed length and pools at the last position, as it was trained.
  ``lowercase``: texts are lowercased first (SigLIP 2 was trained on lowercased text).
  """

  def __init__(self, hf_tokenizer, context_length: int, lowercase: bool = False):
    self._hf = hf_tokenizer
    self.lowercase = bool(lowercase)
    # BOS and EOS need two positions; a text tower takes at most its config's length.
    self.context_length = _checks.positive_int("context_length", context_length, 2)
    self.eos_token_id = hf_tokenizer.eos_token_id
    self.bos_token_id = hf_tokenizer.bos_token_id
    self.pad_token_id = hf_tokenizer.pad_token_id
    self.vocab_size = len(hf_tokenizer)

  def __call__(self, texts) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
      raise bad_argument("texts", "a list of str", [type(t).__name__ for t in texts][:5])
    if not texts:
      return np.zeros((0, self.context_length), np.int32)
    if self.lowercase:
      texts = [t.lower() for t in texts]
    ids = self._hf(texts, padding="max_length", truncation=True, max_length=self.context_length,
                   return_tensors="np")["input_ids"]
    return ids.astype(np.int32)

  def files(self) -> dict[str, bytes]:
    """file name -> content: the transformers tokenizer's own files (``save_pretrained``,
    offline), its ``model_max_length`` set to ``context_length`` (where texts are cut)."""
    with tempfile.TemporaryDirectory() as tmp:
      self._hf.save_pretrained(tmp)
      files = {}
      for name in sorted(os.listdir(tmp)):
        if os.path.isfile(os.path.join(tmp, name)):
          with open(os.path.join(tmp, name), "rb") as f:
            files[name] = f.read()
    if "tokenizer_config.json" in files:
      config = json.loads(files["tokenizer_config.json"])
      config["model_max_length"] = self.context_length
      files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
    return files

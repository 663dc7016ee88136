"""The SigLIP family's export (transformers format) and what transformers users need beside the
weights: the tokenizer's files and ``preprocessor_config.json``, so that
``transformers.SiglipProcessor`` / ``AutoProcessor.from_pretrained(export)`` work.

A fine-tuned classifier is not exported as a transformers model: its head stays in
``head.npz`` (``recipes.export_classifier``). transformers' ``SiglipForImageClassification``
computes ``Linear(mean_{patches} h_L)`` on the post-LN patch tokens, without the MAP head and
without L2 normalisation, so no setting of its linear layer gives glajax's
``normalise(MAP(h_L)) · K + b``.
"""
from __future__ import annotations

import json

from glajax.errors import bad_argument
from glajax.models.family import ExportInfo
from glajax.models.siglip.checkpoint import save_siglip
from glajax.models.siglip.modeling import MEAN, STD
from glajax.models.siglip.tokenizer import byte_tokenizer
from glajax.models.tokenizer import Tokenizer


def preprocessor_config(image_size: int) -> dict:
  """transformers' ``SiglipImageProcessor`` settings for ``image_size``: a bicubic resize to
  image_size × image_size (no crop), rescale to [0, 1], mean = std = 0.5."""
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise bad_argument("image_size", "a positive int", repr(image_size))
  return {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
          "do_resize": True, "size": {"height": image_size, "width": image_size},
          "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(MEAN), "image_std": list(STD), "do_convert_rgb": True}


def processor_files(tokenizer, image_size: int) -> dict[str, bytes]:
  """file name -> content: the tokenizer's files and ``preprocessor_config.json``."""
  if not isinstance(tokenizer, Tokenizer):
    raise bad_argument("tokenizer", "a glajax Tokenizer (glajax.load_tokenizer)",
                       type(tokenizer).__name__)
  config = json.dumps(preprocessor_config(image_size), indent=2).encode()
  return {**tokenizer.files(), "preprocessor_config.json": config}


def save(model, directory, *, info: ExportInfo | None = None, classifier=None,
         extra_files: dict | None = None, overwrite: bool = False) -> str:
  """The SigLIP family's export: ``save_siglip`` with the processor files of ``info``'s
  tokenizer, or of glajax's byte-level tokenizer for a tiny model (its config names it), so
  that ``glajax.load_tokenizer(export)`` works offline. ``classifier`` is not written as a
  transformers model (see the module docstring); one atomic write."""
  del classifier
  files = dict(extra_files or {})
  if info is not None:
    files.update(processor_files(info.tokenizer, info.image_size))
  elif model.config.tokenizer == "bytes":
    files.update(processor_files(Tokenizer(byte_tokenizer(), model.spec.context_length),
                                 model.spec.image_size))
  return save_siglip(model, directory, overwrite=overwrite, extra_files=files)

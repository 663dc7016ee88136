"""The small interface between a model family and the rest of glajax.

A family is one folder under ``glajax/models/`` (its modules, its parameter table per checkpoint
format, its tests) and one line in ``glajax/models/__init__.py``'s registry. Zero-shot heads,
classifiers, recipes, prompt tuning, WiSE-FT, exports and the runner use only this:

* the family's top module (an ``nnx.Module``) has
  - ``spec`` -> :class:`ModelSpec` (resolution, normalisation, text tower, contrastive loss);
  - ``encode_image(images)`` -> (B, D) float32, projected, not normalised; ``images`` NHWC,
    normalised as ``spec`` says;
  - ``image_features(images)`` -> (B, W) float32, the pooled feature before the projection
    (LIFT's cosine head);
  - ``image_projection_kernel()`` -> the (W, D) kernel of that projection (CaRot's W_v; None: no
    linear projection, e.g. a supervised classifier). An attention-pooled tower without a final
    projection (SigLIP's MAP head) gives its pool's feature before the pool's output projection,
    and that projection's kernel;
  - with a text tower: ``encode_text(ids, inputs_embeds=None)`` -> (B, D),
    ``embed_tokens(ids)`` -> (B, L, width) (prompt tuning replaces them) and
    ``text_projection_kernel()``;
  - ``logit_scale`` (the log-scale parameter) and ``logit_bias`` (a parameter, or None); both
    None without a text tower;
  - without a text tower, a supervised classifier's own head: ``classifier()`` -> (kernel
    (D, K), bias (K,)) with logits = encode_image(x) · kernel + bias (raw features);
  - ``param_groups()`` -> {group: regex on parameter paths ("vision_model/layers/3/mlp/...":
    a stacked block parameter is matched by each block's name), the groups recipes name in
    ``optimizer.trainable`` as ``<group>`` (:data:`GROUPS`);
* a :class:`Family` record: its name, the module types it builds, the checkpoint formats it
  reads (``detect`` / ``load``), its export (``save``), its random tiny variants for CPU runs and
  its tokenizer.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

# Parameter groups a family may name in ``param_groups``: recipes refer to them as ``<group>``
# ("classifier": a supervised classifier's own head).
GROUPS = ("image", "text", "scale", "adapters", "classifier")
LOSSES = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the data layer, heads and recipes need to know about a model.

  Attributes:
    family: the registry name of its family ("clip", "siglip", "resnet").
    image_size: the square input resolution in pixels.
    mean, std: per-channel normalisation of [0, 1] RGB pixels, (x - mean) / std.
    has_text: whether it has a text tower (zero-shot heads, contrastive recipes, prompts).
    loss: its contrastive pre-training loss, "softmax" (CLIP's symmetric cross-entropy) or
      "sigmoid" (SigLIP's pairwise loss); None without a text tower.
    context_length: the text tower's token length (None without one).
    vocab_size: the text tower's vocabulary size (None without one).
    eos_token_id: the token at which the text tower pools (CLIP: first EOS, so prompts may be
      cut after it), or None when it pools at a fixed position (SigLIP: the last token).
  """
  family: str
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  has_text: bool
  loss: str | None = None
  context_length: int | None = None
  vocab_size: int | None = None
  eos_token_id: int | None = None


class ExportInfo(NamedTuple):
  """What an export writes beside the weights: the class names (in label order; a classifier's
  ``id2label``), the tokenizer (``glajax.load_tokenizer``'s, or None) and the image size."""
  classnames: tuple[str, ...]
  tokenizer: object
  image_size: int


class LinearClassifier(NamedTuple):
  """A classifier as an export writes it: logits = g(f(x)) · kernel + bias, with f the model's
  ``features`` ("projected": ``encode_image``; "pre_projection": ``image_features``) and g the
  L2 normalisation when ``normalize`` (glajax's heads on CLIP features), else the identity (a
  supervised classifier's head)."""
  kernel: object
  bias: object
  features: str
  normalize: bool = True


@dataclasses.dataclass(frozen=True)
class Format:
  """One checkpoint format of a family: ``detect(path) -> bool`` on a local directory (or file)
  and ``load(path, **options) -> model``; ``hub_patterns`` are the files to fetch from a hub
  repo in that format (config first: ``detect`` runs on them)."""
  name: str
  detect: Callable[[str], bool]
  load: Callable
  hub_patterns: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family (see the module docstring).

  Attributes:
    name: the registry name.
    types: the top-level module classes it builds (a model's family is found by its type).
    formats: the checkpoint formats it reads, tried in order on a directory.
    save: ``save(model, directory, *, info=None, classifier=None, extra_files=None,
      overwrite=False)``: its export in the ecosystem's format; with ``info``
      (:class:`ExportInfo`) the files a processor needs, with ``classifier``
      (:class:`LinearClassifier`) an image classifier with ``id2label`` where the ecosystem has
      one (an export refuses a classifier its format cannot hold).
    tiny: variant name -> ``build(image_size, seed) -> model``: random tiny models for CPU runs
      and tests (config checkpoints ``tiny[-variant][:seed]``).
    tokenizer: ``tokenizer(directory or None) -> glajax Tokenizer`` (None without text: such a
      family's models have no text tower).
    load_options: the keyword options its loaders take (adapters, attention, ...): any other
      option is refused, naming it.
    normalization: (mean, std) of its models' inputs, known before any model is loaded (the
      same as every one of its models' ``spec.mean`` / ``spec.std``).
  """
  name: str
  types: tuple[type, ...]
  formats: tuple[Format, ...]
  save: Callable | None
  tiny: dict
  tokenizer: Callable | None
  load_options: tuple[str, ...] = ("dtype", "param_dtype", "image_size", "seed")
  normalization: tuple = ()

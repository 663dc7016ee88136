"""The model families, one line each, and what finds a family: by checkpoint (format detection),
by model (its type), by tiny-variant name.

  model = load_model("openai/clip-vit-base-patch16")   # any family, any format it reads
  save_model(model, "out/")                            # the family's export
  tok = load_tokenizer("google/siglip-base-patch16-224")
"""
from __future__ import annotations

import os

from glajax.errors import CheckpointError, ConfigError, InputError, bad_argument
from glajax.models import checkpoints, clip, resnet, siglip
from glajax.models.family import Family, ModelSpec

# Formats are tried in this order: SigLIP's detection (model_type "siglip") before CLIP's, which
# also takes any config with both tower configs (old CLIP files).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    siglip.FAMILY,
    clip.FAMILY,
    resnet.FAMILY,
)}


def family_of(model) -> Family:
  """The family whose module types include ``model``'s type."""
  for family in FAMILIES.values():
    if isinstance(model, family.types):
      return family
  raise bad_argument("model", f"a model of a glajax family ({', '.join(FAMILIES)})",
                     type(model).__name__)


def spec_of(model) -> ModelSpec:
  """``model.spec`` of a family's model (see ``glajax.models.family``), or of the ``backbone``
  a wrapper (a classifier, a contrastive or prompt-tuned model) holds."""
  while not any(isinstance(model, f.types) for f in FAMILIES.values()) and hasattr(
      model, "backbone"):
    model = model.backbone
  family_of(model)
  return model.spec


def family_of_checkpoint(checkpoint: str) -> Family:
  """The family of a config's checkpoint: a tiny variant's, or the one ``locate`` finds."""
  name = checkpoint.partition(":")[0]
  if name in tiny_names():
    variant = name[len(TINY) + 1:] if name.startswith(TINY + "-") else ""
    return next(f for f in FAMILIES.values() if variant in f.tiny)
  return locate(checkpoint)[0]


def _detect(directory: str):
  """(family, format) of the checkpoint at a local path, trying every family's formats."""
  for family in FAMILIES.values():
    for fmt in family.formats:
      if fmt.detect(directory):
        return family, fmt
  return None


def locate(path_or_hub_id) -> tuple[Family, str]:
  """(family, format name) of a checkpoint (a local path, or a hub id whose config files are
  fetched first), or a CheckpointError listing what was there."""
  path = os.path.expanduser(os.fspath(path_or_hub_id))
  if not os.path.exists(path):
    patterns = sorted({p for f in FAMILIES.values() for fmt in f.formats
                       for p in fmt.hub_patterns if p.endswith(".json")})
    path = checkpoints.resolve_checkpoint(path_or_hub_id, allow_patterns=patterns)
  found = _detect(path)
  if found is None:
    formats = [f"{f.name} ({', '.join(fmt.name for fmt in f.formats)})" for f in FAMILIES.values()]
    raise bad_argument("path_or_hub_id", f"a checkpoint of a glajax family: {'; '.join(formats)}",
                       checkpoints.describe(path), CheckpointError)
  return found[0], found[1].name


def _check_options(family: Family, options: dict) -> None:
  unknown = sorted(set(options) - set(family.load_options))
  if unknown:
    raise bad_argument("options", f"options the {family.name} family's loader takes "
                       f"({', '.join(family.load_options)})", ", ".join(unknown), ConfigError)


def load_model(path_or_hub_id, **options):
  """The model of any family in any format it reads (``locate``); ``options`` as the family's
  loader takes them (``dtype``, ``image_size``, ``seed``, and e.g. CLIP's ``adapter_dim``)."""
  family, name = locate(path_or_hub_id)
  _check_options(family, options)
  fmt = next(f for f in family.formats if f.name == name)
  return fmt.load(path_or_hub_id, **options)


def save_model(model, directory, **options) -> str:
  """The family's export of ``model`` (a CLIP ViT in transformers format, a CLIP ResNet in
  open_clip's); returns the directory."""
  family = family_of(model)
  if family.save is None:
    raise bad_argument("model", "a model whose family has an export", family.name, InputError)
  return family.save(model, directory, **options)


def load_tokenizer(path_or_hub_id=None, **options):
  """The tokenizer of a checkpoint's family (its own files when it has them); ``None``: OpenAI
  CLIP's BPE, built offline. ``options``: e.g. ``context_length``."""
  if path_or_hub_id is None:
    return clip.FAMILY.tokenizer(None, **options)
  family, _ = locate(path_or_hub_id)
  if family.tokenizer is None:
    raise bad_argument("path_or_hub_id", "a checkpoint of a family with a text tower",
                       f"a {family.name} checkpoint", CheckpointError)
  return family.tokenizer(path_or_hub_id, **options)


TINY = "tiny"


def tiny_names() -> list[str]:
  """Every tiny variant's checkpoint name: ``tiny`` (CLIP ViT), ``tiny-<variant>``."""
  return [TINY + (f"-{v}" if v else "") for f in FAMILIES.values() for v in f.tiny]


def tiny_model(name: str, image_size: int, seed: int = 0):
  """A random tiny model of variant ``name`` (``tiny_names``), for CPU runs and tests."""
  variant = name[len(TINY) + 1:] if name.startswith(TINY + "-") else ("" if name == TINY else None)
  for family in FAMILIES.values():
    if variant in family.tiny:
      return family.tiny[variant](image_size, seed)
  raise bad_argument("model.checkpoints", f"one of {', '.join(tiny_names())} (with ':SEED')",
                     repr(name), ConfigError)

"""glajax: fine-tuning CLIP-like foundation models without inheriting their biases, in JAX.

Models (any family: CLIP ViT and ResNet, SigLIP, supervised ResNet; any format they come in):
    model = glajax.load_model(path_or_hub_id)         # or glajax.load_clip for CLIPs
    glajax.save_model(model, directory)               # the family's export (CLIP: transformers)
    tok = glajax.load_tokenizer(path_or_hub_id)       # None: OpenAI CLIP's BPE, offline
    head = glajax.zeroshot_head(model, tok, classnames, templates)   # (C, D) zero-shot head
The papers' methods, pure and jittable, on logits and parameter pytrees:
    from glajax import methods as M                   # M.estimate_log_prior, M.gla_ensemble,
                                                      # M.wise_ft, M.ece, M.bootstrap, ...
Experiments: `glajax run CONFIG --workdir DIR` (glajax.experiments), `glajax demo`.
Errors: every bad input raises a glajax.GlajaxError subclass (InputError, CheckpointError,
DatasetError, ConfigError, TrainingError) naming the argument, what was expected and found.
"""
from glajax.errors import (CheckpointError, ConfigError, DatasetError, GlajaxError, InputError,
                           TrainingError)

__version__ = "0.1.0"

# Model-layer entry points are imported lazily so that `import glajax.methods` stays light.
_LAZY = {
    "load_model": "glajax.models.registry",
    "save_model": "glajax.models.registry",
    "load_tokenizer": "glajax.models.registry",
    "load_clip": "glajax.models.clip",
    "save_clip": "glajax.models.clip",
    "CLIP": "glajax.models.clip",
    "CLIPConfig": "glajax.models.clip",
    "init_clip": "glajax.models.clip",
    "zeroshot_head": "glajax.zeroshot",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # noqa  (the lazy public API)
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name == "methods":
    import importlib  # noqa  (the lazy public API)
    return importlib.import_module("glajax.methods")
  raise AttributeError(f"module 'glajax' has no attribute {name!r}")


def __dir__():
  return sorted({*globals(), *_LAZY, "methods"})


# help(glajax) documents the API; the errors are named in the docstring (their classes only
# repeat Exception's members).
__all__ = [*_LAZY, "methods"]

"""glajax: fine-tuning CLIP-like foundation models without inheriting their biases, in JAX."""
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


__all__ = ["GlajaxError", "InputError", "CheckpointError", "DatasetError", "ConfigError",
           "TrainingError", *_LAZY, "methods"]

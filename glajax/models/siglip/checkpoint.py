"""Loading and saving SigLIPs in transformers format (``params_hf``): ``config.json`` +
``model.safetensors`` (sharded or not, BF16 included) or ``pytorch_model.bin``."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from glajax.errors import CheckpointError, InputError, bad_argument
from glajax.methods import _checks
from glajax.models import checkpoints, layers
from glajax.models.siglip import params_hf
from glajax.models.siglip.modeling import SigLIP, SiglipConfig, interpolate_position_embedding

WEIGHTS_FILE = "model.safetensors"


def _locate(path_or_hub_id) -> str:
  """The directory of a SigLIP checkpoint, or a CheckpointError naming what was found."""
  directory = checkpoints.hub_directory(path_or_hub_id, params_hf.HUB_PATTERNS)
  if not params_hf.detect(directory):
    raise bad_argument("path_or_hub_id", f"a SigLIP checkpoint: {params_hf.DESCRIPTION}",
                       f"not a SigLIP checkpoint: {checkpoints.describe(directory)}",
                       CheckpointError)
  return directory


def load_siglip(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32,
                param_dtype=jnp.float32, image_size: int | None = None, remat: str = "none",
                attention: str = "auto", unroll: int = 1, seed: int = 0) -> SigLIP:
  """Loads a transformers-format SigLIP or fixed-resolution SigLIP 2 checkpoint (local directory
  or hub id) as a ``SigLIP``.

  ``image_size`` resizes the position embeddings bicubically; ``remat``, ``attention`` and
  ``unroll`` set both towers' (see ``SiglipVisionConfig``). Every missing, unexpected or
  misshapen tensor is reported by name in one CheckpointError. ``seed`` is accepted as every
  family's loader takes it; a complete checkpoint leaves nothing to initialise.
  """
  del seed
  if image_size is not None:
    _checks.positive_int("image_size", image_size)  # before reading gigabytes of weights
  directory = _locate(path_or_hub_id)
  config, tensors = params_hf.read(directory)
  run = dict(remat=remat, attention=attention, unroll=unroll)
  config = dataclasses.replace(config, vision=layers.with_run_options(config.vision, **run),
                               text=layers.with_run_options(config.text, **run))
  model = from_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype, source=directory)
  if image_size is not None and image_size != config.vision.image_size:
    interpolate_position_embedding(model, image_size)
  return model


def from_tensors(config: SiglipConfig, tensors: dict[str, np.ndarray], *, dtype=jnp.float32,
                 param_dtype=jnp.float32, source: str = "tensors") -> SigLIP:
  """A ``SigLIP`` from a transformers ``state_dict`` as NumPy arrays (built abstractly, every
  tensor shape-checked)."""
  graphdef, flat, expected = checkpoints.abstract(
      lambda: SigLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  converted = params_hf.TABLE.convert(tensors, expected, source)
  return checkpoints.assemble(graphdef, flat, converted)


_REPLACEABLE = re.compile(f"({params_hf.CHECKPOINT_FILES})$")


def save_siglip(model: SigLIP, directory: str | os.PathLike, *, overwrite: bool = False,
                extra_files: dict | None = None) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that transformers' ``SiglipModel`` loads
  (float32; loading it back gives the same parameters, bit for bit).

  ``extra_files`` maps more file names to their content (``bytes``, ``str`` or a function
  ``write(path)``). Written atomically (``checkpoints.write_export``): an earlier glajax export
  is replaced, a checkpoint glajax did not write only with ``overwrite=True``, any other file
  never. Returns the absolute path.
  """
  if not isinstance(model, SigLIP):
    raise bad_argument("model", "a glajax SigLIP", type(model).__name__)
  checkpoints.export_target(directory)
  extra_files = dict(extra_files or {})
  checkpoints.check_file_names("extra_files", extra_files, ("config.json", WEIGHTS_FILE))
  weights = params_hf.TABLE.export(checkpoints.host_params(model))
  checkpoints.check_finite(weights, "the model", "model", InputError)
  config = model.config.to_hf()

  def write(tmp):
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    save_file(weights, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    checkpoints.write_files(tmp, extra_files)

  return checkpoints.write_export(directory, write, overwrite=overwrite, replaceable=_REPLACEABLE)

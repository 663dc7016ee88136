"""Loading and saving CLIPs in every checkpoint format the family reads (``FORMATS``), with
LIFT's adapters kept beside the weights in ``glajax_adapters.safetensors``.

A format is a module with ``detect(directory) -> bool``, ``read(directory) -> (CLIPConfig,
tensors)`` and ``TABLE`` (its tensor names -> glajax paths); formats that glajax also writes have
``CHECKPOINT_FILES``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from glajax.errors import CheckpointError, InputError, bad_argument
from glajax.methods import _checks
from glajax.models import checkpoints
from glajax.models.clip import params_hf
from glajax.models.clip.modeling import CLIP, CLIPConfig, interpolate_position_embedding
from glajax.models.layers import Adapter

# format name -> module, in the order they are tried on a directory
FORMATS = {"transformers": params_hf}
ADAPTERS_FILE = "glajax_adapters.safetensors"


def _is_adapter(path: str) -> bool:
  return ".adapter." in path


def detect_format(directory: str) -> str | None:
  """The name of the first format in ``FORMATS`` that ``directory`` holds, or None."""
  return next((name for name, module in FORMATS.items() if module.detect(directory)), None)


def _locate(path_or_hub_id) -> tuple[str, str]:
  """(directory, format name) of a CLIP checkpoint, or a CheckpointError naming what was found."""
  directory = params_hf.hub_directory(path_or_hub_id)
  name = detect_format(directory)
  if name is None:
    formats = "; ".join(module.DESCRIPTION for module in FORMATS.values())
    raise bad_argument("path_or_hub_id", f"a CLIP checkpoint: {formats}",
                       f"not a CLIP checkpoint: {checkpoints.describe(directory)}",
                       CheckpointError)
  return directory, name


def load_clip(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
              image_size: int | None = None, adapter_dim: int | None = None,
              adapter_scale: float | str = "learnable", remat: bool = False,
              attention: str = "auto", activation: str | None = None, seed: int = 0) -> CLIP:
  """Loads a CLIP checkpoint (local directory or hub id) in any of ``FORMATS`` as a ``CLIP``.

  ``image_size`` resizes the position embeddings bicubically. ``adapter_dim > 0`` adds freshly
  initialised AdaptFormer adapters (LIFT's, ``adapter_scale`` ``"learnable"`` or a fixed float;
  ``up`` zero, so outputs equal the checkpoint's); adapters saved by ``save_clip`` in
  ``glajax_adapters.safetensors`` are restored when ``adapter_dim`` is None. ``remat`` and
  ``attention`` set both towers' (see ``CLIPVisionConfig``); ``activation`` (e.g.
  ``"quick_gelu"``) replaces both towers' activation, as OpenAI's ``build_model`` rebuilds every
  checkpoint with QuickGELU.
  """
  if image_size is not None:
    _checks.positive_int("image_size", image_size)  # before reading gigabytes of weights
  directory, name = _locate(path_or_hub_id)
  config, tensors = FORMATS[name].read(directory)
  adapters = _read_adapters(directory) if adapter_dim is None else None
  if adapters is not None:
    adapter_dim, adapter_scale = adapters[1], adapters[2]
  towers = dict(remat=remat, attention=attention)
  if activation is not None:
    towers["hidden_act"] = activation
  config = dataclasses.replace(
      config, vision=dataclasses.replace(config.vision, adapter_dim=adapter_dim or 0,
                                         adapter_scale=adapter_scale, **towers),
      text=dataclasses.replace(config.text, **towers))
  model = from_tensors(config, tensors, FORMATS[name].TABLE, dtype=dtype, param_dtype=param_dtype,
                       seed=seed, adapters=None if adapters is None else adapters[0],
                       source=directory)
  if image_size is not None and image_size != config.vision.image_size:
    interpolate_position_embedding(model, image_size)
  return model


def from_tensors(config: CLIPConfig, tensors: dict[str, np.ndarray],
                 table: checkpoints.Table = params_hf.TABLE, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, seed: int = 0, adapters=None,
                 source: str = "tensors") -> CLIP:
  """A ``CLIP`` from tensors named as ``table`` says (default: a transformers ``state_dict`` as
  NumPy arrays).

  The model is built abstractly; adapter parameters come from ``adapters`` (glajax paths) or,
  when ``config.vision.adapter_dim > 0`` and none are given, a fresh init with ``seed``.
  """
  graphdef, flat, expected = checkpoints.abstract(
      lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)))
  converted = table.convert(tensors, expected, source, optional=_is_adapter)
  if adapters is not None:
    converted.update(_check_adapters(adapters, expected, source))
  elif config.vision.adapter_dim:
    converted.update(_init_adapters(config, dtype, param_dtype, seed))
  return checkpoints.assemble(graphdef, flat, expected, converted)


def _init_adapters(config: CLIPConfig, dtype, param_dtype, seed: int) -> dict[str, jax.Array]:
  rngs = nnx.Rngs(seed)
  out = {}
  for i in range(config.vision.num_hidden_layers):
    adapter = Adapter(config.vision.hidden_size, config.vision.adapter_dim,
                      scale=config.vision.adapter_scale, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
    for path, var in nnx.to_flat_state(nnx.state(adapter, nnx.Param)):
      out[f"vision_model.layers.{i}.adapter.{checkpoints.path_str(path)}"] = var.get_value()
  return out


def _read_adapters(directory: str):
  path = os.path.join(directory, ADAPTERS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    scale = meta["adapter_scale"].strip("'\"")
    return tensors, int(meta["adapter_dim"]), scale if scale == "learnable" else float(scale)
  except Exception as e:
    raise bad_argument("checkpoint", f"a readable {ADAPTERS_FILE}",
                       f"{path} ({type(e).__name__}: {e})", CheckpointError) from None


def _check_adapters(tensors, expected, source) -> dict[str, np.ndarray]:
  wanted = {p: s for p, s in expected.items() if _is_adapter(p)}
  problems = [f"missing adapter tensor {p}" for p in wanted if p not in tensors]
  problems += [f"{p}: expected shape {wanted[p].shape}, found {v.shape}"
               for p, v in tensors.items() if p in wanted and v.shape != wanted[p].shape]
  problems += [f"unexpected adapter tensor {p}" for p in tensors if p not in wanted]
  if problems:
    raise CheckpointError(f"{ADAPTERS_FILE} in {source} does not fit the model:\n  "
                          + "\n  ".join(problems))
  checkpoints.check_finite(tensors, f"{source}/{ADAPTERS_FILE}")
  return tensors


_REPLACEABLE = re.compile(f"({params_hf.CHECKPOINT_FILES}|{re.escape(ADAPTERS_FILE)})$")


def save_clip(model: CLIP, directory: str | os.PathLike, *, overwrite: bool = False,
              extra_files: dict | None = None, config_updates: dict | None = None,
              extra_tensors: dict | None = None) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that transformers' ``CLIPModel`` loads.

  Adapter parameters (not part of transformers' CLIP) go to ``glajax_adapters.safetensors``,
  which ``load_clip`` restores. ``extra_files`` maps more file names to their content (``bytes``
  or ``str``) or to a function ``write(path)``; they are part of the export (e.g. a head).
  ``extra_tensors`` join ``model.safetensors`` under their own names.

  Never destroys anything (``checkpoints.write_export``): written into a temporary directory
  that then takes the place of ``directory``; an earlier glajax export is replaced, a checkpoint
  glajax did not write only with ``overwrite=True``, any other file never. Returns the
  absolute path.
  """
  if not isinstance(model, CLIP):
    raise bad_argument("model", "a glajax CLIP", type(model).__name__)
  checkpoints.export_target(directory)
  extra_files = dict(extra_files or {})
  checkpoints.check_file_names("extra_files", extra_files,
                               ("config.json", "model.safetensors", ADAPTERS_FILE))
  params = checkpoints.host_params(model)
  adapters = {k: v for k, v in params.items() if _is_adapter(k)}
  weights = params_hf.TABLE.export({k: v for k, v in params.items() if not _is_adapter(k)})
  for name, value in (extra_tensors or {}).items():
    if not isinstance(name, str) or name in weights:
      raise bad_argument("extra_tensors", "names other than the CLIP's own", repr(name))
    weights[name] = np.ascontiguousarray(value, np.float32)
  # A diverged model is not exported (load_clip would refuse it anyway).
  checkpoints.check_finite({**weights, **adapters}, "the model", "model", InputError)
  config = model.config

  def write(tmp):
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({**config.to_hf(), **(config_updates or {})}, f, indent=2)
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if adapters:
      save_file(adapters, os.path.join(tmp, ADAPTERS_FILE),
                metadata={"adapter_dim": str(config.vision.adapter_dim),
                          "adapter_scale": repr(config.vision.adapter_scale)})
    checkpoints.write_files(tmp, extra_files)

  return checkpoints.write_export(directory, write, overwrite=overwrite, replaceable=_REPLACEABLE)

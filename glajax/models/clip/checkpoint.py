"""Loading and saving CLIPs in every checkpoint format the family reads (``FORMATS``), with
LIFT's adapters kept beside the weights in ``glajax_adapters.safetensors``.

A format is a module with ``DESCRIPTION``; ``detect(path) -> bool``; ``read(path) ->
(CLIPConfig, tensors)``; ``table(config)`` (its tensor names -> glajax paths, per image tower);
``HUB_PATTERNS`` (configs first, weights, tokenizer files) and ``HUB_FALLBACK`` (the PyTorch
weights, fetched when a repo has no safetensors) with ``WEIGHTS`` (its weight file names, as
``checkpoints.weight_files`` takes them). Formats that glajax also writes (``WRITERS``) have
``CONFIG_FILE``, ``WEIGHTS_FILE``, ``CHECKPOINT_FILES``, ``config_json(config)`` and
``export(params, config)``.
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

from glajax.errors import CheckpointError, ConfigError, InputError, bad_argument
from glajax.methods import _checks
from glajax.models import checkpoints, layers
from glajax.models.clip import params_hf, params_open_clip, params_openai
from glajax.models.clip.modeling import CLIP, CLIPConfig, interpolate_position_embedding
from glajax.models.layers import Adapter

# format name -> module, in the order they are tried on a path
FORMATS = {"transformers": params_hf, "open_clip": params_open_clip, "openai": params_openai}
# the format save_clip writes: transformers' for ViTs, open_clip's for ResNets (transformers has
# no ResNet CLIP)
WRITERS = {"transformers": params_hf, "open_clip": params_open_clip}
ADAPTERS_FILE = "glajax_adapters.safetensors"
_CONFIG_PATTERNS = sorted({p for m in FORMATS.values() for p in m.HUB_PATTERNS
                           if p.endswith(".json")})


def _is_adapter(path: str) -> bool:
  return ".adapter." in path


def detect_format(path: str) -> str | None:
  """The name of the first format in ``FORMATS`` that ``path`` holds, or None."""
  return next((name for name, module in FORMATS.items() if module.detect(path)), None)


def _locate(path_or_hub_id) -> tuple[str, str]:
  """(local path, format name) of a CLIP checkpoint (a directory, an OpenAI ``.pt`` file or a
  hub id, whose configs are fetched first, then the weights of its format), or a
  CheckpointError naming what was found."""
  local = os.path.exists(os.path.expanduser(os.fspath(path_or_hub_id)))
  path = checkpoints.resolve_checkpoint(path_or_hub_id, allow_patterns=_CONFIG_PATTERNS,
                                        file_suffixes=params_openai.SUFFIXES)
  name = detect_format(path)
  if name is None:
    formats = "; ".join(module.DESCRIPTION for module in FORMATS.values())
    raise bad_argument("path_or_hub_id", f"a CLIP checkpoint: {formats}",
                       f"not a CLIP checkpoint: {checkpoints.describe(path)} "
                       "(glajax.load_model reads the checkpoint of any glajax family)",
                       CheckpointError)
  if not local:
    module = FORMATS[name]
    path = checkpoints.resolve_checkpoint(path_or_hub_id, allow_patterns=module.HUB_PATTERNS)
    if not checkpoints.has_weights(path, module.WEIGHTS):
      path = checkpoints.resolve_checkpoint(
          path_or_hub_id, allow_patterns=[*module.HUB_PATTERNS, *module.HUB_FALLBACK])
  return path, name


def load_clip(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
              image_size: int | None = None, adapter_dim: int | None = None,
              adapter_scale: float | str = "learnable", remat: str = "none",
              attention: str = "auto", unroll: int = 1, activation: str | None = None,
              seed: int = 0) -> CLIP:
  """Loads a CLIP checkpoint (a local directory, an OpenAI ``.pt`` file or a hub id) in any of
  ``FORMATS`` as a ``CLIP``.

  ``image_size`` resizes the position embeddings bicubically. ``adapter_dim > 0`` adds freshly
  initialised AdaptFormer adapters to a ViT (LIFT's, ``adapter_scale`` ``"learnable"`` or a
  fixed float; ``up`` zero, so outputs equal the checkpoint's); adapters saved by ``save_clip``
  in ``glajax_adapters.safetensors`` are restored when ``adapter_dim`` is None. ``remat`` sets
  both towers', ``attention`` and ``unroll`` the transformers' (see ``CLIPVisionConfig``; a
  ResNet's attention pool always uses XLA's kernel); ``activation`` (e.g. ``"quick_gelu"``)
  replaces the transformers' activation, as OpenAI's ``build_model`` rebuilds every checkpoint
  with QuickGELU.
  """
  if image_size is not None:
    _checks.positive_int("image_size", image_size)  # before reading gigabytes of weights
  path, name = _locate(path_or_hub_id)
  config, tensors = FORMATS[name].read(path)
  adapters = _read_adapters(path) if adapter_dim is None and os.path.isdir(path) else None
  if adapters is not None:
    adapter_dim, adapter_scale = adapters[1], adapters[2]
  config = _with_options(config, adapter_dim=adapter_dim or 0, adapter_scale=adapter_scale,
                         remat=remat, attention=attention, unroll=unroll, activation=activation)
  model = from_tensors(config, tensors, FORMATS[name].table(config), dtype=dtype,
                       param_dtype=param_dtype, seed=seed,
                       adapters=None if adapters is None else adapters[0], source=path)
  if image_size is not None and image_size != config.vision.image_size:
    interpolate_position_embedding(model, image_size)
  return model


def _with_options(config: CLIPConfig, *, adapter_dim, adapter_scale, remat, attention, unroll,
                  activation) -> CLIPConfig:
  """``config`` with ``load_clip``'s options set in the towers they apply to."""
  run = dict(remat=remat, attention=attention, unroll=unroll)
  activation = {} if activation is None else {"hidden_act": activation}
  text = dataclasses.replace(layers.with_run_options(config.text, **run), **activation)
  vision = layers.with_run_options(config.vision, **run)
  if config.resnet:
    if adapter_dim:
      raise bad_argument("adapter_dim", "0 or None for a ResNet CLIP (LIFT's AdaptFormer adapters "
                         "sit in transformer blocks)", adapter_dim, ConfigError)
  else:
    vision = dataclasses.replace(vision, adapter_dim=adapter_dim, adapter_scale=adapter_scale,
                                 **activation)
  return dataclasses.replace(config, vision=vision, text=text)


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
  elif getattr(config.vision, "adapter_dim", 0):  # a ViT's LIFT adapters
    converted.update(_init_adapters(config, dtype, param_dtype, seed))
  return checkpoints.assemble(graphdef, flat, converted)


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


_REPLACEABLE = re.compile("(" + "|".join(m.CHECKPOINT_FILES for m in WRITERS.values())
                          + f"|{re.escape(ADAPTERS_FILE)})$")


def writer(model: CLIP, fmt: str | None = None):
  """The format module ``save_clip`` writes ``model`` in: ``fmt`` (a name in ``WRITERS``), or
  transformers' for a ViT and open_clip's for a ResNet."""
  if fmt is None:
    fmt = "open_clip" if model.config.resnet else "transformers"
  if fmt not in WRITERS:
    raise bad_argument("format", f"one of {', '.join(WRITERS)}", repr(fmt))
  if fmt == "transformers" and model.config.resnet:
    raise bad_argument("format", "'open_clip' for a ResNet CLIP (transformers has none)",
                       repr(fmt))
  return WRITERS[fmt]


def save_clip(model: CLIP, directory: str | os.PathLike, *, format: str | None = None,
              overwrite: bool = False, extra_files: dict | None = None,
              config_updates: dict | None = None, extra_tensors: dict | None = None) -> str:
  """Writes ``model`` in a format that its ecosystem loads: a ViT as transformers' ``CLIPModel``
  (``config.json`` + ``model.safetensors``), a ResNet as open_clip's
  (``open_clip_config.json`` + ``open_clip_model.safetensors``, which
  ``open_clip.create_model("local-dir:...")`` builds); ``format`` ("transformers" or
  "open_clip") picks another.

  Adapter parameters (not part of either format) go to ``glajax_adapters.safetensors``, which
  ``load_clip`` restores. ``extra_files`` maps more file names to their content (``bytes``
  or ``str``) or to a function ``write(path)``; they are part of the export (e.g. a head).
  ``config_updates`` join the config file and ``extra_tensors`` the weights file under their
  own names.

  Never destroys anything (``checkpoints.write_export``): written into a temporary directory
  that then takes the place of ``directory``; an earlier glajax export is replaced, a checkpoint
  glajax did not write only with ``overwrite=True``, any other file never. Returns the
  absolute path.
  """
  if not isinstance(model, CLIP):
    raise bad_argument("model", "a glajax CLIP", type(model).__name__)
  fmt = writer(model, format)
  checkpoints.export_target(directory)
  extra_files = dict(extra_files or {})
  checkpoints.check_file_names("extra_files", extra_files,
                               (fmt.CONFIG_FILE, fmt.WEIGHTS_FILE, ADAPTERS_FILE))
  config = model.config
  config_file = {**fmt.config_json(config), **(config_updates or {})}
  params = checkpoints.host_params(model, (nnx.Param, nnx.BatchStat))
  adapters = {k: v for k, v in params.items() if _is_adapter(k)}
  weights = fmt.export({k: v for k, v in params.items() if not _is_adapter(k)}, config)
  for name, value in (extra_tensors or {}).items():
    if not isinstance(name, str) or name in weights:
      raise bad_argument("extra_tensors", "names other than the CLIP's own", repr(name))
    weights[name] = np.ascontiguousarray(value, np.float32)
  # A diverged model is not exported (load_clip would refuse it anyway).
  checkpoints.check_finite({**weights, **adapters}, "the model", "model", InputError)

  def write(tmp):
    with open(os.path.join(tmp, fmt.CONFIG_FILE), "w") as f:
      json.dump(config_file, f, indent=2)
    save_file(weights, os.path.join(tmp, fmt.WEIGHTS_FILE), metadata={"format": "pt"})
    if adapters:
      save_file(adapters, os.path.join(tmp, ADAPTERS_FILE),
                metadata={"adapter_dim": str(config.vision.adapter_dim),
                          "adapter_scale": repr(config.vision.adapter_scale)})
    checkpoints.write_files(tmp, extra_files)

  return checkpoints.write_export(directory, write, overwrite=overwrite, replaceable=_REPLACEABLE)

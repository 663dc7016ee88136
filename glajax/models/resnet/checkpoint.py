"""Loading ResNets in every format the family reads (``FORMATS``) and saving them in
transformers' ``ResNetForImageClassification`` format.

A format is (name, ``detect(path) -> bool``, ``read(directory or file) -> (ResNetConfig,
tensors)``, its table, how a hub id or path becomes a local one, its hub files).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from glajax.errors import CheckpointError, InputError, bad_argument
from glajax.methods import _checks
from glajax.models import checkpoints
from glajax.models.resnet import params_hf, params_torchvision as tv
from glajax.models.resnet.modeling import ResNet, ResNetConfig


class Format(NamedTuple):
  detect: Callable[[str], bool]
  read: Callable[[str], tuple]
  table: checkpoints.Table
  local: Callable[[str], str]
  description: str
  hub_patterns: tuple[str, ...] = ()


def _as_file(path_or_hub_id) -> str:
  return checkpoints.resolve_checkpoint(path_or_hub_id, file_suffixes=tv.FILE_SUFFIXES)


# format name -> Format, in the order they are tried
FORMATS = {
    "transformers": Format(params_hf.detect, params_hf.read, params_hf.TABLE,
                           params_hf.hub_directory, params_hf.DESCRIPTION, params_hf.HUB_PATTERNS),
    "timm": Format(tv.detect_timm, tv.read_timm, tv.TABLE, tv.timm_directory,
                   tv.TIMM_DESCRIPTION, tv.TIMM_PATTERNS),
    "torchvision": Format(tv.detect_file, tv.read_state_dict_file, tv.TABLE, _as_file,
                          tv.FILE_DESCRIPTION),
}


def _locate(path_or_hub_id) -> tuple[str, str]:
  """(local path, format name) of a ResNet checkpoint, or a CheckpointError naming what was
  found (e.g. a CLIP checkpoint)."""
  path = os.path.expanduser(os.fspath(path_or_hub_id))
  if os.path.isfile(path):
    local = _as_file(path)
  else:
    local = checkpoints.resolve_checkpoint(
        path_or_hub_id, allow_patterns=sorted({p for f in FORMATS.values()
                                               for p in f.hub_patterns if p.endswith(".json")}))
  for name, fmt in FORMATS.items():
    if fmt.detect(local):
      return (local if fmt.local is _as_file else fmt.local(path_or_hub_id)), name
  raise bad_argument("path_or_hub_id", "a ResNet checkpoint: " + "; ".join(
      f.description for f in FORMATS.values()), f"not a ResNet checkpoint: "
      f"{checkpoints.describe(local)}", CheckpointError)


def load_resnet(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32,
                param_dtype=jnp.float32, image_size: int | None = None,
                seed: int = 0) -> ResNet:
  """Loads a ResNet checkpoint (a local directory or file, or a hub id) in any of ``FORMATS``.

  ``image_size`` only changes the resolution the model reports (``spec``): a ResNet pools any
  size. Every tensor is shape-checked; missing and unexpected tensors are reported by name,
  together. The model is in eval mode (BatchNorm on its running statistics).
  """
  if image_size is not None:
    _checks.positive_int("image_size", image_size)
  path, name = _locate(path_or_hub_id)
  config, tensors = FORMATS[name].read(path)
  if image_size is not None:
    config = dataclasses.replace(config, image_size=image_size)
  return from_tensors(config, tensors, FORMATS[name].table, dtype=dtype,
                      param_dtype=param_dtype, seed=seed, source=path)


def from_tensors(config: ResNetConfig, tensors: dict[str, np.ndarray],
                 table: checkpoints.Table = tv.TABLE, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, seed: int = 0, source: str = "tensors") -> ResNet:
  """A ``ResNet`` from tensors named as ``table`` says (default: a torchvision state dict as
  NumPy arrays); the model is built abstractly and every parameter and statistic set."""
  graphdef, flat, expected = checkpoints.abstract(
      lambda: ResNet(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)))
  converted = table.convert(tensors, expected, source)
  return checkpoints.assemble(graphdef, flat, converted)


def host_state(model: ResNet) -> dict[str, np.ndarray]:
  """glajax path -> float32 NumPy copy of every parameter and BatchNorm statistic."""
  return checkpoints.host_params(model, nnx.Any(nnx.Param, nnx.BatchStat))


_REPLACEABLE = re.compile(f"({params_hf.CHECKPOINT_FILES})$")


def preprocessor_config(image_size: int, mean, std) -> dict:
  """transformers' ``ConvNextImageProcessor`` settings of the ImageNet ResNets (as
  ``microsoft/resnet-50``): bicubic resize of the short side to image_size / 0.875, center
  crop to ``image_size``, rescale to [0, 1], ``mean`` and ``std``."""
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise bad_argument("image_size", "a positive int", repr(image_size))
  return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True,
          "size": {"shortest_edge": image_size}, "crop_pct": 0.875, "resample": 3,
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(mean), "image_std": list(std)}


def save_resnet(model: ResNet, directory: str | os.PathLike, *, overwrite: bool = False,
                labels=None, head=None, image_size: int | None = None,
                extra_files: dict | None = None) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that transformers'
  ``ResNetForImageClassification`` loads (float32; ``num_batches_tracked`` written as 0) and
  ``preprocessor_config.json`` (:func:`preprocessor_config`: the model's mean and std at
  ``image_size``, default the model's).

  ``head`` = (kernel (D, C), bias (C,)) replaces the model's ``fc`` in the export (a
  fine-tuned classifier's head), ``labels`` its C class names (``id2label``; default: the
  model's own names, else LABEL_i). ``extra_files``: more files (name -> ``bytes``, ``str`` or
  ``write(path)``). Written atomically (``checkpoints.write_export``): an earlier glajax export
  is replaced, a checkpoint glajax did not write only with ``overwrite=True``, any other file
  never. Returns the absolute path.
  """
  if not isinstance(model, ResNet):
    raise bad_argument("model", "a glajax ResNet", type(model).__name__)
  checkpoints.export_target(directory)
  extra_files = dict(extra_files or {})
  checkpoints.check_file_names("extra_files", extra_files,
                               ("config.json", "model.safetensors", "preprocessor_config.json"))
  config = model.config
  processor = preprocessor_config(config.image_size if image_size is None else image_size,
                                  config.mean, config.std)
  state = host_state(model)
  if head is not None:
    kernel, bias = (np.asarray(a, np.float32) for a in head)
    if kernel.shape[:1] != (config.num_features,) or bias.shape != kernel.shape[1:]:
      raise bad_argument("head", f"a ({config.num_features}, C) kernel and a (C,) bias",
                         f"{kernel.shape} and {bias.shape}")
    state.update({"fc.kernel": kernel, "fc.bias": bias})
    config = dataclasses.replace(config, num_classes=kernel.shape[1], labels=None)
  if labels is not None and len(labels) != config.num_classes:
    raise bad_argument("labels", f"{config.num_classes} class names", len(labels))
  checkpoints.check_finite(state, "the model", "model", InputError)
  weights = params_hf.TABLE.export(state)
  for key in list(weights):
    if key.endswith(".running_var"):
      weights[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  hf_config = params_hf.config_to_hf(config, labels)

  def write(tmp):
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
      json.dump(processor, f, indent=2)
    checkpoints.write_files(tmp, extra_files)

  return checkpoints.write_export(directory, write, overwrite=overwrite, replaceable=_REPLACEABLE)

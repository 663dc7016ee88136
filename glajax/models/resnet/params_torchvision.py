"""torchvision and timm ResNet checkpoints (one state-dict layout: ``conv1.weight``,
``bn1.running_mean``, ``layer1.0.conv2.weight``, ``layer1.0.downsample.0.weight``,
``fc.weight``; torchvision/models/resnet.py, timm/models/resnet.py) <-> glajax ``ResNet``.

Two ways to hold it:

* ``torchvision``: a state-dict file, ``.pth`` / ``.pt`` / ``.bin`` (``torch.save``; torch
  needed) or ``.safetensors``, e.g. torchvision's ``resnet50-0676ba61.pth``. A file has no
  config: the architecture is read off the tensor shapes.
* ``timm``: a hub folder (``timm/resnet50.tv_in1k``): ``config.json`` with ``"architecture":
  "resnet50"`` and ``pretrained_cfg`` (input size, mean, std), weights in ``model.safetensors``
  or ``pytorch_model.bin``.

BatchNorm's ``num_batches_tracked`` counters are skipped (PyTorch uses them only without a
momentum).
"""
from __future__ import annotations

import os
import re

import numpy as np

from glajax.errors import CheckpointError, ConfigError, bad_argument
from glajax.models import checkpoints
from glajax.models.resnet.modeling import ARCHITECTURES, ResNetConfig

BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def _bn_rows(theirs: str, ours: str):
  return tuple((f"{theirs}.{t}", f"{ours}.{o}", "same") for t, o in BN)


TABLE = checkpoints.Table(
    slots={"s": r"[1-9]\d*", "i": r"\d+", "j": r"[123]"},
    rows=(  # (torchvision key, glajax path, transform)
        ("conv1.weight", "conv1.kernel", "conv"),
        *_bn_rows("bn1", "bn1"),
        ("layer{s}.{i}.conv{j}.weight", "layer{s}.{i}.conv{j}.kernel", "conv"),
        *_bn_rows("layer{s}.{i}.bn{j}", "layer{s}.{i}.bn{j}"),
        ("layer{s}.{i}.downsample.0.weight", "layer{s}.{i}.downsample.conv.kernel", "conv"),
        *_bn_rows("layer{s}.{i}.downsample.1", "layer{s}.{i}.downsample.bn"),
        ("fc.weight", "fc.kernel", "linear"),
        ("fc.bias", "fc.bias", "same"),
    ),
    skipped=re.compile(r".*num_batches_tracked$"),
)
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
FILE_DESCRIPTION = "torchvision (a ResNet state dict: .pth, .pt, .bin or .safetensors file)"
TIMM_DESCRIPTION = ("timm (config.json with 'architecture': 'resnet50' etc. + model.safetensors "
                    "or pytorch_model.bin)")
TIMM_PATTERNS = ("config.json", "model.safetensors")
TIMM_WEIGHTS = (("", "model.safetensors"), ("", "pytorch_model.bin"))


# ------------------------------------------------------------------------ state-dict files


def read_file(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a state-dict file, float32 NumPy."""
  if path.endswith(".safetensors"):
    return checkpoints.read_safetensors(path)
  return checkpoints.read_torch(path)


def _looks_like_resnet(keys) -> bool:
  keys = set(keys)
  return {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= keys


def detect_file(path: str) -> bool:
  """Whether ``path`` is a state-dict file of a torchvision/timm ResNet (its keys say so)."""
  if not (os.path.isfile(path) and path.endswith(FILE_SUFFIXES)):
    return False
  try:
    if path.endswith(".safetensors"):
      from safetensors import safe_open  # noqa  (only the header is read)
      with safe_open(path, framework="numpy") as f:
        return _looks_like_resnet(f.keys())
    return _looks_like_resnet(read_file(path))
  except Exception:  # not a state dict (a TorchScript archive, a corrupt file): not this format
    return False


def config_from_tensors(tensors: dict[str, np.ndarray], source: str) -> ResNetConfig:
  """The ``ResNetConfig`` of a torchvision-layout state dict, read off its shapes: the block
  type (``conv3`` present: bottleneck), blocks per stage, widths, stem width, classes."""
  if not _looks_like_resnet(tensors):
    raise bad_argument("checkpoint", "a torchvision/timm ResNet state dict (conv1.weight, "
                       "layer1.0.conv1.weight, fc.weight, ...)",
                       f"{source} with keys {sorted(tensors)[:8]}", CheckpointError)
  block = "bottleneck" if "layer1.0.conv3.weight" in tensors else "basic"
  depths, widths = [], []
  while f"layer{len(depths) + 1}.0.conv1.weight" in tensors:
    s = len(depths) + 1
    depths.append(sum(1 for k in tensors if re.fullmatch(rf"layer{s}\.\d+\.conv1\.weight", k)))
    widths.append(int(tensors[f"layer{s}.0.conv1.weight"].shape[0]))
  try:
    return ResNetConfig(block=block, depths=tuple(depths), widths=tuple(widths),
                        stem_width=int(tensors["conv1.weight"].shape[0]),
                        num_classes=int(tensors["fc.weight"].shape[0]))
  except ConfigError as e:
    raise CheckpointError(f"checkpoint {source} is not a ResNet glajax builds: {e}") from None


def read_state_dict_file(path: str) -> tuple[ResNetConfig, dict]:
  tensors = read_file(path)
  return config_from_tensors(tensors, path), tensors


# ------------------------------------------------------------------------------- timm folders


def _timm_config(directory: str):
  try:
    config = checkpoints.read_json(directory, "config.json")
  except CheckpointError:
    return None
  return config if "architecture" in config and "model_type" not in config else None


def detect_timm(directory: str) -> bool:
  """Whether ``directory`` holds a timm model (its ``config.json`` names an ``architecture``);
  ``read_timm`` refuses architectures other than torchvision's ResNets, naming them."""
  return os.path.isdir(directory) and _timm_config(directory) is not None


def config_from_timm(config: dict, source: str) -> ResNetConfig:
  """A timm ``config.json`` as a ``ResNetConfig``: its architecture (one of ``ARCHITECTURES``),
  ``num_classes``, ``label_names`` and ``pretrained_cfg``'s input size, mean and std."""
  architecture = config.get("architecture")
  if architecture not in ARCHITECTURES:
    raise bad_argument("checkpoint", f"a timm ResNet ({', '.join(ARCHITECTURES)}: "
                       "torchvision's architecture)",
                       f"architecture {architecture!r} in {source}/config.json", CheckpointError)
  changed = {k: v for k, v in (config.get("model_args") or {}).items()
             if not (k == "num_classes" or (k == "in_chans" and v == 3))}
  if changed or config.get("global_pool", "avg") != "avg":
    raise bad_argument("checkpoint", f"timm's {architecture} as built by default (global_pool "
                       "'avg', no model_args)", f"model_args {changed}, global_pool "
                       f"{config.get('global_pool')!r} in {source}/config.json", CheckpointError)
  pretrained = config.get("pretrained_cfg") or {}
  options = dict(num_classes=int(config.get("num_classes", pretrained.get("num_classes", 1000))))
  if pretrained.get("input_size"):
    options["image_size"] = int(pretrained["input_size"][-1])
  for key in ("mean", "std"):
    if pretrained.get(key):
      options[key] = tuple(float(v) for v in pretrained[key])
  names = config.get("label_names")
  if isinstance(names, (list, tuple)) and len(names) == options["num_classes"]:
    options["labels"] = tuple(map(str, names))
  try:
    return ResNetConfig.preset(architecture, **options)
  except ConfigError as e:
    raise CheckpointError(f"checkpoint {source} has a config glajax cannot build: {e}") from None


def read_timm(directory: str) -> tuple[ResNetConfig, dict]:
  config = config_from_timm(checkpoints.read_json(directory, "config.json"), directory)
  return config, checkpoints.read_tensors(directory, TIMM_WEIGHTS)


def timm_directory(path_or_hub_id) -> str:
  """The local folder of a timm checkpoint: as is, or its hub snapshot (``model.safetensors``,
  else ``pytorch_model.bin``)."""
  return checkpoints.snapshot(path_or_hub_id, TIMM_PATTERNS, ("pytorch_model.bin",),
                              TIMM_WEIGHTS)

"""transformers-format ResNets (``config.json`` with ``model_type: "resnet"`` + ``model.safetensors``
or ``pytorch_model.bin``: ``ResNetForImageClassification``, e.g. ``microsoft/resnet-50``) <->
glajax ``ResNet``.

transformers names stage ``k`` (0-based) ``resnet.encoder.stages.k`` and a bottleneck's
convolutions ``layer.0``..``layer.2``; glajax keeps torchvision's ``layer{k+1}`` and
``conv1``..``conv3``, so the table spells each stage out (up to ``MAX_STAGES``).
"""
from __future__ import annotations

import os
import re

from glajax.errors import CheckpointError, ConfigError, bad_argument
from glajax.models import checkpoints
from glajax.models.resnet.modeling import IMAGENET_MEAN, IMAGENET_STD, ResNetConfig
from glajax.models.resnet.params_torchvision import BN

MAX_STAGES = 8


def _conv_bn(theirs: str, conv: str, bn: str):
  return ((f"{theirs}.convolution.weight", f"{conv}.kernel", "conv"),
          *((f"{theirs}.normalization.{t}", f"{bn}.{o}", "same") for t, o in BN))


def _stage_rows(k: int):
  theirs, ours = f"resnet.encoder.stages.{k}.layers.{{i}}", f"layer{k + 1}.{{i}}"
  rows = _conv_bn(f"{theirs}.shortcut", f"{ours}.downsample.conv", f"{ours}.downsample.bn")
  for j in range(3):
    rows += _conv_bn(f"{theirs}.layer.{j}", f"{ours}.conv{j + 1}", f"{ours}.bn{j + 1}")
  return rows


TABLE = checkpoints.Table(
    slots={"i": r"\d+"},
    rows=(  # (transformers key, glajax path, transform)
        *_conv_bn("resnet.embedder.embedder", "conv1", "bn1"),
        *(row for k in range(MAX_STAGES) for row in _stage_rows(k)),
        ("classifier.1.weight", "fc.kernel", "linear"),
        ("classifier.1.bias", "fc.bias", "same"),
    ),
    skipped=re.compile(r".*num_batches_tracked$"),
)
DESCRIPTION = "transformers (config.json with model_type 'resnet' + model.safetensors or .bin)"
HUB_PATTERNS = ("*.json", "*.safetensors")
CHECKPOINT_FILES = (r"config\.json|preprocessor_config\.json|model(-\d+-of-\d+)?\.safetensors"
                    r"|model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin"
                    r"|pytorch_model\.bin\.index\.json")
_DEFAULT_LABEL = re.compile(r"LABEL_\d+$")


def detect(directory: str) -> bool:
  """Whether ``directory`` holds a transformers ResNet (``config.json``: ``model_type``
  "resnet")."""
  try:
    return checkpoints.read_json(directory, "config.json").get("model_type") == "resnet"
  except CheckpointError:
    return False


def _labels(config: dict) -> dict[int, str]:
  """transformers' id2label (keys as ints); ``num_labels`` or 2 default labels without one, as
  ``PretrainedConfig`` does."""
  if config.get("id2label"):
    return {int(k): str(v) for k, v in config["id2label"].items()}
  return {i: f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))}


def config_from_hf(config: dict, processor: dict | None = None,
                   source: str = "config") -> ResNetConfig:
  """A transformers ``ResNetConfig`` dict (and its ``preprocessor_config.json``, for the image
  size, mean and std) as a glajax ``ResNetConfig``; keys it leaves out take transformers'
  defaults."""
  if config.get("model_type") != "resnet":
    raise bad_argument("config", "a transformers ResNet config (model_type 'resnet')",
                       f"model_type {config.get('model_type')!r} in {source}", ConfigError)
  unsupported = {k: config.get(k) for k, ok in (("hidden_act", "relu"), ("num_channels", 3),
                                                ("downsample_in_first_stage", False))
                 if config.get(k, ok) != ok}
  if unsupported:
    raise bad_argument("config", "ReLU, 3 input channels and no stride in the first stage "
                       "(torchvision's ResNet)", f"{unsupported} in {source}", ConfigError)
  block = config.get("layer_type", "bottleneck")
  hidden = list(config.get("hidden_sizes", (256, 512, 1024, 2048)))
  expansion = 4 if block == "bottleneck" else 1
  if block not in ("basic", "bottleneck") or any(h % expansion for h in hidden):
    raise bad_argument("config", "layer_type 'basic', or 'bottleneck' with hidden_sizes "
                       "divisible by 4", f"{block!r} with {hidden} in {source}", ConfigError)
  labels = _labels(config)
  if sorted(labels) != list(range(len(labels))):
    raise bad_argument("config", "id2label over 0..C-1", f"ids {sorted(labels)[:10]} in {source}",
                       ConfigError)
  names = tuple(labels[i] for i in range(len(labels)))
  processor = processor or {}
  size = processor.get("crop_size") or processor.get("size") or 224
  size = size if isinstance(size, int) else size.get("height", size.get("shortest_edge", 224))
  return ResNetConfig(
      block=block, depths=tuple(config.get("depths", (3, 4, 6, 3))),
      widths=tuple(h // expansion for h in hidden), stem_width=config.get("embedding_size", 64),
      num_classes=len(names), downsample_in_bottleneck=bool(
          config.get("downsample_in_bottleneck", False)),
      labels=None if all(_DEFAULT_LABEL.match(n) for n in names) else names,
      image_size=int(size), mean=tuple(processor.get("image_mean", IMAGENET_MEAN)),
      std=tuple(processor.get("image_std", IMAGENET_STD)))


def config_to_hf(cfg: ResNetConfig, labels=None) -> dict:
  """A transformers ``config.json`` of ``ResNetForImageClassification`` for ``cfg``, its
  id2label from ``labels`` (else the config's own names, else transformers' LABEL_i)."""
  names = [str(n) for n in (labels or cfg.labels or
                            [f"LABEL_{i}" for i in range(cfg.num_classes)])]
  return {
      "architectures": ["ResNetForImageClassification"], "model_type": "resnet",
      "num_channels": 3, "embedding_size": cfg.stem_width,
      "hidden_sizes": [w * cfg.expansion for w in cfg.widths], "depths": list(cfg.depths),
      "layer_type": cfg.block, "hidden_act": "relu", "downsample_in_first_stage": False,
      "downsample_in_bottleneck": cfg.downsample_in_bottleneck, "dtype": "float32",
      "id2label": {str(i): n for i, n in enumerate(names)},
      "label2id": {n: i for i, n in enumerate(names)},
  }


def read(directory: str) -> tuple[ResNetConfig, dict]:
  """(config, tensors) of a transformers ResNet directory."""
  config = checkpoints.read_json(directory, "config.json")
  processor = (checkpoints.read_json(directory, "preprocessor_config.json")
               if os.path.isfile(os.path.join(directory, "preprocessor_config.json")) else None)
  try:
    cfg = config_from_hf(config, processor, f"{directory}/config.json")
  except ConfigError as e:
    raise CheckpointError(f"checkpoint {directory} is not a ResNet glajax builds: {e}") from None
  return cfg, checkpoints.read_tensors(directory)


def hub_directory(path_or_hub_id) -> str:
  """The local directory of a transformers ResNet: as is, or its hub snapshot (with its
  PyTorch weights when the repo has no safetensors)."""
  return checkpoints.snapshot(path_or_hub_id, HUB_PATTERNS, ("pytorch_model*.bin",))

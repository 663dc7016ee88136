"""OpenAI's original CLIP checkpoints: the TorchScript archives (``RN50.pt`` ...
``ViT-L-14@336px.pt``) that the ``clip`` package downloads, or a ``torch.save``-d state dict of
the same model (as ``clip.load``'s fallback reads). Reading them needs torch (this format only).

The state dict has open_clip's tensor names (``params_open_clip``'s tables) and no config: the
architecture is read from the tensor shapes as openai/CLIP ``clip/model.py`` ``build_model``
does (ViT when ``visual.proj`` is there; heads = width / 64, a ResNet's attention pool
32·width / 64), with QuickGELU in both towers, as every OpenAI checkpoint was trained.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np

from glajax.errors import CheckpointError, bad_argument
from glajax.models.clip import params_open_clip
from glajax.models.clip.modeling import CLIPConfig

SUFFIXES = (".pt",)
DESCRIPTION = "OpenAI's TorchScript .pt file (what the clip package downloads; needs torch)"
HUB_PATTERNS = ()   # OpenAI's files are not on the hub: a local file path
table = params_open_clip.table


def detect(path: str) -> bool:
  """Whether ``path`` is a ``.pt`` file (what it holds is checked by :func:`read`)."""
  return os.path.isfile(path) and path.endswith(SUFFIXES)


def read(path: str) -> tuple[CLIPConfig, dict]:
  """(config, tensors) of an OpenAI ``.pt``: its state dict as float32 NumPy (OpenAI's fp16
  weights widened exactly), fused attention split, and the architecture it implies."""
  state = _state_dict(path)
  tensors = {k: v.detach().float().numpy() for k, v in state.items() if v.is_floating_point()}
  config = params_open_clip.config_from_open_clip(model_cfg(tensors, path), path)
  return config, params_open_clip.split_fused(tensors)


def _state_dict(path: str) -> dict:
  try:
    import torch  # noqa  (torch: optional, OpenAI's .pt only)
  except ImportError:
    raise bad_argument("checkpoint", "torch to read OpenAI's TorchScript .pt (pip install torch; "
                       "the CPU build is enough), or the same weights in open_clip's format "
                       "(e.g. the hub's timm/resnet50_clip.openai), which needs no torch",
                       f"{path} and no torch installed", CheckpointError) from None
  try:
    with warnings.catch_warnings():  # torch deprecates TorchScript, the format of OpenAI's files
      warnings.simplefilter("ignore", DeprecationWarning)
      return torch.jit.load(path, map_location="cpu").state_dict()
  except RuntimeError:  # not a TorchScript archive: a torch.save-d state dict, as clip.load reads
    pass
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise bad_argument("checkpoint", "an OpenAI CLIP .pt (a TorchScript archive or a state dict)",
                       f"{path} ({type(e).__name__}: {str(e)[:300]})", CheckpointError) from None
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise bad_argument("checkpoint", "an OpenAI CLIP .pt (a TorchScript archive or a state dict "
                       "of tensors)", f"{path} holding a {type(state).__name__}", CheckpointError)
  return state


def model_cfg(tensors: dict[str, np.ndarray], source: str) -> dict:
  """open_clip's ``model_cfg`` of an OpenAI state dict, from its shapes (``build_model``)."""
  needed = ["visual.conv1.weight", "text_projection", "positional_embedding",
            "token_embedding.weight", "ln_final.weight"]
  vit = "visual.proj" in tensors
  needed += (["visual.positional_embedding"] if vit else
             ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"])
  missing = [k for k in needed if k not in tensors]
  if missing:
    raise bad_argument("checkpoint", "an OpenAI CLIP state dict (clip/model.py's names)",
                       f"{source} without {', '.join(missing)} (its keys: "
                       f"{', '.join(sorted(tensors)[:12])}, ...)", CheckpointError)
  count = lambda pattern: len({m.group(1) for k in tensors if (m := re.match(pattern, k))})
  text_width = tensors["ln_final.weight"].shape[0]
  text = {"context_length": tensors["positional_embedding"].shape[0],
          "vocab_size": tensors["token_embedding.weight"].shape[0], "width": text_width,
          "heads": text_width // 64,
          "layers": count(r"transformer\.resblocks\.(\d+)\.")}
  if vit:
    width, patch = tensors["visual.conv1.weight"].shape[0], tensors["visual.conv1.weight"].shape[-1]
    grid = round((tensors["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = {"layers": count(r"visual\.transformer\.resblocks\.(\d+)\."), "width": width,
              "patch_size": patch, "image_size": patch * grid}
  else:
    grid = round((tensors["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = {"layers": [count(rf"visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4)],
              "width": tensors["visual.layer1.0.conv1.weight"].shape[0], "image_size": grid * 32}
  return {"embed_dim": tensors["text_projection"].shape[1], "quick_gelu": True,
          "vision_cfg": vision, "text_cfg": text}

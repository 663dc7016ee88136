"""open_clip 3.3.0's PyTorch CLIP, the reference of the open_clip and OpenAI formats, for tests.

open_clip's ``__init__`` imports its whole package and ``utils.py`` imports torchvision (for
``FrozenBatchNorm2d``, used only by ``freeze_batch_norm_2d``), whose PyPI wheel breaks beside the
CPU torch, so torchvision is not installed. :func:`load` registers a bare ``open_clip`` package
(its ``__path__`` the installed folder, its ``__init__`` not run), executes ``utils.py`` with that
one import replaced by ``FrozenBatchNorm2d = None``, and imports ``open_clip.model``, whose
``CLIP``, ``ModifiedResNet`` and ``VisionTransformer`` are then the installed code itself.
"""
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types

import pytest

VERSION = "3.3.0"
_TORCHVISION_IMPORT = "from torchvision.ops.misc import FrozenBatchNorm2d"


def load():
  """``open_clip.model`` (skips the test when torch or open_clip_torch 3.3.0 is missing)."""
  pytest.importorskip("torch")
  if "open_clip.model" in sys.modules:
    return sys.modules["open_clip.model"]
  spec = importlib.util.find_spec("open_clip")
  try:
    version = importlib.metadata.version("open_clip_torch")
  except importlib.metadata.PackageNotFoundError:
    version = None
  if spec is None or version != VERSION:
    pytest.skip(f"open_clip_torch=={VERSION} is not installed (found {version}; "
                "scripts/setup_env.sh installs it with --no-deps)")
  folder = spec.submodule_search_locations[0]
  package = types.ModuleType("open_clip")
  package.__path__ = [folder]
  sys.modules["open_clip"] = package
  path = os.path.join(folder, "utils.py")
  with open(path) as f:
    source = f.read()
  assert _TORCHVISION_IMPORT in source, "open_clip's utils.py changed: update this helper"
  utils = types.ModuleType("open_clip.utils")
  utils.__file__, utils.__package__ = path, "open_clip"
  sys.modules["open_clip.utils"] = utils
  exec(compile(source.replace(_TORCHVISION_IMPORT, "FrozenBatchNorm2d = None"), path, "exec"),
       utils.__dict__)
  return importlib.import_module("open_clip.model")

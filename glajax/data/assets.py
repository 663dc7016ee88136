"""The facts glajax ships as package assets (``glajax/data/assets/``), read once."""
from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def load_json(filename: str):
  """The parsed content of ``assets/<filename>`` (cached: treat it as read-only)."""
  return json.loads(resources.files("glajax.data").joinpath("assets", filename).read_text())


@functools.cache
def objectnet_folder_labels() -> dict[str, int]:
  """ObjectNet image folder -> class index, for the folders of the 113 ImageNet-mapped classes."""
  labels = {name: i for i, name in enumerate(load_json("objectnet_classnames.json"))}
  return {folder: labels[name]
          for folder, name in load_json("objectnet_folder_to_label.json").items()
          if name in labels}

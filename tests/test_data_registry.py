"""Dataset registry: class order vs TFDS's labels, label maps, logits transforms, errors."""
import json
import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from glajax import DatasetError
from glajax.data import registry

_CLIP_DATASETS = ["cifar10", "cifar100", "caltech101", "oxford_iiit_pet", "cars196",
                  "oxford_flowers102", "food101", "sun397", "dtd", "eurosat"]
# CLIP's curated names that differ from TFDS's label names beyond spelling.
_RENAMED = {"background_google": "background", "faces": "off-center face",
            "faces_easy": "centered face", "car_side": "side of a car",
            "cougar_body": "body of a cougar cat", "cougar_face": "face of a cougar cat",
            "crocodile_head": "head of a crocodile", "flamingo_head": "head of a flamingo",
            "snoopy": "snoopy (cartoon beagle)", "yin_yang": "yin and yang symbol",
            "pink-yellow dahlia?": "pink and yellow dahlia", "ball moss": "air plant",
            "AnnualCrop": "annual crop land", "HerbaceousVegetation": "brushland or shrubland",
            "Highway": "highway or road", "Industrial": "industrial buildings or commercial "
            "buildings", "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
            "Residential": "residential buildings or homes or apartments", "SeaLake": "lake or sea"}



def _transform(name):
  """The evaluation's ImageNet-1k -> dataset logits map of a registry dataset."""
  from glajax import evaluate
  return evaluate.imagenet_logits_transform(registry.get(name).imagenet_classes)

def _key(name):
  return re.sub(r"[^a-z]", "", name.lower()).removesuffix("s")


def test_names_cover_the_issue_and_unknown_names_fail():
  wanted = {"imagenet2012", "imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch",
            "objectnet", *_CLIP_DATASETS, "fgvc_aircraft", "ucf101", "places365",
            "inaturalist2018", "imagenet_lt", "places_lt"}
  assert wanted <= set(registry.names())
  with pytest.raises(DatasetError, match="imagenet_r.*found 'imagenet_q'"):
    registry.get("imagenet_q")
  imagenet = registry.get("imagenet2012")
  assert imagenet.classnames[:2] == ("tench", "goldfish") and len(imagenet.templates) == 80
  assert imagenet.manual_download and imagenet.eval_split == "validation"
  places = registry.get("places365")
  assert places.num_classes == len(places.classnames) == 365
  assert places.classnames[:2] == ("airfield", "airplane cabin")
  assert "apartment building outdoor" in places.classnames


@pytest.mark.parametrize("name", _CLIP_DATASETS)
def test_clip_classnames_follow_tfds_label_order(name):
  """Reference: the TFDS builder's own label names (read from TFDS's code, no data)."""
  info = registry.get(name)
  tfds_names = tfds.builder(info.tfds_name).info.features["label"].names
  assert len(info.classnames) == len(tfds_names) == info.num_classes
  if name.startswith("cifar"):
    return  # TFDS names CIFAR labels "0".."99"; CLIP's order is the label order.
  for stored, ours in zip(tfds_names, info.classnames):
    stored = stored.split("/", 2)[-1] if name == "sun397" else stored
    assert _key(_RENAMED.get(stored, stored)) == _key(ours), (stored, ours)
  assert info.templates and all("{}" in t for t in info.templates)


def test_imagenet_subsets_restrict_logits_and_relabel():
  for name in ("imagenet_r", "imagenet_a"):
    info = registry.get(name)
    indices = json.loads(open(f"glajax/data/assets/{name}_imagenet_indices.json").read())
    assert info.num_classes == len(info.classnames) == 200
    assert info.source_labels == tuple(indices)
    assert info.classnames == tuple(registry.imagenet_classnames()[i] for i in indices)
    logits = np.random.default_rng(0).normal(size=(5, 1000)).astype(np.float32)
    restricted = jax.jit(_transform(name))(logits)
    np.testing.assert_array_equal(restricted, logits[:, indices])
  assert registry.get("imagenet_r").classnames[:2] == ("goldfish", "great white shark")


def test_objectnet_map_and_max_over_mapped_classes():
  groups = registry.objectnet_imagenet_classes()
  names = registry.get("objectnet").classnames
  assert len(groups) == len(names) == 113
  assert sum(map(len, groups)) == 125  # ObjectNet's 113 classes cover 125 ImageNet classes.
  by_name = dict(zip(names, groups))
  # Known ImageNet labels: 409 analog clock, 530 digital clock, 954 banana, 414 backpack.
  assert by_name["Alarm clock"] == (409, 530)
  assert by_name["Banana"] == (954,)
  assert by_name["Backpack"] == (414,)
  logits = np.random.default_rng(1).normal(size=(4, 1000)).astype(np.float32)
  ours = jax.jit(_transform("objectnet"))(logits)
  expected = np.stack([logits[:, list(g)].max(axis=1) for g in groups], axis=1)
  np.testing.assert_array_equal(ours, expected)
  assert registry.get("objectnet").border_crop == 2
  assert _transform("cifar10") is None
  with pytest.raises(ValueError, match=r"indices in \[0, 10\)"):
    _transform("objectnet")(logits[:, :10])


def test_register_adds_a_dataset(monkeypatch):
  monkeypatch.setattr(registry, "_REGISTERED", {})
  info = registry.DatasetInfo("my_shapes", "my_shapes", "train", "test", ("disc", "square"),
                              ("a photo of a {}.",), 2)
  registry.register(info)
  assert registry.get("my_shapes") is info and "my_shapes" in registry.names()
  with pytest.raises(ValueError, match="classnames"):
    registry.register(registry.DatasetInfo("bad", "bad", None, "test", ("a",), ("{}",), 3))
  with pytest.raises(ValueError, match="DatasetInfo"):
    registry.register({"name": "x"})

"""Dataset registry: name -> TFDS name, splits, class names, prompt templates and label maps.

Class names are in the order of the dataset's TFDS labels, taken from CLIP's curated per-dataset
names (``assets/clip_prompts.json``, reordered where TFDS orders its labels differently) or from
OpenAI's curated ImageNet names. ImageNet-R and ImageNet-A are stored by TFDS with ImageNet-1k
labels; the registry maps them to their 200 classes and restricts ImageNet logits to those 200
columns. ObjectNet's 113 classes are scored as the max over the logits of their mapped ImageNet
classes (Barbu et al., NeurIPS 2019; as in WiSE-FT's evaluation).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from glajax.data import assets, builders
from glajax.errors import DatasetError, bad_argument

PHOTO_TEMPLATES = ("a photo of a {}.",)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Everything the pipelines and the zero-shot head need to know about one dataset.

  Attributes:
    name: the registry name, e.g. ``"imagenet_r"``.
    tfds_name: TFDS name with config (``"eurosat/rgb"``); for datasets built by glajax's own
      builders (``source`` set), the name of the prepared TFDS dataset under ``data_dir``.
    train_split: TFDS split to fine-tune on, or None for test-only sets.
    eval_split: TFDS split to evaluate on.
    classnames: class names cleaned for prompts, in label order; empty when the names come with
      the data (Office-Home's folders): see ``pipeline.class_names``.
    templates: prompt templates with one ``{}``.
    num_classes: number of classes the labels range over.
    source_labels: the stored label of each class when the source uses a larger label space
      (ImageNet-R/A are stored with ImageNet-1k labels) or another order (iNaturalist-2018:
      category ids, classes ordered by species name); the pipeline maps them to 0..C-1.
    imagenet_classes: for each class, the ImageNet-1k classes whose max logit is its logit
      (ImageNet-R/A: one each; ObjectNet: one or more). None when logits are the dataset's own.
    border_crop: pixels cropped from every side before evaluation preprocessing (ObjectNet: 2).
    manual_download: whether preparing the dataset needs a manual-download directory.
    source: for glajax's own builders, the ``builders.LocalSource`` that reads the raw files.
    image_key, label_key: feature names in the TFDS examples.
    order_key: a text feature ending in each example's position in the dataset's own files
      (TFDS's CIFAR ``id``, "train_01234"), which TFDS stores shuffled: selections that the
      official code draws by position (the CIFAR-LT subset) read it (``pipeline.read_order``).
  """
  name: str
  tfds_name: str
  train_split: str | None
  eval_split: str
  classnames: tuple[str, ...]
  templates: tuple[str, ...]
  num_classes: int
  source_labels: tuple[int, ...] | None = None
  imagenet_classes: tuple[tuple[int, ...], ...] | None = None
  border_crop: int = 0
  manual_download: bool = False
  source: object | None = None
  image_key: str = "image"
  label_key: str = "label"
  order_key: str | None = None


_REGISTERED: dict[str, DatasetInfo] = {}


_asset = assets.load_json


@functools.cache
def _clip_prompts() -> dict:
  return _asset("clip_prompts.json")


def _clip(key: str, order: Callable[[list[str]], list[str]] = list):
  entry = _clip_prompts()[key]
  return tuple(order(list(entry["classes"]))), tuple(entry["templates"])


def _swap(a: str, b: str) -> Callable[[list[str]], list[str]]:
  """Swaps two of CLIP's names that TFDS orders the other way round."""
  def order(names):
    i, j = names.index(a), names.index(b)
    names[i], names[j] = b, a
    return names
  return order


def _caltech101_order(names: list[str]) -> list[str]:
  """CLIP lists Caltech-101 in ASCII order of its folders (five capitalised ones first: background,
  faces, faces_easy, leopards, motorbikes); TFDS sorts them lower-cased, at these positions."""
  rest = names[5:]
  for tfds_index, name in zip((4, 37, 38, 57, 66), names[:5]):
    rest.insert(tfds_index, name)
  return rest


def _eurosat_order(names: list[str]) -> list[str]:
  """CLIP's EuroSAT order -> TFDS's (AnnualCrop, Forest, HerbaceousVegetation, Highway,
  Industrial, Pasture, PermanentCrop, Residential, River, SeaLake)."""
  return [names[i] for i in (7, 0, 6, 9, 8, 4, 1, 2, 3, 5)]


@functools.cache
def imagenet_classnames() -> tuple[str, ...]:
  """OpenAI's curated names of the 1000 ImageNet classes, in label order."""
  return tuple(_asset("imagenet_classnames.json"))


@functools.cache
def imagenet_templates() -> tuple[str, ...]:
  """CLIP's 80 ImageNet prompt templates."""
  return tuple(_asset("openai_imagenet_templates.json"))


@functools.cache
def _imagenet_lemmas() -> dict[str, int]:
  """ImageNet-1k WordNet lemma strings ("tench, Tinca tinca") -> label, from TFDS's copy."""
  try:
    from tensorflow_datasets.datasets.siscore import labels  # noqa  (TFDS: loaded on demand)
  except ImportError as e:
    raise DatasetError("ObjectNet's ImageNet map needs ImageNet's lemma names from "
                       "tensorflow_datasets.datasets.siscore (tensorflow-datasets >= 4.9)") from e
  return {lemma: i for i, lemma in enumerate(labels.IMAGENET_LABELS_LIST)}


@functools.cache
def objectnet_imagenet_classes() -> tuple[tuple[int, ...], ...]:
  """For each ObjectNet class (``objectnet_classnames.json`` order), its ImageNet-1k labels.

  ObjectNet's ``objectnet_to_imagenet_1k.json`` names ImageNet classes by their lemma strings,
  several joined by "; "; 113 classes map to 125 ImageNet classes.
  """
  mapping = _asset("objectnet_to_imagenet_1k.json")
  lemmas = _imagenet_lemmas()
  return tuple(tuple(sorted(lemmas[lemma] for lemma in mapping[name].split("; ")))
               for name in _asset("objectnet_classnames.json"))


objectnet_folder_labels = assets.objectnet_folder_labels


def _imagenet_subset(name: str, tfds_name: str, indices_file: str) -> DatasetInfo:
  indices = tuple(_asset(indices_file))
  return DatasetInfo(name=name, tfds_name=tfds_name, train_split=None, eval_split="test",
                     classnames=tuple(imagenet_classnames()[i] for i in indices),
                     templates=imagenet_templates(), num_classes=len(indices),
                     source_labels=indices, imagenet_classes=tuple((i,) for i in indices))


def clean_classname(name: str) -> str:
  """A stored label name made fit for a prompt: "apartment_building/outdoor" ->
  "apartment building outdoor"."""
  return " ".join(name.replace("_", " ").replace("/", " ").split())


def _tfds_classnames(tfds_name: str) -> tuple[str, ...]:
  """Cleaned class names of a TFDS builder's label feature (reads the builder's code only)."""
  import tensorflow_datasets as tfds  # noqa  (TFDS: loaded on demand)
  return tuple(map(clean_classname, tfds.builder(tfds_name).info.features["label"].names))


def _clip_dataset(name, tfds_name, key, train="train", test="test", order=list,
                  order_key=None) -> DatasetInfo:
  classnames, templates = _clip(key, order)
  return DatasetInfo(name=name, tfds_name=tfds_name, train_split=train, eval_split=test,
                     classnames=classnames, templates=templates, num_classes=len(classnames),
                     order_key=order_key)


@functools.cache
def _builtin() -> dict[str, Callable[[], DatasetInfo]]:
  """Factories of the built-in entries (built on first use: some read TFDS builder code)."""
  imagenet = dict(classnames=imagenet_classnames(), templates=imagenet_templates(),
                  num_classes=1000)
  objectnet_names = tuple(_asset("objectnet_classnames.json"))
  entries = {
      "imagenet2012": lambda: DatasetInfo("imagenet2012", "imagenet2012", "train", "validation",
                                          manual_download=True, **imagenet),
      "imagenet_v2": lambda: DatasetInfo("imagenet_v2", "imagenet_v2/matched-frequency", None,
                                         "test", **imagenet),
      "imagenet_sketch": lambda: DatasetInfo("imagenet_sketch", "imagenet_sketch", None, "test",
                                             **imagenet),
      "imagenet_r": lambda: _imagenet_subset("imagenet_r", "imagenet_r",
                                             "imagenet_r_imagenet_indices.json"),
      "imagenet_a": lambda: _imagenet_subset("imagenet_a", "imagenet_a",
                                             "imagenet_a_imagenet_indices.json"),
      "objectnet": lambda: DatasetInfo(
          "objectnet", builders.OBJECTNET.tfds_name, None, "test", classnames=objectnet_names,
          templates=imagenet_templates(), num_classes=len(objectnet_names),
          imagenet_classes=objectnet_imagenet_classes(), border_crop=2, manual_download=True,
          source=builders.OBJECTNET),
      "imagenet_lt": lambda: DatasetInfo("imagenet_lt", builders.IMAGENET_LT.tfds_name, "train",
                                         "test", manual_download=True,
                                         source=builders.IMAGENET_LT, **imagenet),
      "cifar10": lambda: _clip_dataset("cifar10", "cifar10", "CIFAR10", order_key="id"),
      "cifar100": lambda: _clip_dataset("cifar100", "cifar100", "CIFAR100", order_key="id"),
      "caltech101": lambda: _clip_dataset("caltech101", "caltech101", "Caltech101",
                                          order=_caltech101_order),
      "oxford_iiit_pet": lambda: _clip_dataset(
          "oxford_iiit_pet", "oxford_iiit_pet", "OxfordPets",
          order=lambda names: sorted(names, key=str.lower)),
      "cars196": lambda: _clip_dataset("cars196", "cars196", "StanfordCars"),
      "oxford_flowers102": lambda: _clip_dataset("oxford_flowers102", "oxford_flowers102",
                                                 "Flowers102"),
      "food101": lambda: _clip_dataset("food101", "food101", "Food101", test="validation",
                                       order=_swap("cheese plate", "cheesecake")),
      "sun397": lambda: _clip_dataset("sun397", "sun397/tfds", "SUN397",
                                      order=_swap("jail cell", "jail indoor")),
      "dtd": lambda: _clip_dataset("dtd", "dtd", "DescribableTextures"),
      # TFDS serves EuroSAT as one 27k-image split; the last 20 % is held out for evaluation.
      "eurosat": lambda: _clip_dataset("eurosat", "eurosat/rgb", "EuroSAT", train="train[:80%]",
                                       test="train[80%:]", order=_eurosat_order),
      "fgvc_aircraft": lambda: _local_clip("fgvc_aircraft", builders.FGVC_AIRCRAFT,
                                           "FGVCAircraft"),
      "ucf101": lambda: _local_clip("ucf101", builders.UCF101, "UCF101"),
      "places365": lambda: _places("places365", "places365_small", "train", "validation"),
      "places_lt": _places_lt,
      "inaturalist2018": _inaturalist2018,
  }
  for world_config in ("default", "quick", "tiny"):
    entries["demo_shapes" + ("" if world_config == "default" else f"_{world_config}")] = (
        functools.partial(_demo_world, world_config))
  for domain, source in builders.OFFICE_HOME.items():
    entries[f"office_home_{domain}"] = functools.partial(
        DatasetInfo, f"office_home_{domain}", source.tfds_name, "train", "train", classnames=(),
        templates=PHOTO_TEMPLATES, num_classes=65, manual_download=True, source=source)
  return entries


def _demo_world(config: str) -> DatasetInfo:
  """The demo's procedural world (``glajax.data.world``): photo train split, photo test split;
  the other splits (pretrain_<i>, train_lt, validation, test_<domain>) are read by name."""
  from glajax.data import world  # noqa  (keeps TFDS off the registry)
  return DatasetInfo(world.dataset_name(config), f"demo_shapes/{config}", "train", "test_photo",
                     classnames=world.CLASSNAMES, templates=world.TEMPLATES,
                     num_classes=world.NUM_CLASSES)


def _local_clip(name, source, key) -> DatasetInfo:
  classnames, templates = _clip(key)
  return DatasetInfo(name, source.tfds_name, "train", "test", classnames=classnames,
                     templates=templates, num_classes=len(classnames), manual_download=True,
                     source=source)


def _places(name, tfds_name, train, test) -> DatasetInfo:
  classnames = _tfds_classnames("places365_small")
  return DatasetInfo(name, tfds_name, train, test, classnames=classnames,
                     templates=PHOTO_TEMPLATES, num_classes=len(classnames))


def _places_lt() -> DatasetInfo:
  """Places-LT with the backdoor paper's class names (``places_lt_classnames.json``): "_" read
  as a space, "-" kept, as its ``trainer.py`` ``get_tokenized_prompts`` does."""
  names = tuple(name.replace("_", " ") for name in _asset("places_lt_classnames.json")["names"])
  return DatasetInfo("places_lt", builders.PLACES_LT.tfds_name, "train", "test",
                     classnames=names, templates=PHOTO_TEMPLATES, num_classes=len(names),
                     manual_download=True, source=builders.PLACES_LT)


def sorted_names(names) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(class names, stored label of each class) for classes ordered by name, as the backdoor
  paper's ``datasets/inat2018.py`` ``read_category_info`` orders iNaturalist-2018: class c is
  the c-th of the sorted names (``cname2lab``), so stored label i (the index of ``names[i]``)
  becomes the rank of its name."""
  names = list(names)
  if len(set(names)) != len(names):
    raise bad_argument("names", "distinct class names", f"{len(names) - len(set(names))} repeated",
                       DatasetError)
  order = sorted(range(len(names)), key=names.__getitem__)
  return tuple(names[i] for i in order), tuple(order)


def _inaturalist2018() -> DatasetInfo:
  """iNaturalist-2018 with the species names of ``categories.json``
  (``inaturalist2018_species.json``, category-id order), classes ordered by name."""
  classnames, stored = sorted_names(_asset("inaturalist2018_species.json")["names"])
  return DatasetInfo("inaturalist2018", builders.INATURALIST_2018.tfds_name, "train",
                     "validation", classnames=classnames, templates=PHOTO_TEMPLATES,
                     num_classes=len(classnames), source_labels=stored, manual_download=True,
                     source=builders.INATURALIST_2018)


TEMPLATE_SOURCES = ("clip", "gla")


def _gla_fewshot(name: str) -> dict:
  entries = _asset("gla_fewshot_prompts.json")["datasets"]
  if name not in entries:
    raise bad_argument("dataset", f"one of GLA's few-shot datasets ({', '.join(entries)})",
                       repr(name), DatasetError)
  return entries[name]


def templates(name: str, source: str = "clip") -> tuple[str, ...]:
  """Zero-shot prompt templates of dataset ``name``: ``"clip"``, its registry entry's (CLIP's
  per-dataset prompts); ``"gla"``, GLA.FS's ``ENSEMBLE_TEMPLATES[dataset]`` (``trainers/util.py``,
  ``gla_fewshot_prompts.json``; Caltech101, ImageNet and SUN397 the 80 ImageNet templates)."""
  if source not in TEMPLATE_SOURCES:
    raise bad_argument("templates", f"one of {', '.join(TEMPLATE_SOURCES)}", repr(source))
  if source == "clip":
    return get(name).templates
  ensemble = _gla_fewshot(name)["ensemble"]
  return imagenet_templates() if ensemble == "IMAGENET_TEMPLATES" else tuple(ensemble)


def gla_init_template(name: str) -> str:
  """GLA.FS's initial prompt of dataset ``name`` as a template: ``CUSTOM_TEMPLATES[dataset]``
  read as its ``PromptLearner`` does (``ctx_init`` = the template without " {}.", prompt =
  ctx_init + " " + class name + "."). FGVC-Aircraft's "a type of aircraft, a photo of a {}"
  has no " {}." to remove, so the official prompt keeps a literal "{}" before the name; glajax
  follows the evident intent, "a type of aircraft, a photo of a {}."."""
  context = _gla_fewshot(name)["custom"].replace(" {}.", "").replace(" {}", "").replace("_", " ")
  return context + " {}."


def folder_dataset(name: str, root: str | os.PathLike, splits: tuple[str, ...] | None = None, *,
                   templates: tuple[str, ...] = PHOTO_TEMPLATES) -> DatasetInfo:
  """A ``DatasetInfo`` for the class-subfolder tree at ``root``, for ``register``.

  ``splits``: e.g. ("train", "test") for ``<root>/train/<class>/...`` (the first is the train
  split, the last the eval split); None for a single ``train`` split of ``<root>/<class>/...``.
  Class names are the sorted folder names, cleaned for prompts.
  """
  root = Path(root).expanduser()
  source = dataclasses.replace(builders.folder_source(name, "", splits), root=root)
  classnames = tuple(map(clean_classname, source.classes(root)))
  return DatasetInfo(name, source.tfds_name, source.splits[0], source.splits[-1],
                     classnames=classnames, templates=tuple(templates),
                     num_classes=len(classnames), manual_download=True, source=source)


LOCAL_PREFIXES = ("folder:", "csv:")


def is_local(name) -> bool:
  """Whether ``name`` names a dataset by its path: ``folder:<dir>`` (class subfolders, or
  ``train/`` and ``test/`` (or ``val/``) folders of class subfolders) or ``csv:<file>``
  (``path,label[,split]`` rows). :func:`get` builds their ``DatasetInfo`` from the files,
  registering nothing."""
  return isinstance(name, str) and name.startswith(LOCAL_PREFIXES)


def local_name(path: str | os.PathLike) -> str:
  """The registry name of a folder or CSV file: ``folder:<absolute dir>`` or
  ``csv:<absolute file>`` (a path ending in ``.csv``)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  return ("csv:" if path.lower().endswith(".csv") else "folder:") + path


def _local_digest(kind: str, path: Path) -> str:
  """Identifies the data, not just the path: a changed folder or CSV is prepared anew."""
  digest = hashlib.sha256(str(path).encode())
  if kind == "csv":
    digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
  broken = []
  for directory, folders, files in sorted(os.walk(path)):
    folders.sort()
    for name in sorted(files):
      file = Path(directory, name)
      try:
        digest.update(f"{file.relative_to(path)}:{file.stat().st_size};".encode())
      except OSError as e:  # a dangling symlink, a symlink loop, an unreadable entry
        broken.append(f"{file} ({e.strerror or type(e).__name__})")
  if broken:
    raise bad_argument(str(path), "files that can be read (no dangling or looping symlinks)",
                       f"{len(broken)} that cannot: {'; '.join(broken[:10])}", DatasetError)
  return digest.hexdigest()[:12]


def _check_local(source, path: Path) -> None:
  """A folder's or CSV's classes and splits, before anything is prepared: at least two classes,
  names that stay distinct as prompts, images in every class of the training split, a training
  split, and no image in two splits."""
  names = source.classes(source.root)
  if len(names) < 2:
    raise bad_argument(str(path), "at least two classes (class subfolders, or CSV labels)",
                       f"{len(names)}: {list(names)}", DatasetError)
  prompts = {}
  for name in names:
    prompts.setdefault(clean_classname(name).lower(), []).append(name)
  same = [group for group in prompts.values() if len(group) > 1]
  if same:
    raise bad_argument(str(path), "class names that differ as prompts (case and '_' vs ' ' "
                       "do not count)", f"{len(same)} groups read as one class, e.g. "
                       f"{same[:3]}", DatasetError)
  if source.splits[0] != "train":
    raise bad_argument(str(path), "rows of the train split (a CSV's third column: train, val, "
                       "validation or test; none means train)",
                       f"only {', '.join(source.splits)} rows", DatasetError)
  examples = {split: source.examples(source.root, split) for split in source.splits}
  counts = np.bincount([y for _, y in examples["train"]], minlength=len(names))
  empty = [names[c] for c in np.flatnonzero(counts == 0)]
  if empty:
    raise bad_argument(str(path), f"images ({', '.join(builders.IMAGE_SUFFIXES)}) in every "
                       "class of the train split", f"none for {len(empty)} classes: "
                       f"{empty[:10]}", DatasetError)
  seen = {}
  for split, pairs in examples.items():
    for file, _ in pairs:
      seen.setdefault(os.path.normpath(source.root / file), []).append(split)
  shared = sorted(f for f, splits in seen.items() if len(set(splits)) > 1)
  if shared:
    raise bad_argument(str(path), "every image in one split only", f"{len(shared)} in several "
                       f"splits, e.g. {shared[:3]}", DatasetError)


def local_class_counts(name: str, split: str) -> np.ndarray:
  """(C,) images of each class in ``split`` of a folder or CSV dataset (:func:`is_local`)."""
  info = get(name)
  pairs = info.source.examples(info.source.root, split)
  return np.bincount([y for _, y in pairs], minlength=info.num_classes)


@functools.cache
def _local_info(name: str) -> DatasetInfo:
  kind, _, raw = name.partition(":")
  path = Path(raw).expanduser()
  if not (path.is_file() if kind == "csv" else path.is_dir()):
    raise bad_argument("name", f"{kind}:<an existing {'CSV file' if kind == 'csv' else 'folder'}>",
                       f"{name!r} (no such {'file' if kind == 'csv' else 'directory'})",
                       DatasetError)
  safe = "".join(c if c.isalnum() else "_" for c in path.stem)[:40]
  source_name = f"{kind}_{safe}_{_local_digest(kind, path)}"
  if kind == "folder":
    info = folder_dataset(source_name, path, builders.folder_splits(path))
  else:
    source = builders.csv_source(source_name, path)
    classnames = tuple(map(clean_classname, source.classes(source.root)))
    info = DatasetInfo(source_name, source.tfds_name, source.splits[0], source.splits[-1],
                       classnames=classnames, templates=PHOTO_TEMPLATES,
                       num_classes=len(classnames), manual_download=True, source=source)
  _check_local(info.source, path)
  return dataclasses.replace(info, name=name)


def names() -> tuple[str, ...]:
  """Every known dataset name, built-in and registered, sorted."""
  return tuple(sorted({*_builtin(), *_REGISTERED}))


def register(info: DatasetInfo) -> None:
  """Adds (or replaces) a dataset, e.g. a procedurally generated TFDS dataset or a folder."""
  if not isinstance(info, DatasetInfo):
    raise bad_argument("info", "a glajax.data.registry.DatasetInfo", type(info).__name__)
  if len(info.classnames) not in (0, info.num_classes):
    raise bad_argument("info.classnames", f"{info.num_classes} names (num_classes) or none",
                       f"{len(info.classnames)} names")
  _REGISTERED[info.name] = info


@functools.cache
def _builtin_info(name: str) -> DatasetInfo:
  return _builtin()[name]()


def get(name: str) -> DatasetInfo:
  """The ``DatasetInfo`` of ``name`` (a registry name, or ``folder:<dir>`` / ``csv:<file>``:
  :func:`is_local`); unknown names raise a DatasetError listing the known ones."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if is_local(name):
    return _local_info(name)
  if name not in _builtin():
    raise bad_argument("name", f"one of {', '.join(names())}", repr(name), DatasetError)
  return _builtin_info(name)

"""glajax's own TFDS builders, for datasets TFDS does not serve well.

Each dataset is a :class:`LocalSource`: how to list ``(relative path, label)`` pairs and class
names from a local folder (the "manual directory"). :func:`prepare` turns it into an ordinary TFDS
dataset (``<data_dir>/glajax_local/<name>/1.0.0``, TFRecords + ``dataset_info.json``) that
``tfds.builder_from_directory`` reads. Every image is decoded once while preparing; a split list
naming missing files or an undecodable image raises a DatasetError before anything is written.

Expected layouts (``manual_dir`` is the folder named below):

- ObjectNet: ``objectnet-1.0/`` with ``images/<folder>/<file>`` (ObjectNet's 313 folders; the
  ones of the 113 ImageNet-mapped classes are read, labels in ``objectnet_classnames.json`` order).
- FGVC-Aircraft (full resolution): ``fgvc-aircraft-2013b/`` with ``data/variants.txt``,
  ``data/images_variant_{train,val,trainval,test}.txt`` and ``data/images/<id>.jpg``.
- UCF101 middle frames (as CoOp distributes them): ``UCF-101-midframes/<Class>/<video>.jpg`` and
  ``ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt`` side by side in ``manual_dir``.
- ImageNet-LT / Places-LT / iNaturalist-2018: the published split lists
  (``ImageNet_LT_{train,val,test}.txt``, ``Places_LT_{train,val,test}.txt``,
  ``iNaturalist18_{train,val}.txt``; lines ``relative/path label``) in ``manual_dir``, image
  paths relative to ``manual_dir``.
- Office-Home: ``OfficeHomeDataset_10072016/`` with ``Art``, ``Clipart``, ``Product``,
  ``Real World`` class folders.
- Any folder of class subfolders: :func:`folder_source` (``registry.folder_dataset``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Callable

from glajax.data import assets
from glajax.data.subsample import read_split_list
from glajax.errors import DatasetError, bad_argument

BUILDER_NAME = "glajax_local"
_VERSION = "1.0.0"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass(frozen=True)
class LocalSource:
  """A dataset read from local files.

  Attributes:
    name: config name; the prepared dataset is ``glajax_local/<name>``.
    splits: TFDS split names it produces.
    examples: ``(root, split) -> [(path relative to root, label), ...]``.
    classes: ``root -> class names (tuple) or a class count (int)``.
    layout: what ``manual_dir`` must hold (shown when it does not).
    root: the folder to read when no ``manual_dir`` is given (folders registered by path).
  """
  name: str
  splits: tuple[str, ...]
  examples: Callable[[Path, str], list[tuple[str, int]]]
  classes: Callable[[Path], tuple[str, ...] | int]
  layout: str
  root: Path | None = None

  @property
  def tfds_name(self) -> str:
    return f"{BUILDER_NAME}/{self.name}"


def _require_dir(path: Path, what: str) -> Path:
  if not path.is_dir():
    raise bad_argument("manual_dir", what, f"no directory {path}", DatasetError)
  return path


def _is_image(path: Path) -> bool:
  return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _class_folders(root: Path) -> tuple[str, ...]:
  classes = tuple(sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith(".")))
  if not classes:
    raise bad_argument("manual_dir", "class subfolders", f"none in {root}", DatasetError)
  return classes


def _folder_examples(root: Path, classes: tuple[str, ...]) -> list[tuple[str, int]]:
  return [(str(p.relative_to(root)), label) for label, c in enumerate(classes)
          if (root / c).is_dir() for p in sorted((root / c).iterdir()) if _is_image(p)]


def _read_lines(path: Path) -> list[str]:
  if not path.is_file():
    raise bad_argument("manual_dir", f"the split list {path.name}", f"no file {path}", DatasetError)
  try:
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") too
  except (OSError, UnicodeDecodeError) as e:
    raise bad_argument("manual_dir", f"a readable text file {path.name}",
                       f"{path} ({type(e).__name__}: {e})", DatasetError) from e
  return [line.strip() for line in text.splitlines() if line.strip()]


# --- ObjectNet ------------------------------------------------------------------------------

def _objectnet_examples(root: Path, split: str) -> list[tuple[str, int]]:
  del split
  images = _require_dir(root / "images", "ObjectNet's objectnet-1.0 folder (with images/)")
  folders = assets.objectnet_folder_labels()
  missing = sorted(f for f in folders if not (images / f).is_dir())
  if missing:
    raise bad_argument("manual_dir", f"ObjectNet's {len(folders)} mapped class folders in images/",
                       f"{len(missing)} missing, e.g. {missing[:5]}", DatasetError)
  return [(str(p.relative_to(root)), label) for folder, label in sorted(folders.items())
          for p in sorted((images / folder).iterdir()) if _is_image(p)]


OBJECTNET = LocalSource(
    "objectnet", ("test",), _objectnet_examples, lambda root: 113,
    "ObjectNet's objectnet-1.0 folder with images/<folder>/<file> (objectnet.dev)")


# --- FGVC-Aircraft -------------------------------------------------------------------------

_FGVC_FILES = {"train": "train", "validation": "val", "trainval": "trainval", "test": "test"}


def _fgvc_classes(root: Path) -> tuple[str, ...]:
  return tuple(_read_lines(_require_dir(root / "data", "fgvc-aircraft-2013b (with data/)")
                           / "variants.txt"))


def _fgvc_examples(root: Path, split: str) -> list[tuple[str, int]]:
  labels = {name: i for i, name in enumerate(_fgvc_classes(root))}
  pairs = []
  for line in _read_lines(root / "data" / f"images_variant_{_FGVC_FILES[split]}.txt"):
    image_id, variant = line.split(maxsplit=1)
    if variant not in labels:
      raise bad_argument(f"images_variant_{_FGVC_FILES[split]}.txt", "variants from variants.txt",
                         repr(variant), DatasetError)
    pairs.append((f"data/images/{image_id}.jpg", labels[variant]))
  return pairs


FGVC_AIRCRAFT = LocalSource(
    "fgvc_aircraft", tuple(_FGVC_FILES), _fgvc_examples, _fgvc_classes,
    "fgvc-aircraft-2013b with data/variants.txt, data/images_variant_*.txt, data/images/")


# --- UCF101 middle frames --------------------------------------------------------------------

def _ucf_classes(root: Path) -> tuple[str, ...]:
  """classInd.txt lines "1 ApplyEyeMakeup" -> folder names in label order."""
  return tuple(line.split()[1] for line in _read_lines(root / "ucfTrainTestlist" / "classInd.txt"))


def _ucf_examples(root: Path, split: str) -> list[tuple[str, int]]:
  labels = {name: i for i, name in enumerate(_ucf_classes(root))}
  pairs = []
  for line in _read_lines(root / "ucfTrainTestlist" / f"{split}list01.txt"):
    video = line.split()[0]
    folder = video.split("/")[0]
    stem = os.path.splitext(video)[0]
    pairs.append((f"UCF-101-midframes/{stem}.jpg", labels[folder]))
  return pairs


UCF101 = LocalSource(
    "ucf101", ("train", "test"), _ucf_examples, _ucf_classes,
    "UCF-101-midframes/<Class>/<video>.jpg and ucfTrainTestlist/ (classInd, trainlist01, "
    "testlist01)")


# --- split lists: ImageNet-LT, Places-LT, iNaturalist 2018 -----------------------------------

def _list_source(name: str, files: dict[str, str], num_classes: int, what: str) -> LocalSource:
  def examples(root, split):
    paths, labels = read_split_list(root / files[split])
    return list(zip(paths, labels.tolist()))

  return LocalSource(name, tuple(files), examples,
                     lambda root: num_classes, f"{what}: {', '.join(files.values())} and the "
                     "images they name, paths relative to manual_dir")


IMAGENET_LT = _list_source(
    "imagenet_lt", {"train": "ImageNet_LT_train.txt", "validation": "ImageNet_LT_val.txt",
                    "test": "ImageNet_LT_test.txt"}, 1000, "ImageNet-LT lists (Liu et al. 2019)")
PLACES_LT = _list_source(
    "places_lt", {"train": "Places_LT_train.txt", "validation": "Places_LT_val.txt",
                  "test": "Places_LT_test.txt"}, 365, "Places-LT lists (Liu et al. 2019)")
INATURALIST_2018 = _list_source(
    "inaturalist2018", {"train": "iNaturalist18_train.txt",
                        "validation": "iNaturalist18_val.txt"}, 8142,
    "iNaturalist-2018 lists (Kang et al. 2020)")


# --- folders of class subfolders (Office-Home and any other) --------------------------------

def folder_source(name: str, subfolder: str = "", splits: tuple[str, ...] | None = None
                  ) -> LocalSource:
  """A dataset stored as ``<root>/<subfolder>/[<split>/]<class>/<image>``.

  With ``splits`` each split has its own folder; class names are the sorted class folders (of
  the first split), identical in every split.
  """
  def classes(root):
    base = _require_dir(root / subfolder, f"a folder {subfolder or '.'} of class subfolders")
    return _class_folders(base / splits[0] if splits else base)

  def examples(root, split):
    base = root / subfolder / (split if splits else "")
    _require_dir(base, f"a folder {base.relative_to(root)} of class subfolders")
    pairs = _folder_examples(base, classes(root))
    return [(str(Path(subfolder) / (split if splits else "") / p), y) for p, y in pairs]

  return LocalSource(name, splits or ("train",), examples, classes,
                     f"class subfolders under {subfolder or 'manual_dir'}"
                     + (f"/{{{','.join(splits)}}}" if splits else ""))


def folder_splits(root: Path) -> tuple[str, ...] | None:
  """The split folders of ``root`` when it is laid out as ``<split>/<class>/<image>``: ``train``
  and at least one of ``val``, ``validation``, ``test`` (in that order, the eval split last),
  each holding class folders; None for a plain ``<class>/<image>`` tree."""
  def has_classes(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                                 for p in path.iterdir())
  found = [s for s in ("train", "val", "validation", "test") if has_classes(root / s)]
  return tuple(found) if found[:1] == ["train"] and len(found) > 1 else None


def csv_source(name: str, csv_file: str | os.PathLike) -> LocalSource:
  """A dataset listed in a CSV file of ``path,label`` rows (an optional third column ``split``;
  without it every row is in ``train``), paths relative to the CSV's folder or absolute; an
  optional header row (``path,label[,split]``). Class names: the sorted distinct labels."""
  csv_file = Path(csv_file).expanduser().resolve()
  rows = _csv_rows(csv_file)
  classes = tuple(sorted({label for _, label, _ in rows}))
  index = {c: i for i, c in enumerate(classes)}
  splits = tuple(s for s in ("train", "val", "validation", "test")
                 if any(split == s for _, _, split in rows))

  def examples(root, split):
    del root
    return [(path, index[label]) for path, label, s in rows if s == split]

  return LocalSource(name, splits or ("train",), examples, lambda root: classes,
                     f"the images {csv_file.name} lists", root=csv_file.parent)


def _csv_rows(csv_file: Path) -> list[tuple[str, str, str]]:
  """(path, label, split) of every row of a ``path,label[,split]`` CSV file."""
  import csv  # noqa  (only for CSV-listed datasets)
  lines = _read_lines(csv_file)
  rows = [[field.strip() for field in row] for row in csv.reader(lines)]
  if rows and [f.lower() for f in rows[0][:2]] == ["path", "label"]:
    rows = rows[1:]
  bad = [i for i, row in enumerate(rows) if len(row) not in (2, 3) or not all(row)
         or (len(row) == 3 and row[2] not in ("train", "val", "validation", "test"))]
  if bad or not rows:
    raise bad_argument("CSV file", "rows 'path,label' or 'path,label,split' (split one of "
                       "train, val, validation, test)",
                       f"{csv_file}: " + (f"bad rows {[i + 1 for i in bad[:5]]}" if bad
                                          else "no rows"), DatasetError)
  return [(row[0], row[1], row[2] if len(row) == 3 else "train") for row in rows]


OFFICE_HOME = {domain.lower().replace(" ", "_"): folder_source(
    f"office_home_{domain.lower().replace(' ', '_')}", f"OfficeHomeDataset_10072016/{domain}")
               for domain in ("Art", "Clipart", "Product", "Real World")}


def _check_image(path: Path) -> bytes:
  """The file's bytes, after decoding it once (a reduced-size draft for JPEG) to prove it valid."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (PIL: only to validate images)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise bad_argument("image file", "a readable file", f"{path} ({type(e).__name__}: "
                       f"{e.strerror or e})", DatasetError) from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.draft("RGB", (64, 64))
      image.load()
  except Exception as e:  # PIL raises many types for bad files.
    # PIL names the buffer it read ("<_io.BytesIO object at 0x…>"), not the file
    reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)) or type(e).__name__
    raise bad_argument("image file", "a decodable image", f"{path} ({reason})",
                       DatasetError) from e
  return data


def _decoded_marker(root: Path, files) -> Path:
  """The file that records that every one of ``files`` (relative to ``root``) decoded, named by a
  digest of ``root`` and each file's name, size and modification time: any change to the data, or
  the same names elsewhere, is checked anew."""
  digest = hashlib.sha256(str(root.resolve()).encode())
  for file in sorted(dict.fromkeys(map(str, files))):
    try:
      stat = (root / file).stat()
      digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    except OSError:
      digest.update(f"{file}:missing;".encode())
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(cache, "glajax", "decoded", digest.hexdigest()[:24])


def check_decodable(source: LocalSource, argument: str, root=None) -> None:
  """Every image of a folder or CSV ``source`` under ``root`` (default ``source.root``) decoded
  once (:func:`_check_images`), all the files that fail named in one DatasetError naming
  ``argument`` (the user's key); remembered per data (:func:`_decoded_marker`), so that an
  unchanged folder is decoded once."""
  root = source.root if root is None else root
  if root is None:
    return
  root = Path(root)
  files = [p for split in source.splits for p, _ in source.examples(root, split)]
  marker = _decoded_marker(root, files)
  if marker.is_file():
    return
  _check_images(root, files, argument)
  with contextlib.suppress(OSError):   # a read-only home: checked again next time
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _check_images(root: Path, files, argument: str) -> None:
  """Every listed image that exists decoded once (:func:`_check_image`) before TFDS writes
  anything; all the files that fail named in one DatasetError naming ``argument``."""
  bad = []
  for file in dict.fromkeys(files):
    if not (root / file).is_file():
      continue  # a missing file: the builder's check lists those
    try:
      _check_image(root / file)
    except DatasetError as e:
      bad.append(str(e).partition(", found ")[2])
  if bad:
    raise bad_argument(argument, f"decodable images under {root}", f"{len(bad)} that are not: "
                       + "; ".join(bad[:20]) + ("; ..." if len(bad) > 20 else ""), DatasetError)


@functools.cache
def _builder_class():
  import tensorflow_datasets as tfds  # noqa  (TFDS: loaded on demand)

  class LocalImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over a :class:`LocalSource` and its ``manual_dir``."""
    name = BUILDER_NAME
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "First version."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      """No code folder (no checksums to read); TFDS's default needs `importlib_resources`."""
      return None

    def __init__(self, *, source: LocalSource, root: Path, **kwargs):
      self._source, self._root = source, root
      super().__init__(config=tfds.core.BuilderConfig(name=source.name), **kwargs)

    def _info(self):
      classes = self._source.classes(self._root)
      label = (tfds.features.ClassLabel(num_classes=classes) if isinstance(classes, int)
               else tfds.features.ClassLabel(names=classes))
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(), "label": label, "file_name": tfds.features.Text()}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      examples = {split: self._source.examples(self._root, split) for split in self._source.splits}
      num_classes = self.info.features["label"].num_classes
      for split, pairs in examples.items():
        missing = [p for p, _ in pairs if not (self._root / p).is_file()]
        if missing:
          raise bad_argument(f"split {split!r} of {self._source.name}", "files that exist",
                             f"{len(missing)} missing under {self._root}, e.g. {missing[:3]}",
                             DatasetError)
        bad = [y for _, y in pairs if not 0 <= y < num_classes]
        if bad:
          raise bad_argument(f"labels of split {split!r}", f"in [0, {num_classes})",
                             f"{bad[:3]}", DatasetError)
      return {split: self._generate_examples(pairs) for split, pairs in examples.items()}

    def _generate_examples(self, pairs):
      for path, label in pairs:
        yield path, {"image": _check_image(self._root / path), "label": label, "file_name": path}

    def _log_download_bytes(self) -> None:
      pass  # prepare() says what happens: the images are read, nothing is downloaded

    def _log_download_done(self) -> None:
      pass

  return LocalImages


def prepared_dir(source: LocalSource, data_dir: str | os.PathLike) -> Path:
  """Where the prepared TFDS dataset of ``source`` lives."""
  return Path(data_dir) / BUILDER_NAME / source.name / _VERSION


def prepare(source: LocalSource, manual_dir: str | os.PathLike | None, data_dir: str | os.PathLike):
  """Builds ``source`` from ``manual_dir`` into ``data_dir`` (once); returns a TFDS builder."""
  import tensorflow_datasets as tfds  # noqa  (TFDS: loaded on demand)
  target = prepared_dir(source, data_dir)
  if (target / "dataset_info.json").is_file():
    return tfds.builder_from_directory(str(target))
  manual_dir = source.root if manual_dir is None else manual_dir
  if manual_dir is None:
    raise bad_argument("manual_dir", f"a directory holding {source.layout}",
                       f"None (and no prepared dataset at {target})", DatasetError)
  root = _require_dir(Path(manual_dir).expanduser(), source.layout)
  for split in source.splits:  # before TFDS creates anything (it ends in a bare AssertionError)
    if not source.examples(root, split):
      raise bad_argument("manual_dir", f"images ({', '.join(IMAGE_SUFFIXES)}) for split "
                         f"{split!r} of {source.name} ({source.layout})", f"none under {root}",
                         DatasetError)
  check_decodable(source, "manual_dir", root)
  # Folders TFDS creates before it reads an image: removed again (if still empty) on failure.
  made = [p for p in (Path(data_dir), Path(data_dir, "downloads"),
                      Path(data_dir, "downloads", "extracted"), Path(data_dir, BUILDER_NAME),
                      Path(data_dir, BUILDER_NAME, source.name), target) if not p.exists()]
  try:
    builder = _builder_class()(source=source, root=root, data_dir=os.fspath(data_dir))
    images = sum(len(source.examples(root, split)) for split in source.splits)
    print(f"Preparing {source.name} once: {images:,} images from {root}, nothing to download, "
          f"into {target}", flush=True)
    builder.download_and_prepare()
  except BaseException as e:
    for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
      with contextlib.suppress(OSError):
        folder.rmdir()   # only if empty: never a file TFDS or anyone else put there
    if isinstance(e, OSError):  # a data_dir under a file, a read-only or full disk
      raise bad_argument("data_dir", "a writable directory", f"{data_dir} ({type(e).__name__}: "
                         f"{e.strerror or e})", DatasetError) from e
    raise
  return tfds.builder_from_directory(str(target))

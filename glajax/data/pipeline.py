"""tf.data input pipelines: the recipes' preprocessing, per-process slices, global batches on the
mesh.

Every example has an index: its position in the split, in TFDS's stored order (the order
``read_labels`` returns and ``subsample`` selects from). Each process reads its own contiguous
slices of the split (``tfds.even_splits``: for training, its ``shards``; for evaluation, one per
process); ``batch_size`` is the global batch, each process yields ``batch_size / process_count``
examples per step; with a ``mesh`` they arrive as global ``jax.Array``s sharded over its
``data`` axis (``glajax.parallel.shard_batch``), without one as NumPy arrays.

Resuming training: ``train_batches(..., start_step=k)`` yields exactly the batches a fresh
iterator yields from step k on. Epoch e shuffles a shard with a seed drawn (Philox) from
(seed, e, shard) and every example's augmentation uses the stateless seed (that epoch seed, its
position in the shuffled epoch), so skipping k·B/S encoded records of each of the S shards (no
decoding) lands on the same state. Resuming costs a read of at most one epoch of encoded records.
A training shard small enough (``DECODED_CACHE_BYTES``, images of one shape) is decoded once and
kept in memory: the same batches, without decoding every epoch again.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, NamedTuple

import jax
import numpy as np

from glajax.data import builders, preprocess, registry, transforms, world  # world: its TFDS builder
from glajax.data.preprocess import tf  # TensorFlow, imported and kept off the GPUs there
from glajax.errors import DatasetError, bad_argument
from glajax import parallel as mesh_lib

AUTOTUNE = tf.data.AUTOTUNE
# A training shard whose decoded images take at most this many bytes (their shape fixed by the
# TFDS features: CIFAR, the demo world) is decoded once and kept in memory: every later epoch
# crops the same uint8 pixels (the transform of decoded and of encoded images is the same).
DECODED_CACHE_BYTES = 1 << 30


def _info_of(name_or_dataset) -> registry.DatasetInfo | None:
  if isinstance(name_or_dataset, str):
    return registry.get(name_or_dataset)
  if isinstance(name_or_dataset, registry.DatasetInfo):
    return name_or_dataset
  if isinstance(name_or_dataset, tf.data.Dataset):
    return None
  raise bad_argument("name_or_dataset", "a registry name, DatasetInfo or tf.data.Dataset",
                     type(name_or_dataset).__name__)


def _default_data_dir() -> str:
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def tfds_builder(info: registry.DatasetInfo, data_dir=None, manual_dir=None):
  """The prepared TFDS builder of ``info`` (prepared now if needed; manual ones need manual_dir).

  Its label feature must have ``info.num_classes`` classes (a missing class folder would
  otherwise shift every label after it).
  """
  import tensorflow_datasets as tfds  # noqa  (TFDS: loaded on demand)
  if info.source is not None:
    builder = builders.prepare(info.source, manual_dir, data_dir or _default_data_dir())
  else:
    builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
      if info.manual_download or builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        if manual_dir is None or not os.path.isdir(os.path.expanduser(manual_dir)):
          raise bad_argument("manual_dir", f"the manual-download directory of {info.tfds_name} "
                             f"(not prepared in {builder.data_dir})", manual_dir, DatasetError)
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir and os.path.expanduser(manual_dir)))
  stored = builder.info.features[info.label_key].num_classes
  if info.source_labels is None and stored != info.num_classes:
    raise bad_argument(f"{info.tfds_name} labels", f"{info.num_classes} classes ({info.name})",
                       f"{stored}", DatasetError)
  return builder


def _relabel(info: registry.DatasetInfo | None):
  """Stored label -> class index (ImageNet-R/A store ImageNet-1k labels); bad labels fail."""
  if info is None or info.source_labels is None:
    return lambda label: tf.cast(label, tf.int32)
  table = np.full(max(info.source_labels) + 1, -1, np.int32)
  table[list(info.source_labels)] = np.arange(len(info.source_labels))
  table = tf.constant(table)

  def relabel(label):
    label = tf.cast(label, tf.int32)
    mapped = tf.gather(table, tf.clip_by_value(label, 0, len(table) - 1))
    tf.debugging.assert_equal(tf.logical_and(mapped >= 0, label < len(table)), True,
                              message=f"a label outside {info.name}'s classes")
    return mapped
  return relabel


def _read(builder, info: registry.DatasetInfo, split):
  """Encoded examples of ``split`` in stored order: files one after another (TFDS interleaves 16
  files by default, which would make a sub-split's order differ from the whole split's)."""
  import tensorflow_datasets as tfds  # noqa  (TFDS: loaded on demand)
  return builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(interleave_cycle_length=1),
                            decoders={info.image_key: tfds.decode.SkipDecoding()})


class _Slice(NamedTuple):
  """One contiguous slice [offset, offset + size) of a split, with its ``info`` (None for a
  tf.data.Dataset), every slice's example count (None when there is one slice) and the shape
  every decoded image has, where the TFDS features fix it (None otherwise)."""
  ds: tf.data.Dataset
  info: registry.DatasetInfo | None
  offset: int
  size: int | None
  counts: list[int] | None
  image_shape: tuple[int, int, int] | None


def _even_counts(total: int, slices: int) -> list[int]:
  return [total * (p + 1) // slices - total * p // slices for p in range(slices)]


def _local_examples(name_or_dataset, split, data_dir, manual_dir, slices: int | None = None,
                    me: int | None = None) -> _Slice:
  """Slice ``me`` of ``slices`` even slices of the split (default: this process's slice of one
  per process) as a dataset of {"image": bytes or uint8, "label", "index"}."""
  import tensorflow_datasets as tfds  # noqa  (TFDS: loaded on demand)
  info = _info_of(name_or_dataset)
  slices = jax.process_count() if slices is None else slices
  me = jax.process_index() if me is None else me
  if info is None:
    ds, counts = name_or_dataset, None
    if slices > 1:
      total = int(ds.cardinality())
      if total < 0:
        raise bad_argument("name_or_dataset", "a tf.data.Dataset of known cardinality for "
                           "reading in slices (several processes or shards)",
                           "unknown cardinality")
      counts = _even_counts(total, slices)
      ds = ds.skip(sum(counts[:me])).take(counts[me])
    image_key, label_key, image_shape = "image", "label", None
  else:
    split = split or info.eval_split
    builder = tfds_builder(info, data_dir, manual_dir)
    splits = tfds.even_splits(split, slices) if slices > 1 else [split]
    try:
      counts = [builder.info.splits[s].num_examples for s in splits] if slices > 1 else None
      ds = _read(builder, info, splits[me])
    except (KeyError, ValueError) as e:
      raise bad_argument("split", f"a split of {info.tfds_name}", f"{split!r} ({e})",
                         DatasetError) from e
    image_key, label_key = info.image_key, info.label_key
    image_shape = tuple(getattr(builder.info.features[image_key], "shape", ()) or ())
    image_shape = image_shape if len(image_shape) == 3 and None not in image_shape else None
  relabel = _relabel(info)
  offset = sum(counts[:me]) if counts else 0
  size = counts[me] if counts else int(ds.cardinality())
  ds = ds.enumerate().map(lambda i, ex: {"image": ex[image_key], "label": relabel(ex[label_key]),
                                         "index": tf.cast(i, tf.int64) + offset},
                          num_parallel_calls=AUTOTUNE)
  return _Slice(ds, info, offset, size if size >= 0 else None, counts, image_shape)


def _uint8_image(image: tf.Tensor) -> tf.Tensor:
  return preprocess.decode_image(image) if image.dtype == tf.string else image


def _check_batch_size(batch_size: int, mesh) -> int:
  """The per-process batch; it must split evenly over processes and local devices."""
  processes = jax.process_count()
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0 or batch_size % processes:
    raise bad_argument("batch_size", f"a positive multiple of the {processes} processes",
                       batch_size)
  local = batch_size // processes
  if mesh is not None:
    devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if local % devices:
      raise bad_argument("batch_size", f"a per-process batch divisible by its {devices} "
                         "devices in the mesh", batch_size)
  return local


def _checked(transform, kind):
  """``transform`` if it is a ``kind`` (``transforms.TrainTransform`` or ``EvalTransform``)."""
  if not isinstance(transform, kind):
    raise bad_argument("transform", f"a glajax.data.transforms.{kind.__name__}",
                       type(transform).__name__)
  return transform


def _batches(ds: tf.data.Dataset, what: str) -> Iterator[dict]:
  """NumPy batches; TF errors while reading (corrupt images, bad labels) -> DatasetError."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise DatasetError(f"{what}: reading failed: {e.message.splitlines()[0]}") from e
    yield batch


def _pad(batch: dict, size: int) -> dict:
  """Pads a partial batch to ``size`` rows (zeros, index -1, mask False)."""
  missing = size - len(batch["label"])
  fill = {"index": -1}
  return {k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill.get(k, 0), v.dtype)])
          for k, v in batch.items()}


def _place(batch: dict, mesh):
  return batch if mesh is None else mesh_lib.shard_batch(batch, mesh)


def _keep_rows(ds, indices, offset: int, size: int, counts):
  """``ds`` (this process's slice) filtered to the split positions ``indices`` (before any
  image is decoded); also this process's new size and every process's new count."""
  indices = np.unique(np.asarray(indices))
  total = sum(counts) if counts else size
  if indices.ndim != 1 or not indices.size or indices.dtype.kind not in "iu":
    raise bad_argument("indices", "a non-empty 1-D array of integer positions", indices)
  if indices[0] < 0 or indices[-1] >= total:
    raise bad_argument("indices", f"positions in [0, {total}) of the split",
                       f"[{indices[0]}, {indices[-1]}]", DatasetError)
  mine = indices[(indices >= offset) & (indices < offset + size)] - offset
  keep = np.zeros(size, bool)
  keep[mine] = True
  keep = tf.constant(keep)
  ds = ds.filter(lambda ex: tf.gather(keep, ex["index"] - offset))
  new_counts = None if counts is None else [
      int(np.sum((indices >= sum(counts[:p])) & (indices < sum(counts[:p + 1]))))
      for p in range(len(counts))]
  return ds, len(mine), new_counts


# Preprocessed evaluation batches kept in host memory inside ``eval_cache()`` (an experiment, the
# demo): a test set evaluated again (another model, another α) skips reading, decoding, resizing.
EVAL_CACHE_BYTES = 1 << 30
_eval_cache_state: dict | None = None


@contextlib.contextmanager
def eval_cache(max_bytes: int = EVAL_CACHE_BYTES):
  """Within the block, :func:`eval_batches` keeps the batches of every named set it reads in
  full, while all of them together take at most ``max_bytes`` (a demo's or a few-shot run's test
  sets; not ImageNet's), and yields them from host memory when asked for the same set again.
  Forgotten on exit; a nested block shares the outer one's."""
  global _eval_cache_state
  if _eval_cache_state is not None:
    yield
    return
  _eval_cache_state = {"batches": {}, "too_large": set(), "bytes": 0, "max_bytes": max_bytes}
  try:
    yield
  finally:
    _eval_cache_state = None


def _eval_cache_key(name_or_dataset, split, local, image_size, transform, normalization,
                    indices, data_dir, manual_dir):
  """What identifies a set of evaluation batches, or None for a tf.data.Dataset (no name)."""
  if not isinstance(name_or_dataset, (str, registry.DatasetInfo)):
    return None
  info = _info_of(name_or_dataset)
  rows = None if indices is None else np.asarray(indices, np.int64).tobytes()
  return (repr(info), split, local, image_size, repr(transform),
          repr(normalization), rows, os.fspath(data_dir) if data_dir else None,
          os.fspath(manual_dir) if manual_dir else None, jax.process_index(), jax.process_count())


def eval_batches(name_or_dataset, *, split: str | None = None, batch_size: int,
                 image_size: int = 224, transform: transforms.EvalTransform = transforms.CLIP_EVAL,
                 normalization: transforms.Normalization = transforms.CLIP_NORMALIZATION,
                 indices=None, mesh=None, data_dir=None, manual_dir=None) -> Iterator[dict]:
  """Every example of ``split`` (default: the eval split; ``indices``: only those positions of
  it, in order) exactly once, preprocessed by ``transform`` (e.g. the recipe's; default CLIP's
  Resize(S, bicubic) + CenterCrop(S)) at image size S = ``image_size`` and ``normalization``.

  Yields {"image": (B, S, S, 3) float32, "label": (B,) int32, "mask": (B,) bool,
  "index": (B,) int32}; the last batches are padded (mask False, index -1), and every process
  yields the same number of batches. ``name_or_dataset``: a registry name, a DatasetInfo or a
  tf.data.Dataset of {"image": encoded bytes or uint8 (H, W, 3), "label"}. A named set whose
  batches fit is kept in host memory inside :func:`eval_cache`, and later calls with the same
  arguments yield the same batches from there.
  """
  local = _check_batch_size(batch_size, mesh)
  transform = _checked(transform, transforms.EvalTransform)
  normalization = transforms.as_normalization(normalization)
  cache = _eval_cache_state
  key = None if cache is None else _eval_cache_key(
      name_or_dataset, split, local, image_size, transform, normalization, indices, data_dir,
      manual_dir)
  if key is not None and key in cache["batches"]:
    for batch in cache["batches"][key]:
      yield _place(batch, mesh)
    return
  kept = [] if key is not None and key not in cache["too_large"] else None
  size = 0
  for batch in _eval_host_batches(name_or_dataset, split, local, image_size, transform,
                                  normalization, indices, data_dir, manual_dir):
    if kept is not None:
      size += sum(v.nbytes for v in batch.values())
      if cache["bytes"] + size <= cache["max_bytes"]:
        for value in batch.values():
          value.setflags(write=False)   # shared by every later reader
        kept.append(batch)
      else:
        kept = None
        cache["too_large"].add(key)
    yield _place(batch, mesh)
  if kept is not None:
    cache["batches"][key] = kept
    cache["bytes"] += size


def _eval_host_batches(name_or_dataset, split, local, image_size, transform, normalization,
                       indices, data_dir, manual_dir) -> Iterator[dict]:
  """:func:`eval_batches`' batches as host arrays, before they are placed on the mesh."""
  ds, info, offset, size, counts, _ = _local_examples(name_or_dataset, split, data_dir,
                                                     manual_dir)
  if indices is not None:
    ds, _, counts = _keep_rows(ds, indices, offset, size, counts)
  border = info.border_crop if info else 0

  def prepare(ex):
    image = preprocess.eval_transform(_uint8_image(ex["image"]), image_size, transform,
                                      normalization, border)
    return {"image": image,
            "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(True),
            "index": tf.cast(ex["index"], tf.int32)}

  ds = ds.map(prepare, num_parallel_calls=AUTOTUNE).batch(local).prefetch(AUTOTUNE)
  what = info.name if info else "dataset"
  yielded = 0
  for batch in _batches(ds, what):
    yielded += 1
    yield _pad(batch, local) if len(batch["label"]) < local else batch
  total = -(-max(counts) // local) if counts else yielded
  for _ in range(total - yielded):  # Other processes hold more examples: keep in step.
    yield {"image": np.zeros((local, image_size, image_size, 3), np.float32),
           "label": np.zeros(local, np.int32), "mask": np.zeros(local, bool),
           "index": np.full(local, -1, np.int32)}


def _check_shards(shards, batch_size: int) -> int:
  """``shards`` (default: one per process); it must be a multiple of the process count and
  divide ``batch_size``."""
  processes = jax.process_count()
  shards = processes if shards is None else shards
  if (isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1
      or shards % processes or batch_size % shards):
    raise bad_argument("shards", f"a multiple of the {processes} processes that divides "
                       f"batch_size {batch_size}", repr(shards))
  return int(shards)


def train_batches(name_or_dataset, *, batch_size: int, seed: int, split: str | None = None,
                  image_size: int = 224,
                  transform: transforms.TrainTransform = transforms.CLIP_TRAIN,
                  normalization: transforms.Normalization = transforms.CLIP_NORMALIZATION,
                  indices=None, start_step: int = 0, shuffle_buffer: int = 10_000,
                  shards: int | None = None, mesh=None, data_dir=None,
                  manual_dir=None) -> Iterator[dict]:
  """Endless shuffled, augmented batches {"image", "label"} of ``split`` (default: train split).

  ``transform`` (the recipe's RandomResizedCrop(image_size, scale, ratio, interpolation) [+
  flip]; default CLIP's: scale 0.9–1, bicubic, no flip) + ``normalization``; shuffling and
  augmentation are a function of (seed, step) only. ``indices``: positions in the split to
  train on (from ``subsample``); ``start_step``: resume at that step (see the module docstring);
  ``shuffle_buffer``: encoded examples held for shuffling (TFDS already shuffled the records
  when it wrote them).

  ``shards`` (default: one per process) even slices of the split each stream on their own
  (shard s of S shuffles epoch e with the seed drawn from (seed, e·S + s)); the global batch of
  a step is batch_size/S examples of every shard, in shard order, and process p of P reads
  shards p·S/P … (p + 1)·S/P − 1. With one ``shards`` the global batches are therefore the same
  on any process count that divides it, a run resumed on other hosts included.
  """
  local = _check_batch_size(batch_size, mesh)
  shards = _check_shards(shards, batch_size)
  if start_step < 0:
    raise bad_argument("start_step", "a step >= 0", start_step)
  transform = _checked(transform, transforms.TrainTransform)
  normalization = transforms.as_normalization(normalization)
  info = _info_of(name_or_dataset)
  if info is not None and split is None:
    if info.train_split is None:
      raise bad_argument("split", f"a split ({info.name} has no train split)", None, DatasetError)
    split = info.train_split
  per_shard = batch_size // shards

  def augment(example_seed, ex):  # bytes go in as they are: of a JPEG only the crop is decoded
    image = preprocess.train_transform(ex["image"], image_size, example_seed, transform,
                                       normalization)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  def shard_stream(shard: int):
    ds, _, offset, size, counts, image_shape = _local_examples(
        name_or_dataset, split, data_dir, manual_dir, shards, shard)
    if size is None:  # A tf.data.Dataset of unknown length: count it once (no decoding).
      size = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
    if indices is not None:
      ds, size, _ = _keep_rows(ds, indices, offset, size, counts)
    ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    if image_shape is not None and size * math.prod(image_shape) <= DECODED_CACHE_BYTES:
      ds = ds.map(lambda ex: {"image": _uint8_image(ex["image"]), "label": ex["label"]},
                  num_parallel_calls=AUTOTUNE).cache()
    if size == 0:
      raise bad_argument("split", f"at least one example in shard {shard} of {shards}", "none",
                         DatasetError)
    start_epoch, skip = divmod(start_step * per_shard, size)

    def epoch(e):
      key = tf.stack([tf.constant(seed, tf.int64), e * shards + shard])
      epoch_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
      shuffled = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
      return shuffled.enumerate().map(lambda i, ex: (tf.stack([epoch_seed, i]), ex))

    return (tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
            .skip(skip).map(augment, num_parallel_calls=AUTOTUNE)
            .batch(per_shard, drop_remainder=True))

  me, mine = jax.process_index(), local // per_shard
  streams = tuple(shard_stream(s) for s in range(me * mine, (me + 1) * mine))
  stream = streams[0] if len(streams) == 1 else tf.data.Dataset.zip(streams).map(
      lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
  for batch in _batches(stream.prefetch(AUTOTUNE), info.name if info else "dataset"):
    yield _place(batch, mesh)


def array_batches(arrays: dict, *, batch_size: int, seed: int, start_step: int = 0,
                  mesh=None) -> Iterator[dict]:
  """Endless shuffled batches of in-memory arrays with one leading axis (e.g. cached features
  {"features", "label"}), for training on them; the ``train_batches`` contract.

  Epoch e visits the rows in the order ``default_rng([seed, e]).permutation(N)``, in ⌊N / B⌋
  full batches; each process takes its slice of every global batch; ``start_step`` resumes there.
  """
  local = _check_batch_size(batch_size, mesh)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  sizes = {len(v) for v in arrays.values()}
  if len(sizes) != 1 or min(sizes) < batch_size:
    raise bad_argument("arrays", f"arrays of one length >= batch_size {batch_size}",
                       {k: v.shape for k, v in arrays.items()})
  if start_step < 0:
    raise bad_argument("start_step", "a step >= 0", start_step)
  size = sizes.pop()
  steps_per_epoch = size // batch_size
  epoch, step = divmod(start_step, steps_per_epoch)
  me = jax.process_index()
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(size)
    for step in range(step, steps_per_epoch):
      rows = order[step * batch_size + me * local:step * batch_size + (me + 1) * local]
      yield _place({k: v[rows] for k, v in arrays.items()}, mesh)
    epoch, step = epoch + 1, 0


def read_labels(name_or_dataset, split: str | None = None, data_dir=None,
                manual_dir=None) -> np.ndarray:
  """(N,) int32 labels of the whole split in index order (every process reads all of them).

  ``split`` defaults to the train split (the eval split for test-only datasets).
  """
  info = _info_of(name_or_dataset)
  if info is None:
    ds = name_or_dataset.map(lambda ex: ex["label"])
  else:
    builder = tfds_builder(info, data_dir, manual_dir)
    ds = _read(builder, info, split or info.train_split or info.eval_split)
    relabel = _relabel(info)
    ds = ds.map(lambda ex: relabel(ex[info.label_key]), num_parallel_calls=AUTOTUNE)
  labels = [b for b in _batches(ds.batch(4096), info.name if info else "dataset")]
  return np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)


def read_order(name_or_dataset, split: str | None = None, data_dir=None,
               manual_dir=None) -> np.ndarray | None:
  """(N,) int64: each example's position in the dataset's own files, in index order, from the
  registry's ``order_key`` feature ("train_01234" -> 1234; TFDS's CIFAR keeps the order of the
  original binary files, the order torchvision's pickles have); None without one."""
  info = _info_of(name_or_dataset)
  if info is None or info.order_key is None:
    return None
  builder = tfds_builder(info, data_dir, manual_dir)
  ds = _read(builder, info, split or info.train_split or info.eval_split)
  ds = ds.map(lambda ex: tf.strings.to_number(
      tf.strings.regex_replace(ex[info.order_key], r"^.*\D", ""), tf.int64),
      num_parallel_calls=AUTOTUNE)
  order = [b for b in _batches(ds.batch(4096), info.name)]
  return np.concatenate(order) if order else np.zeros(0, np.int64)


def class_names(name_or_info, data_dir=None, manual_dir=None) -> tuple[str, ...]:
  """The registry's class names, or (when it has none) those stored with the prepared dataset,
  with "_" and "/" turned into spaces."""
  info = _info_of(name_or_info)
  if info is None:
    raise bad_argument("name_or_info", "a registry name or DatasetInfo", "a tf.data.Dataset")
  if info.classnames:
    return info.classnames
  names = tfds_builder(info, data_dir, manual_dir).info.features[info.label_key].names
  return tuple(map(registry.clean_classname, names))

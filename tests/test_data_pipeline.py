"""tf.data pipelines: exact eval coverage, shapes/dtypes/ranges, seeded training, resume, mesh."""
import traceback

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from glajax import DatasetError, InputError
from glajax.data import pipeline, registry, transforms, world
from glajax import parallel as mesh_lib
from conftest import needs_devices

_LOW = (0 - np.asarray(transforms.CLIP_MEAN)) / np.asarray(transforms.CLIP_STD)
_HIGH = (1 - np.asarray(transforms.CLIP_MEAN)) / np.asarray(transforms.CLIP_STD)


def _numbered(n, size=(20, 30)):
  """Example i: a constant image of grey level 10·i (survives crops and resizes), label i % 3."""
  images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 10, 3, axis=-1)
  images = np.broadcast_to(images, (n, *size, 3)).copy()
  return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(n) % 3})


def _identity(image_batch):
  """Recovers i from a normalised constant image of level 10·i."""
  level = image_batch[..., 0] * transforms.CLIP_STD[0] + transforms.CLIP_MEAN[0]
  return np.rint(level.reshape(len(image_batch), -1).mean(axis=1) * 255 / 10).astype(int)


def test_eval_covers_every_example_once_with_padding_masked():
  batches = list(pipeline.eval_batches(_numbered(11), batch_size=4, image_size=16))
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(11))
  np.testing.assert_array_equal(mask, np.arange(12) < 11)
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(_identity(images[mask]), np.arange(11))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask],
                                np.arange(11) % 3)


@needs_devices(2)
def test_eval_on_mock_tfds_and_mesh_sharding():
  mesh = mesh_lib.make_mesh()
  n = mesh.size   # 8 virtual CPU devices in the suite; what is present on an accelerator
  with tfds.testing.mock_data(num_examples=19):
    batches = list(pipeline.eval_batches("cifar10", batch_size=n, image_size=32, mesh=mesh))
  assert len(batches) == -(-19 // n)
  image = batches[0]["image"]
  assert isinstance(image, jax.Array) and image.shape == (n, 32, 32, 3)
  assert image.sharding.is_equivalent_to(mesh_lib.data_sharding(mesh), 4)
  assert {s.data.shape for s in image.addressable_shards} == {(1, 32, 32, 3)}
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  assert mask.sum() == 19
  values = np.asarray(image)
  assert np.all(values >= _LOW - 1e-5) and np.all(values <= _HIGH + 1e-5)
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])[mask]
  assert labels.min() >= 0 and labels.max() < 10
  with pytest.raises(InputError, match=f"divisible by its {n} devices"):
    next(pipeline.eval_batches("cifar10", batch_size=n + 1, mesh=mesh))


def _imagenet_labels(labels):
  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    images = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
    return tf.data.Dataset.from_tensor_slices(
        {"image": [images] * len(labels), "label": np.asarray(labels, np.int64)})
  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_imagenet_r_labels_map_to_its_200_classes():
  indices = registry.get("imagenet_r").source_labels
  with _imagenet_labels([indices[0], indices[57], indices[199]]):
    batch = next(pipeline.eval_batches("imagenet_r", batch_size=4, image_size=8))
    np.testing.assert_array_equal(batch["label"][:3], [0, 57, 199])
    np.testing.assert_array_equal(pipeline.read_labels("imagenet_r", "test"), [0, 57, 199])
  with _imagenet_labels([0]):  # tench is not an ImageNet-R class
    with pytest.raises(DatasetError, match="imagenet_r: reading failed"):
      next(pipeline.eval_batches("imagenet_r", batch_size=4, image_size=8))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_is_seeded_endless_and_resumes_exactly():
  def run(seed, start_step=0, n=6):
    return _take(pipeline.train_batches(_numbered(10), batch_size=4, seed=seed, image_size=16,
                                        start_step=start_step, shuffle_buffer=10), n)
  first, again, other = run(0), run(0), run(1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert any(not np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))
  assert first[0]["image"].shape == (4, 16, 16, 3) and first[0]["label"].dtype == np.int32
  ids = _identity(np.concatenate([b["image"] for b in first]))
  np.testing.assert_array_equal(np.sort(ids[:10]), np.arange(10))  # epoch 0: each once
  np.testing.assert_array_equal(np.sort(ids[10:20]), np.arange(10))  # epoch 1: each once
  assert not np.array_equal(ids[:10], ids[10:20])  # reshuffled per epoch
  resumed = run(0, start_step=3, n=3)  # step 3 starts mid epoch 1
  for a, b in zip(first[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_train_augments_and_reads_only_the_given_indices():
  size = (60, 80)
  batches = _take(pipeline.train_batches(_numbered(12, size), batch_size=4, seed=0,
                                         image_size=16, indices=[1, 5, 7]), 3)
  ids = _identity(np.concatenate([b["image"] for b in batches]))
  assert set(ids) == {1, 5, 7}
  with pytest.raises(DatasetError, match=r"positions in \[0, 4\).*found \[1, 9\]"):
    next(pipeline.train_batches(_numbered(4), batch_size=2, seed=0, indices=[1, 9]))
  with pytest.raises(DatasetError, match="no train split"):
    next(pipeline.train_batches("imagenet_r", batch_size=2, seed=0))


def test_train_decodes_a_small_fixed_shape_split_once_with_the_same_batches(monkeypatch,
                                                                           tmp_path):
  """A split whose images have one shape in the TFDS features (CIFAR's 32 × 32) and fit
  ``DECODED_CACHE_BYTES`` is decoded once and kept in memory: its batches, a resumed run's,
  several shards' and a subset's included, are those of decoding every epoch (the crop of
  decoded and of encoded images is the same); a split over the limit and a tf.data.Dataset (no
  fixed shape) are not kept."""
  world.builder("tiny", data_dir=str(tmp_path)).download_and_prepare()
  cached = []   # the pipeline's own calls (TFDS caches a small split's encoded records too)
  cache = tf.data.Dataset.cache

  def spy(self, *args):
    if traceback.extract_stack(limit=2)[0].filename == pipeline.__file__:
      cached.append(1)
    return cache(self, *args)

  monkeypatch.setattr(tf.data.Dataset, "cache", spy)

  def run(start_step=0, n=6, **kwargs):   # 6 steps of 4 of 10 rows: two and a half epochs
    return _take(pipeline.train_batches("cifar10", batch_size=4, seed=5, image_size=24,
                                        start_step=start_step, **kwargs), n)

  def sharded():   # the demo world's tiny config (200 training photos), two shards
    return _take(pipeline.train_batches("demo_shapes_tiny", batch_size=8, seed=1, image_size=32,
                                        shards=2, data_dir=str(tmp_path)), 3)

  limit = pipeline.DECODED_CACHE_BYTES
  with tfds.testing.mock_data(num_examples=10):
    kept = [run(), run(indices=[0, 3, 4, 8, 9])]
    kept_resumed = run(start_step=3, n=3)
    assert len(cached) == 3
    monkeypatch.setattr(pipeline, "DECODED_CACHE_BYTES", 5 * 32 * 32 * 3 - 1)
    decoded_each_epoch = [run(), run(indices=[0, 3, 4, 8, 9])]
  assert len(cached) == 3
  decoded_each_epoch.append(sharded())
  monkeypatch.setattr(pipeline, "DECODED_CACHE_BYTES", limit)
  kept.append(sharded())
  assert len(cached) == 5   # one per shard stream
  for a, b in zip(sum(kept, []), sum(decoded_each_epoch, [])):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  for a, b in zip(kept[0][3:], kept_resumed):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(kept[0][0]["image"], kept[0][1]["image"])   # real, varied batches
  next(pipeline.train_batches(_numbered(4), batch_size=2, seed=0, image_size=8))
  assert len(cached) == 5


def test_missing_manual_dir_and_corrupt_images_raise(tmp_path):
  with pytest.raises(DatasetError, match="manual_dir"):
    next(pipeline.eval_batches("imagenet2012", batch_size=2, data_dir=str(tmp_path),
                               manual_dir=str(tmp_path / "nowhere")))
  good = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
  ds = tf.data.Dataset.from_tensor_slices({"image": [good, b"not an image"], "label": [0, 1]})
  with pytest.raises(DatasetError, match="reading failed"):
    list(pipeline.eval_batches(ds, batch_size=2, image_size=8))
  with pytest.raises(DatasetError, match="reading failed"):  # train: bytes go to the transform
    next(pipeline.train_batches(ds, batch_size=2, seed=0, image_size=8))
  with pytest.raises(InputError, match="batch_size"):
    next(pipeline.eval_batches(ds, batch_size=0))


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_read_disjoint_slices_in_step(monkeypatch, processes):
  """Simulated multi-host: each process's eval slice, together exactly once, same batch count."""
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  seen, lengths = [], set()
  for me in range(processes):
    monkeypatch.setattr(jax, "process_index", lambda me=me: me)
    batches = list(pipeline.eval_batches(_numbered(10), batch_size=2 * processes, image_size=8))
    lengths.add(len(batches))
    for b in batches:
      seen.extend(b["index"][b["mask"]].tolist())
      np.testing.assert_array_equal(_identity(b["image"][b["mask"]]), b["index"][b["mask"]])
    train = next(pipeline.train_batches(_numbered(10), batch_size=2 * processes, seed=0,
                                        image_size=8, indices=[0, 5, 9]))
    assert set(_identity(train["image"])) <= {0, 5, 9}
  assert sorted(seen) == list(range(10)) and len(lengths) == 1


def test_array_batches_shuffle_each_epoch_resume_and_split_over_processes(monkeypatch):
  arrays = {"features": np.arange(10, dtype=np.float32)[:, None] * [1, -1], "label": np.arange(10)}

  def take(start_step=0, n=6, **kwargs):
    return _take(pipeline.array_batches(arrays, batch_size=4, seed=0, start_step=start_step,
                                        **kwargs), n)
  first = take()
  labels = [b["label"] for b in first]
  for batch in first:  # rows stay together
    np.testing.assert_array_equal(batch["features"][:, 0], batch["label"])
  epochs = [np.concatenate(labels[:2]), np.concatenate(labels[2:4])]  # ⌊10 / 4⌋ = 2 steps
  for e, epoch in enumerate(epochs):
    np.testing.assert_array_equal(epoch, np.random.default_rng([0, e]).permutation(10)[:8])
  for a, b in zip(first[3:], take(start_step=3, n=3)):
    np.testing.assert_array_equal(a["label"], b["label"])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  halves = []
  for me in range(2):
    monkeypatch.setattr(jax, "process_index", lambda me=me: me)
    halves.append(take(n=1)[0]["label"])
  np.testing.assert_array_equal(np.concatenate(halves), labels[0])
  with pytest.raises(InputError, match="arrays"):
    next(pipeline.array_batches({"x": np.zeros(3), "label": np.zeros(4)}, batch_size=2, seed=0))


def test_shards_give_the_same_global_batches_on_any_process_count(monkeypatch):
  """With ``shards=4`` the global batch of every step is the same read by one, two or four
  (simulated) processes, each reading only its own shards, resumed mid-epoch on another
  process count too; each shard contributes batch/4 rows in shard order."""
  def global_batches(processes, start_step=0, n=5):
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    parts = []
    for me in range(processes):
      monkeypatch.setattr(jax, "process_index", lambda me=me: me)
      parts.append(_take(pipeline.train_batches(_numbered(22), batch_size=8, seed=3,
                                                image_size=8, shards=4, start_step=start_step,
                                                shuffle_buffer=22), n))
    return [{k: np.concatenate([p[i][k] for p in parts]) for k in parts[0][i]}
            for i in range(n)]

  one = global_batches(1)
  for processes in (2, 4):
    for a, b in zip(one, global_batches(processes)):
      jax.tree.map(np.testing.assert_array_equal, a, b)
  for a, b in zip(one[3:], global_batches(2, start_step=3, n=2)):  # epoch 1 of the shards
    jax.tree.map(np.testing.assert_array_equal, a, b)
  ids = np.stack([_identity(b["image"]) for b in one])   # (steps, 8)
  bounds = np.cumsum([0] + pipeline._even_counts(22, 4))
  for shard in range(4):   # rows 2s, 2s + 1 of each batch come from shard s's slice
    rows = ids[:, 2 * shard:2 * shard + 2]
    assert np.all((rows >= bounds[shard]) & (rows < bounds[shard + 1])), (shard, rows)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for bad in (3, 0, 16):   # not a multiple of the processes; none; not dividing the batch
    with pytest.raises(InputError, match="shards"):
      next(pipeline.train_batches(_numbered(22), batch_size=8, seed=0, shards=bad))


def test_read_order_gives_each_example_its_position_in_the_files():
  """CIFAR's TFDS ``id`` ("train_01234") read in stored order: the permutation the CIFAR-LT draw
  maps through (``subsample.long_tail_indices(order=...)``)."""
  positions = np.random.default_rng(0).permutation(12)

  def as_dataset(self, split, decoders=None, **kwargs):
    del self, decoders, kwargs
    assert split == "train"
    return tf.data.Dataset.from_tensor_slices({
        "id": [f"train_{p:05d}" for p in positions], "label": positions % 5,
        "image": np.zeros((12, 4, 4, 3), np.uint8)})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    order = pipeline.read_order("cifar100", "train")
  np.testing.assert_array_equal(order, positions)
  assert order.dtype == np.int64
  assert pipeline.read_order("dtd", "train") is None  # no order key: TFDS's order is used


def test_eval_cache_reads_a_named_set_once_inside_its_block(monkeypatch):
  """Inside ``eval_cache`` a named set's batches are read once and yielded again (equal, read-only,
  mesh-placed each time); other arguments are another set; a set over the byte limit, a
  tf.data.Dataset and anything outside the block are read every time."""
  reads = []
  host = pipeline._eval_host_batches
  monkeypatch.setattr(pipeline, "_eval_host_batches",
                      lambda *a: (reads.append(a[2:4]), host(*a))[1])
  with tfds.testing.mock_data(num_examples=10):
    first = list(pipeline.eval_batches("cifar10", batch_size=4, image_size=8))
    assert len(reads) == 1                                      # outside the block: read
    with pipeline.eval_cache(max_bytes=10 * 8 * 8 * 3 * 4 + 4096):
      a = list(pipeline.eval_batches("cifar10", batch_size=4, image_size=8))
      with pipeline.eval_cache():                              # nested: the outer cache
        b = list(pipeline.eval_batches("cifar10", batch_size=4, image_size=8))
      assert len(reads) == 2
      for x, y, z in zip(first, a, b):
        for k in x:
          np.testing.assert_array_equal(x[k], z[k])
      assert not b[0]["image"].flags.writeable
      list(pipeline.eval_batches("cifar10", batch_size=4, image_size=16))  # over the limit
      list(pipeline.eval_batches("cifar10", batch_size=4, image_size=16))
      assert reads[2:] == [(4, 16), (4, 16)]
      list(pipeline.eval_batches(_numbered(5), batch_size=4, image_size=8))
      list(pipeline.eval_batches(_numbered(5), batch_size=4, image_size=8))
      assert len(reads) == 6
    list(pipeline.eval_batches("cifar10", batch_size=4, image_size=8))
    assert len(reads) == 7                                      # forgotten on exit

"""glajax's own TFDS builders on small generated image folders (PIL) in tmp dirs."""
import jax
import numpy as np
import pytest
from PIL import Image

from glajax import DatasetError
from glajax.data import builders, pipeline, registry
from glajax.data.transforms import CLIP_MEAN, CLIP_STD


def _write(path, level, size=(24, 32), border=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = np.full((*size, 3), level, np.uint8)
  if border is not None:
    image[:2], image[-2:], image[:, :2], image[:, -2:] = border, border, border, border
  Image.fromarray(image).save(path)


def _levels(batches):
  mask = np.concatenate([b["mask"] for b in batches])
  image = np.concatenate([b["image"] for b in batches])[mask]
  return image, np.concatenate([b["label"] for b in batches])[mask]


def test_class_folder_dataset_round_trip(tmp_path, monkeypatch):
  monkeypatch.setattr(registry, "_REGISTERED", {})
  root = tmp_path / "raw"
  for split, n in (("train", 3), ("test", 2)):
    for c, name in enumerate(("cat", "dog_toy")):
      for i in range(n):
        _write(root / split / name / f"{i}.jpg", 40 * c + i)
  info = registry.folder_dataset("pets_folder", root, splits=("train", "test"))
  assert (info.classnames, info.num_classes, info.eval_split) == (("cat", "dog toy"), 2, "test")
  registry.register(info)
  data_dir = str(tmp_path / "tfds")
  batches = list(pipeline.eval_batches("pets_folder", batch_size=3, image_size=16,
                                       data_dir=data_dir))
  images, labels = _levels(batches)
  assert sorted(labels.tolist()) == [0, 0, 1, 1]
  grey = (images[..., 0] * CLIP_STD[0] + CLIP_MEAN[0]) * 255
  np.testing.assert_array_equal(np.rint(grey.mean(axis=(1, 2))) // 40, labels)  # image <-> label
  assert pipeline.class_names("pets_folder", data_dir=data_dir) == ("cat", "dog toy")
  # Prepared once: later reads need no manual_dir.
  np.testing.assert_array_equal(np.sort(pipeline.read_labels("pets_folder", "train",
                                                             data_dir=data_dir)),
                                [0, 0, 0, 1, 1, 1])
  # Positions agree between read_labels (what subsample selects from) and eval's "index".
  train = list(pipeline.eval_batches("pets_folder", split="train", batch_size=8, image_size=8,
                                     data_dir=data_dir))[0]
  order = np.argsort(train["index"][train["mask"]])
  np.testing.assert_array_equal(train["label"][train["mask"]][order],
                                pipeline.read_labels("pets_folder", "train", data_dir=data_dir))
  # Two simulated processes read disjoint TFDS sub-splits (tfds.even_splits) covering "train".
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  seen = []
  for me in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda me=me: me)
    for b in pipeline.eval_batches("pets_folder", split="train", batch_size=4, image_size=8,
                                   data_dir=data_dir):
      seen.extend(b["index"][b["mask"]].tolist())
  assert sorted(seen) == list(range(6))


def test_objectnet_reads_mapped_folders_and_crops_the_border(tmp_path):
  root = tmp_path / "objectnet-1.0"
  for folder in registry.objectnet_folder_labels():
    (root / "images" / folder).mkdir(parents=True)
  _write(root / "images" / "alarm_clock" / "a.png", 100, border=(255, 0, 0))
  _write(root / "images" / "banana" / "b.png", 200, border=(255, 0, 0))
  _write(root / "images" / "air_freshener" / "c.png", 50)  # not one of the 113 classes
  batches = list(pipeline.eval_batches("objectnet", batch_size=2, image_size=8,
                                       data_dir=str(tmp_path / "tfds"), manual_dir=str(root)))
  images, labels = _levels(batches)
  names = registry.get("objectnet").classnames
  assert sorted(labels.tolist()) == sorted([names.index("Alarm clock"), names.index("Banana")])
  # The red 2-px border is gone: every pixel of each image is its flat grey level.
  assert np.ptp(images.reshape(2, -1, 3), axis=1).max() < 1e-5


def test_split_list_naming_missing_files_fails_before_writing(tmp_path):
  root = tmp_path / "lt"
  _write(root / "train" / "n0" / "a.jpg", 10)
  (root / "ImageNet_LT_train.txt").write_text("train/n0/a.jpg 0\ntrain/n0/gone.jpg 0\n")
  (root / "ImageNet_LT_val.txt").write_text("train/n0/a.jpg 0\n")
  (root / "ImageNet_LT_test.txt").write_text("train/n0/a.jpg 0\n")
  data_dir = tmp_path / "tfds"
  with pytest.raises(DatasetError, match="1 missing.*gone.jpg"):
    builders.prepare(builders.IMAGENET_LT, root, data_dir)
  assert not builders.prepared_dir(builders.IMAGENET_LT, data_dir).exists()
  (root / "ImageNet_LT_train.txt").write_text("train/n0/a.jpg 0\n")
  builder = builders.prepare(builders.IMAGENET_LT, root, data_dir)
  assert builder.info.splits["train"].num_examples == 1
  assert builder.info.features["label"].num_classes == 1000


def test_corrupt_image_and_missing_manual_dir(tmp_path):
  root = tmp_path / "raw"
  _write(root / "a" / "ok.jpg", 10)
  (root / "b").mkdir()
  (root / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  source = builders.folder_source("broken")
  with pytest.raises(DatasetError, match="bad.jpg"):
    builders.prepare(source, root, tmp_path / "tfds")
  with pytest.raises(DatasetError, match="manual_dir.*ObjectNet"):
    builders.prepare(builders.OBJECTNET, tmp_path / "nowhere", tmp_path / "tfds")
  with pytest.raises(DatasetError, match="manual_dir.*None"):
    builders.prepare(builders.UCF101, None, tmp_path / "tfds")


def test_ucf101_and_fgvc_layouts(tmp_path):
  root = tmp_path / "ucf"
  (root / "ucfTrainTestlist").mkdir(parents=True)
  (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
  (root / "ucfTrainTestlist" / "trainlist01.txt").write_text(
      "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nArchery/v_Archery_g01_c01.avi 2\n")
  (root / "ucfTrainTestlist" / "testlist01.txt").write_text("Archery/v_Archery_g02_c01.avi\n")
  for video in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", "Archery/v_Archery_g01_c01",
                "Archery/v_Archery_g02_c01"):
    _write(root / "UCF-101-midframes" / f"{video}.jpg", 30)
  assert builders.UCF101.examples(root, "test") == [
      ("UCF-101-midframes/Archery/v_Archery_g02_c01.jpg", 1)]
  assert builders.UCF101.classes(root) == ("ApplyEyeMakeup", "Archery")
  fgvc = tmp_path / "fgvc-aircraft-2013b"
  (fgvc / "data").mkdir(parents=True)
  (fgvc / "data" / "variants.txt").write_text("707-320\nA300B4\n")
  (fgvc / "data" / "images_variant_test.txt").write_text("0034309 A300B4\n0034958 707-320\n")
  assert builders.FGVC_AIRCRAFT.examples(fgvc, "test") == [
      ("data/images/0034309.jpg", 1), ("data/images/0034958.jpg", 0)]


def test_office_home_names_come_from_its_folders(tmp_path):
  root = tmp_path / "office"
  art = root / "OfficeHomeDataset_10072016" / "Art"
  for c in range(65):
    (art / f"Class_{c:02d}").mkdir(parents=True)
  _write(art / "Class_00" / "a.jpg", 10)
  _write(art / "Class_64" / "b.jpg", 20)
  data_dir = str(tmp_path / "tfds")
  names = pipeline.class_names("office_home_art", data_dir=data_dir, manual_dir=str(root))
  assert len(names) == 65 and names[:2] == ("Class 00", "Class 01")
  np.testing.assert_array_equal(np.sort(pipeline.read_labels("office_home_art",
                                                             data_dir=data_dir)), [0, 64])
  (tmp_path / "clipart" / "OfficeHomeDataset_10072016" / "Clipart" / "Only").mkdir(parents=True)
  _write(tmp_path / "clipart" / "OfficeHomeDataset_10072016" / "Clipart" / "Only" / "c.jpg", 5)
  with pytest.raises(DatasetError, match="65 classes.*found 1"):
    pipeline.class_names("office_home_clipart", data_dir=data_dir,
                         manual_dir=str(tmp_path / "clipart"))


def test_indices_agree_across_processes_on_a_multi_shard_dataset(tmp_path, monkeypatch):
  """A sub-split's order must be the whole split's order. TFDS by default interleaves blocks of
  16 records from 16 files, so 4 shards of 20 examples would come out in another order."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(registry, "_REGISTERED", {})
  root = tmp_path / "raw"
  for i in range(80):
    _write(root / f"c{i % 2}" / f"{i}.png", 3 * i + 5, size=(8, 8))
  info = registry.folder_dataset("sharded", root)
  data_dir = tmp_path / "tfds"
  builders._builder_class()(source=info.source, root=root, data_dir=str(data_dir)).\
      download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
  assert len(list(builders.prepared_dir(info.source, data_dir).glob("*.tfrecord*"))) == 4
  registry.register(info)

  def levels_by_index():
    out = {}
    for b in pipeline.eval_batches("sharded", split="train", batch_size=16, image_size=8,
                                   data_dir=str(data_dir)):
      grey = (b["image"][..., 0] * CLIP_STD[0] + CLIP_MEAN[0]) * 255
      out.update(zip(b["index"][b["mask"]].tolist(), np.rint(grey.mean(axis=(1, 2)))[b["mask"]]))
    return out

  whole = levels_by_index()
  assert sorted(whole) == list(range(80)) and len(set(whole.values())) == 80
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for me in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda me=me: me)
    for index, level in levels_by_index().items():
      assert whole[index] == level


def _tar_member(tar, name, data):
  import io
  import tarfile
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _jpeg(level):
  import io
  out = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(out, "JPEG")
  return out.getvalue()


def test_tfds_catalog_dataset_prepares_offline_from_local_files(tmp_path):
  """TFDS's own imagenet2012 builder, from tiny ILSVRC2012 tars in a manual_dir, no network.

  Preparing a catalog dataset imports ``importlib_resources`` (TFDS uses it without declaring
  it; glajax's dependencies must bring it) and reads TFDS's own label files.
  """
  import io
  import tarfile
  pytest.importorskip("importlib_resources")
  manual = tmp_path / "manual"
  manual.mkdir()
  synsets = ("n01440764", "n01443537")   # tench, goldfish: labels 0 and 1
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
    for label, synset in enumerate(synsets):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(2):
          _tar_member(tar, f"{synset}_{i}.JPEG", _jpeg(40 * label + i))
      _tar_member(outer, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
    for i in (1, 2):   # TFDS's validation_labels.txt: n01751748 (65), n09193705 (970)
      _tar_member(tar, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(100 + i))
  data_dir = str(tmp_path / "tfds")
  np.testing.assert_array_equal(
      np.sort(pipeline.read_labels("imagenet2012", "train", data_dir=data_dir,
                                   manual_dir=str(manual))), [0, 0, 1, 1])
  # Prepared once: later reads need no manual_dir.
  np.testing.assert_array_equal(
      np.sort(pipeline.read_labels("imagenet2012", "validation", data_dir=data_dir)), [65, 970])
  batches = list(pipeline.eval_batches("imagenet2012", split="validation", batch_size=2,
                                       image_size=8, data_dir=data_dir))
  assert sorted(batches[0]["label"][batches[0]["mask"]].tolist()) == [65, 970]


def test_decode_check_is_remembered_per_data_not_per_name(tmp_path, monkeypatch):
  """The decoded-marker is keyed by the files (root, names, sizes, mtimes): an unchanged folder is
  decoded once; a changed file, or the same names in another folder under the same registry name,
  is decoded again and its bad image named."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  decoded = []
  check_image = builders._check_image
  monkeypatch.setattr(builders, "_check_image",
                      lambda path: (decoded.append(path.name), check_image(path))[1])
  for root in (tmp_path / "a", tmp_path / "b"):
    _write(root / "cat" / "0.png", 10)
    _write(root / "dog" / "0.png", 200)
  source_a = registry.folder_dataset("pets", tmp_path / "a").source
  builders.check_decodable(source_a, "data.folder")
  assert len(decoded) == 2
  builders.check_decodable(source_a, "data.folder")
  assert len(decoded) == 2                                   # unchanged: remembered
  (tmp_path / "b" / "dog" / "0.png").write_bytes(b"not an image")
  source_b = registry.folder_dataset("pets", tmp_path / "b").source   # the same name
  with pytest.raises(DatasetError, match=r"data\.folder.*dog/0\.png"):
    builders.check_decodable(source_b, "data.folder")
  (tmp_path / "a" / "cat" / "0.png").write_bytes(b"broken too")  # a changed file of a
  with pytest.raises(DatasetError, match=r"manual_dir.*cat/0\.png"):
    builders.prepare(source_a, None, tmp_path / "tfds")
  assert not (tmp_path / "tfds").exists()                    # refused before TFDS wrote anything

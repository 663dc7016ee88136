"""Preprocessing ops vs PIL and ports of torchvision's transforms (the official pipelines'), on
real photographs that packages ship and on generated images."""
import glob
import io
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image
from scipy import stats

from glajax.data import preprocess, transforms
from glajax.errors import InputError

# PIL resamples in two passes through a uint8 image with fixed-point coefficients (Pillow
# Resample.c), glajax in one float pass (preprocess.resize). Measured on every case below: bilinear
# at most 1 grey level apart, bicubic at most 6 (shrinking a random crop; 3 elsewhere); mean
# absolute difference at most 0.20 levels, pixels that differ at most 20 %.
MAX_LEVELS = {"bilinear": 1.0, "bicubic": 6.0}
MEAN_LEVELS, MAX_DIFFERING = 0.25, 0.25


def _photo_like(height, width, seed):
  """Smooth colour field + sensor noise + a hard-edged patch (edges are where kernels differ)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], -1)
  image += rng.normal(0, 12, (height, width, 3))
  image[height // 4:height // 2, width // 3:width // 2] = [250, 20, 30]
  return np.clip(image, 0, 255).astype(np.uint8)


# --- ports of torchvision (torchvision/transforms/transforms.py and functional.py, v0.20) -------
_PIL_MODES = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _tv_resize(pil: Image.Image, size: int, interpolation: str) -> Image.Image:
  """``Resize(size, interpolation)`` of a PIL image: ``F.resize`` -> ``_compute_resized_output_size``
  (short side -> size, long side int(size * long / short)) -> ``PIL.Image.resize``."""
  width, height = pil.size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  return pil.resize((new_w, new_h), _PIL_MODES[interpolation])


def _tv_center_crop(pil: Image.Image, size: int) -> Image.Image:
  """``CenterCrop(size)``: ``F.center_crop``'s int(round((h - size) / 2.0)) offsets."""
  width, height = pil.size
  top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
  return pil.crop((left, top, left + size, top + size))


def _tv_get_params(height: int, width: int, scale, ratio, generator) -> tuple[int, int, int, int]:
  """``RandomResizedCrop.get_params`` (torch's RNG as torchvision draws it)."""
  area = height * width
  log_ratio = torch.log(torch.tensor(ratio))
  for _ in range(10):
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
    aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                    generator=generator).item())
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
      j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
      return i, j, h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _photos() -> dict[str, bytes]:
  """The JPEG photographs scikit-learn ships (china.jpg, flower.jpg: 640x427) and those
  scikit-image ships in its wheel (hubble_deep_field, retina, rocket)."""
  import sklearn.datasets  # noqa  (test extra)
  import skimage  # noqa  (test extra)
  files = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images",
                                        "*.jpg")))
  files += sorted(glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.jpg")))
  assert len(files) >= 2
  return {os.path.basename(f): open(f, "rb").read() for f in files}


PHOTOS = _photos()
_SMALL = ("china.jpg", "flower.jpg")  # the photos the slower checks use


def _pil_rgb(data: bytes) -> Image.Image:
  return Image.open(io.BytesIO(data)).convert("RGB")


def _assert_pil_close(ours, reference, interpolation, what=""):
  diff = np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))
  assert ours.shape == reference.shape, what
  assert diff.max() <= MAX_LEVELS[interpolation], what
  assert np.mean(diff > 0) <= MAX_DIFFERING, what
  assert diff.mean() <= MEAN_LEVELS, what


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_jpeg_decoding_equals_pil_bit_for_bit(name):
  """Tolerance 0, both decoders: ``decode_image`` and the training path's crop-window decoder
  (libjpeg's accurate integer IDCT; TF's default fast IDCT is up to 18 levels off)."""
  data = PHOTOS[name]
  pil = np.asarray(_pil_rgb(data))
  np.testing.assert_array_equal(preprocess.decode_image(tf.constant(data)), pil)
  fast = tf.io.decode_jpeg(data, channels=3).numpy().astype(int)
  assert np.abs(fast - pil).max() > 0  # the default IDCT would not pass
  height, width = pil.shape[:2]
  for i, scale in enumerate([(0.08, 1.0), (0.9, 1.0), (0.01, 0.05)]):
    seed = tf.constant([i, 11])
    top, left, h, w = (int(v) for v in preprocess.sample_crop(height, width, seed, scale))
    window = preprocess._decode_window(tf.constant(data), seed, scale, transforms.RATIO)  # pylint: disable=protected-access
    np.testing.assert_array_equal(window, pil[top:top + h, left:left + w])


# The official evaluation transforms at 224 (wise-ft/CaRot clip/clip.py; LIFT/Pre-train-Imbalance
# trainer.py: Resize(224 * 8 // 7) bilinear; Dassl transforms.py with GLA.FS's INPUT).
_OFFICIAL_EVAL = {"clip": (224, "bicubic"), "lift": (256, "bilinear"), "dassl": (224, "bicubic")}


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("official", sorted(_OFFICIAL_EVAL))
def test_eval_transform_matches_torchvision_on_photographs(name, official):
  resize, interpolation = _OFFICIAL_EVAL[official]
  data = PHOTOS[name]
  reference = np.asarray(_tv_center_crop(_tv_resize(_pil_rgb(data), resize, interpolation), 224))
  transform = transforms.EvalTransform(resize, 224, interpolation)
  image = preprocess.decode_image(tf.constant(data))
  ours = preprocess.center_crop(preprocess.resize_short_side(image, resize, interpolation), 224)
  _assert_pil_close(ours.numpy(), reference, interpolation, what=official)
  normalised = preprocess.eval_transform(image, 224, transform).numpy()
  mean, std = np.float32(transforms.CLIP_MEAN), np.float32(transforms.CLIP_STD)
  np.testing.assert_allclose(normalised, (ours.numpy() / np.float32(255) - mean) / std,
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width", [(375, 500), (500, 375), (227, 301), (100, 150),
                                          (224, 224)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_is_within_pils_rounding_when_enlarging_and_shrinking(height, width, interpolation):
  image = _photo_like(height, width, seed=height + width)
  ours = preprocess.center_crop(preprocess.resize_short_side(tf.constant(image), 224,
                                                             interpolation), 224)
  reference = np.asarray(_tv_center_crop(_tv_resize(Image.fromarray(image), 224, interpolation),
                                         224))
  _assert_pil_close(ours.numpy(), reference, interpolation)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_an_image_already_at_the_size_keeps_its_pixels_as_with_pil(interpolation):
  """Resize(S) of an image whose short side is S: PIL returns it as it is (a copy), and so does
  ``resize_short_side``, in tf.data too; resizing at scale 1 (what it skips) gives those pixels."""
  for height, width in [(32, 32), (32, 45), (45, 32)]:
    image = _photo_like(height, width, seed=height * width)
    ours = preprocess.resize_short_side(tf.constant(image), 32, interpolation).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, np.asarray(_tv_resize(Image.fromarray(image), 32,
                                                              interpolation)))
    np.testing.assert_array_equal(
        ours, preprocess.resize(tf.constant(image), height, width, interpolation).numpy())
    in_graph = next(iter(tf.data.Dataset.from_tensors(image).map(
        lambda x: preprocess.resize_short_side(x, 32, interpolation))))
    np.testing.assert_array_equal(ours, in_graph.numpy())


def test_eval_transform_scales_the_crop_fraction_and_runs_in_tf_data():
  """At S = 112, LIFT's Resize(256) + CenterCrop(224) is Resize(112 * 8 // 7 = 128); eager and
  tf.data agree."""
  lift = transforms.EvalTransform(256, 224, "bilinear")
  assert [lift.resize_for(s) for s in (224, 112, 336, 32)] == [s * 8 // 7 for s in (224, 112, 336, 32)]
  image = _photo_like(375, 500, seed=0)
  reference = np.asarray(_tv_center_crop(_tv_resize(Image.fromarray(image), 128, "bilinear"), 112))
  eager = preprocess.eval_transform(tf.constant(image), 112, lift,
                                    transforms.Normalization((0.0,) * 3, (1.0,) * 3)).numpy()
  _assert_pil_close(np.round(eager * 255), reference, "bilinear")
  in_graph = next(iter(tf.data.Dataset.from_tensors(image).map(
      lambda x: preprocess.eval_transform(x, 112, lift)))).numpy()
  np.testing.assert_array_equal(preprocess.eval_transform(tf.constant(image), 112, lift),
                                in_graph)


def test_center_crop_rounds_half_to_even_like_torchvision():
  image = tf.reshape(tf.range(7 * 3 * 3), (7, 3, 3))  # (7 - 2) / 2 = 2.5 -> offset 2
  np.testing.assert_array_equal(preprocess.center_crop(image, 2), image[2:4, 0:2])
  image = tf.reshape(tf.range(9 * 4 * 3), (9, 4, 3))  # (9 - 2) / 2 = 3.5 -> 4, (4 - 2) / 2 -> 1
  np.testing.assert_array_equal(preprocess.center_crop(image, 2), image[4:6, 1:3])


def test_crop_border_and_decode():
  image = _photo_like(40, 30, seed=1)
  np.testing.assert_array_equal(preprocess.crop_border(tf.constant(image), 2), image[2:-2, 2:-2])
  png = tf.io.encode_png(image)
  np.testing.assert_array_equal(preprocess.decode_image(png), image)
  grey = tf.io.encode_png(image[..., :1])
  assert preprocess.decode_image(grey).shape == (40, 30, 3)


def test_sample_crop_follows_torchvision_bounds():
  """Area fraction in [0.9, 1] (up to rounding), ratio in [3/4, 4/3], inside the image."""
  for i in range(200):
    top, left, h, w = (int(v) for v in preprocess.sample_crop(375, 500, tf.constant([i, 7]),
                                                              (0.9, 1.0)))
    assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    assert 0.9 * 375 * 500 * 0.98 <= h * w <= 375 * 500
    assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02
  # A thin image: no draw fits, fall back to the central crop of ratio 4/3 clamp.
  top, left, h, w = (int(v) for v in preprocess.sample_crop(10, 400, tf.constant([0, 0])))
  assert (h, w, top, left) == (10, 13, 0, (400 - 13) // 2)


def test_train_transform_is_a_function_of_the_seed():
  image = tf.constant(_photo_like(375, 500, seed=2))
  a = preprocess.train_transform(image, 64, tf.constant([1, 2]))
  b = preprocess.train_transform(image, 64, tf.constant([1, 2]))
  c = preprocess.train_transform(image, 64, tf.constant([1, 3]))
  assert a.shape == (64, 64, 3) and a.dtype == tf.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  low = (0 - np.asarray(transforms.CLIP_MEAN)) / np.asarray(transforms.CLIP_STD)
  high = (1 - np.asarray(transforms.CLIP_MEAN)) / np.asarray(transforms.CLIP_STD)
  assert np.all(a.numpy() >= low - 1e-5) and np.all(a.numpy() <= high + 1e-5)


def _crops(height, width, scale, n, ratio=transforms.RATIO, salt=0):
  """(n, 4) (top, left, h, w) of ``preprocess.sample_crop`` over n seeds, in tf.data."""
  ds = tf.data.Dataset.range(n).map(lambda i: tf.stack(preprocess.sample_crop(
      height, width, tf.stack([i, tf.constant(salt, tf.int64)]), scale, ratio)))
  return next(iter(ds.batch(n))).numpy()


def _torchvision_crops(height, width, scale, n, ratio=transforms.RATIO, seed=0):
  generator = torch.Generator().manual_seed(seed)
  return np.asarray([_tv_get_params(height, width, scale, ratio, generator) for _ in range(n)])


# (height, width, scale): the official scales on the photographs' shape, upright and on its side,
# and a long strip where draws often miss (torchvision's fallback central crop then counts).
@pytest.mark.parametrize("height,width,scale", [(427, 640, (0.08, 1.0)), (640, 427, (0.08, 1.0)),
                                                (427, 640, (0.9, 1.0)), (60, 400, (0.08, 1.0))])
def test_random_resized_crop_distribution_matches_torchvision(height, width, scale):
  """Two-sample KS tests (scipy.stats.ks_2samp, 3000 draws each, fixed seeds) of the crop's
  area fraction, aspect ratio and relative position against a port of torchvision's
  ``get_params``: every p > 0.001; the same statistics against the other official scale give
  p < 1e-6, so the test can tell the two apart."""
  n = 3000
  ours, theirs = _crops(height, width, scale, n), _torchvision_crops(height, width, scale, n)
  other = _torchvision_crops(height, width, (0.9, 1.0) if scale[0] < 0.5 else (0.08, 1.0), n, seed=1)

  def statistics(crops):
    top, left, h, w = crops.T.astype(np.float64)
    return {"area": h * w / (height * width), "aspect": w / h,
            "top": (top + h / 2) / height, "left": (left + w / 2) / width}

  mine, ref, wrong = statistics(ours), statistics(theirs), statistics(other)
  for key in mine:
    assert stats.ks_2samp(mine[key], ref[key]).pvalue > 1e-3, key
  assert stats.ks_2samp(mine["area"], wrong["area"]).pvalue < 1e-6


@pytest.mark.parametrize("flip", [True, False])
def test_flip_rate_is_one_half_with_flip_and_zero_without(flip):
  """4000 seeds: with ``flip`` the share mirrored is within 4 standard errors of 1/2 (torchvision's
  ``RandomHorizontalFlip(p=0.5)``); without, no image is mirrored. The crop covers the whole
  image (scale and ratio 1) so a mirrored output is told apart exactly."""
  image = _photo_like(8, 8, seed=3)
  transform = transforms.TrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                        interpolation="bilinear", flip=flip)
  unit = transforms.Normalization((0.0,) * 3, (1 / 255,) * 3)
  n = 4000
  ds = tf.data.Dataset.range(n).map(lambda i: preprocess.train_transform(
      tf.constant(image), 8, tf.stack([i, tf.constant(3, tf.int64)]), transform, unit))
  outs = np.round(next(iter(ds.batch(n))).numpy())  # x / 255 / (1 / 255) up to float rounding
  plain = np.all(outs == image, axis=(1, 2, 3))
  mirrored = np.all(outs == image[:, ::-1], axis=(1, 2, 3))
  assert np.all(plain | mirrored)
  if flip:
    assert abs(mirrored.mean() - 0.5) <= 4 * math.sqrt(0.25 / n)
  else:
    assert not mirrored.any()


@pytest.mark.parametrize("name", _SMALL)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_random_resized_crop_resizes_its_window_as_pil(name, interpolation):
  """torchvision's ``F.resized_crop`` of a PIL image (crop, then ``Image.resize``) of the box
  the sampler drew, from the JPEG's bytes (only the window decoded): within PIL's rounding."""
  data = PHOTOS[name]
  pil = _pil_rgb(data)
  for i, scale in enumerate([(0.08, 1.0), (0.9, 1.0), (0.01, 0.02)]):
    seed = tf.constant([i, 1])
    top, left, h, w = (int(v) for v in preprocess.sample_crop(pil.size[1], pil.size[0], seed,
                                                              scale))
    reference = np.asarray(pil.crop((left, top, left + w, top + h)).resize(
        (224, 224), _PIL_MODES[interpolation]))
    ours = preprocess.random_resized_crop(tf.constant(data), 224, seed, scale,
                                          interpolation=interpolation)
    _assert_pil_close(ours.numpy(), reference, interpolation, what=str(scale))


def _jpeg_variants(image):
  """The same image as 4:2:0, 4:4:4, progressive, 4:2:2 (PIL) and greyscale JPEGs: chroma
  subsampling is where a cropped decode can differ from a full one."""
  pil_422 = io.BytesIO()
  Image.fromarray(image).save(pil_422, "JPEG", quality=85, subsampling=1)
  return {"420": tf.io.encode_jpeg(image, quality=90).numpy(),
          "444": tf.io.encode_jpeg(image, quality=90, chroma_downsampling=False).numpy(),
          "progressive": tf.io.encode_jpeg(image, quality=75, progressive=True).numpy(),
          "422": pil_422.getvalue(),
          "grey": tf.io.encode_jpeg(image[..., :1]).numpy()}


@pytest.mark.parametrize("height,width", [(375, 500), (97, 211), (300, 40)])
def test_fused_jpeg_crop_is_exactly_the_crop_of_the_full_decode(height, width):
  """Tolerance 0: the decoded window equals the sampler's box cut from a full decode, bit for
  bit (without the column margin, 4:2:0 / 4:2:2 crops differ by up to ~25 levels on an edge
  column). Small scales put the box anywhere, left edges included at multiples of 16."""
  image = _photo_like(height, width, seed=height)
  for kind, encoded in _jpeg_variants(image).items():
    full = preprocess.decode_image(encoded)
    for i, scale in enumerate([(0.9, 1.0), (0.08, 1.0), (0.01, 0.05)] * 4):
      seed = tf.constant([i, height])
      top, left, h, w = (int(v) for v in preprocess.sample_crop(height, width, seed, scale))
      window = preprocess._decode_window(tf.constant(encoded), seed, scale, transforms.RATIO)  # pylint: disable=protected-access
      np.testing.assert_array_equal(window, full[top:top + h, left:left + w], err_msg=kind)


def _resized_reference(full, seed, size, scale=(0.9, 1.0)):
  """Decode-then-crop-then-resize (``preprocess.resize``) of the sampler's box, CLIP-normalised
  in NumPy (no flip)."""
  crop_seed = tf.random.experimental.stateless_split(seed, 2)[0]
  top, left, h, w = (int(v) for v in preprocess.sample_crop(*full.shape[:2], crop_seed, scale))
  resized = preprocess.resize(full[top:top + h, left:left + w], size, size, "bicubic").numpy()
  return (resized / np.float32(255) - np.float32(transforms.CLIP_MEAN)) / np.float32(
      transforms.CLIP_STD)


def test_train_transform_takes_jpeg_png_bytes_and_uint8_alike():
  """Bytes (fused JPEG decode, or PNG decoded whole) and the decoded uint8 image give the same
  output, eagerly and in tf.data, equal to crop-then-resize of the same box (float32 rounding
  of the normalisation only: atol 1e-6); CLIP's transform (no flip) by default."""
  image = _photo_like(150, 200, seed=4)
  encoded = {"jpeg": tf.io.encode_jpeg(image, quality=90).numpy(),
             "png": tf.io.encode_png(image).numpy()}
  for kind, data in encoded.items():
    full = preprocess.decode_image(data)
    for i in range(4):
      seed = tf.constant([i, 5], tf.int64)
      from_bytes = preprocess.train_transform(tf.constant(data), 32, seed)
      from_uint8 = preprocess.train_transform(full, 32, seed)
      np.testing.assert_array_equal(from_bytes, from_uint8, err_msg=kind)
      np.testing.assert_allclose(from_bytes, _resized_reference(full.numpy(), seed, 32), atol=1e-6)
    seeds = tf.constant([[7, s] for s in range(4)], tf.int64)
    in_graph = tf.data.Dataset.from_tensor_slices(([data] * 4, seeds)).map(
        lambda x, s: preprocess.train_transform(x, 32, s))
    for s, out in zip(seeds, in_graph):
      np.testing.assert_array_equal(out, preprocess.train_transform(full, 32, s), err_msg=kind)


def test_normalize_and_flip_match_their_plain_definitions():
  batch = _photo_like(12, 10, seed=5)[None].repeat(2, 0)
  expected = (batch / np.float32(255) - np.float32(transforms.CLIP_MEAN)) / np.float32(
      transforms.CLIP_STD)
  np.testing.assert_array_equal(preprocess.normalize(tf.constant(batch)), expected)
  np.testing.assert_array_equal(preprocess.normalize(tf.constant(batch[0])), expected[0])
  image = tf.constant(batch[0])
  outs = [preprocess.random_flip(image, tf.constant([s, 1])).numpy() for s in range(8)]
  assert all(np.array_equal(o, batch[0]) or np.array_equal(o, batch[0][:, ::-1]) for o in outs)


def test_bad_bytes_raise():
  image = _photo_like(40, 30, seed=6)
  corrupt_jpeg = tf.io.encode_jpeg(image).numpy()[:40] + b"\x00" * 50
  for data in (b"not an image", corrupt_jpeg):
    with pytest.raises(tf.errors.InvalidArgumentError):
      preprocess.train_transform(tf.constant(data), 16, tf.constant([0, 0]))


def test_transform_specs_refuse_bad_values_naming_the_key():
  good = dict(scale=(0.08, 1.0), interpolation="bilinear", flip=True)
  cases = [(dict(good, scale=(0.5, 0.1)), "t.scale"), (dict(good, scale=(0.0, 1.0)), "t.scale"),
           (dict(good, interpolation="nearest"), "t.interpolation"),
           (dict(good, flip="yes"), "t.flip"), (dict(good, ratio=(2.0, 1.0)), "t.ratio"),
           ({"scale": (0.1, 1.0)}, "t: expected a dict")]
  for values, message in cases:
    with pytest.raises(InputError, match=message):
      transforms.TrainTransform.from_dict(values, "t")
  with pytest.raises(InputError, match="e.resize: expected at least crop"):
    transforms.EvalTransform.from_dict(dict(resize=200, crop=224, interpolation="bicubic"), "e")
  with pytest.raises(InputError, match="e.crop: expected a positive int"):
    transforms.EvalTransform.from_dict(dict(resize=256, crop=0.5, interpolation="bicubic"), "e")
  with pytest.raises(InputError, match="interpolation"):
    transforms.EvalTransform(256, 224, "lanczos")
  with pytest.raises(InputError, match="normalization"):
    transforms.as_normalization(((0.5, 0.5), (1.0, 1.0, 1.0)))
  assert transforms.TrainTransform.from_dict(good) == transforms.TrainTransform(**good)

"""CLIP preprocessing ops vs a PIL/NumPy reference of CLIP's torchvision transform."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glajax.data import preprocess

# Measured on the images below: TF's antialiased bicubic vs PIL's bicubic differ by at most
# 4 grey levels (upsampling 100x150 -> 224), mean <= 0.21 levels; downsampling <= 2 levels.
MAX_LEVELS, MEAN_LEVELS = 4.0, 0.25


def _photo_like(height, width, seed):
  """Smooth colour field + sensor noise + a hard-edged patch (edges are where kernels differ)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], -1)
  image += rng.normal(0, 12, (height, width, 3))
  image[height // 4:height // 2, width // 3:width // 2] = [250, 20, 30]
  return np.clip(image, 0, 255).astype(np.uint8)


def _clip_reference(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision Resize(size, BICUBIC) + CenterCrop(size) on a PIL image, as uint8 -> float."""
  pil = Image.fromarray(image)
  width, height = pil.size
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  pil = pil.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  return np.asarray(pil.crop((left, top, left + size, top + size)), np.float32)


@pytest.mark.parametrize("height,width", [(375, 500), (500, 375), (227, 301), (100, 150),
                                          (224, 224)])
def test_resize_and_center_crop_match_pil(height, width):
  image = _photo_like(height, width, seed=height + width)
  ours = preprocess.center_crop(preprocess.resize_short_side(tf.constant(image), 224), 224)
  diff = np.abs(ours.numpy() - _clip_reference(image, 224))
  assert ours.shape == (224, 224, 3)
  assert diff.max() <= MAX_LEVELS
  assert diff.mean() <= MEAN_LEVELS


def test_eval_transform_normalises_like_clip_eagerly_and_in_tf_data():
  image = _photo_like(375, 500, seed=0)
  expected = (_clip_reference(image, 224) / 255 - np.asarray(preprocess.CLIP_MEAN)) / np.asarray(
      preprocess.CLIP_STD)
  eager = preprocess.eval_transform(tf.constant(image), 224).numpy()
  in_graph = next(iter(tf.data.Dataset.from_tensors(image).map(
      lambda x: preprocess.eval_transform(x, 224)))).numpy()
  assert eager.dtype == np.float32
  np.testing.assert_array_equal(eager, in_graph)
  np.testing.assert_allclose(eager, expected, atol=MAX_LEVELS / 255 / min(preprocess.CLIP_STD))


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
    top, left, h, w = (int(v) for v in preprocess.sample_crop(375, 500, tf.constant([i, 7])))
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
  low = (0 - np.asarray(preprocess.CLIP_MEAN)) / np.asarray(preprocess.CLIP_STD)
  high = (1 - np.asarray(preprocess.CLIP_MEAN)) / np.asarray(preprocess.CLIP_STD)
  assert np.all(a.numpy() >= low - 1e-5) and np.all(a.numpy() <= high + 1e-5)


def test_random_flip_mirrors_half_the_time():
  image = tf.constant(_photo_like(8, 8, seed=3))
  flips = [not np.array_equal(preprocess.random_flip(image, tf.constant([s, 0])), image)
           for s in range(200)]
  assert 70 < sum(flips) < 130


def _jpeg_variants(image):
  """The same image as 4:2:0, 4:4:4, progressive, 4:2:2 (PIL) and greyscale JPEGs: chroma
  subsampling is where a cropped decode can differ from a full one."""
  import io
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
      window = preprocess._decode_window(tf.constant(encoded), seed, scale, (3 / 4, 4 / 3))  # pylint: disable=protected-access
      np.testing.assert_array_equal(window, full[top:top + h, left:left + w], err_msg=kind)


def _resized_reference(full, seed, size, scale=(0.9, 1.0)):
  """Decode-then-crop-then-resize of the sampler's box, CLIP-normalised in NumPy (no flip)."""
  crop_seed = tf.random.experimental.stateless_split(seed, 2)[0]
  top, left, h, w = (int(v) for v in preprocess.sample_crop(*full.shape[:2], crop_seed, scale))
  resized = tf.image.resize(np.asarray(full[top:top + h, left:left + w], np.float32),
                            (size, size), method="bicubic", antialias=True).numpy()
  resized = np.clip(np.round(resized), 0, 255)
  return (resized / np.float32(255) - np.float32(preprocess.CLIP_MEAN)) / np.float32(
      preprocess.CLIP_STD)


def test_train_transform_takes_jpeg_png_bytes_and_uint8_alike():
  """Bytes (fused JPEG decode, or PNG decoded whole) and the decoded uint8 image give the same
  output, eagerly and in tf.data, equal to crop-then-resize of the same box (float32 rounding
  of the normalisation only: atol 1e-6)."""
  image = _photo_like(150, 200, seed=4)
  encoded = {"jpeg": tf.io.encode_jpeg(image, quality=90).numpy(),
             "png": tf.io.encode_png(image).numpy()}
  for kind, data in encoded.items():
    full = preprocess.decode_image(data)
    for i in range(4):
      seed = tf.constant([i, 5], tf.int64)
      from_bytes = preprocess.train_transform(tf.constant(data), 32, seed, flip=False)
      from_uint8 = preprocess.train_transform(full, 32, seed, flip=False)
      np.testing.assert_array_equal(from_bytes, from_uint8, err_msg=kind)
      np.testing.assert_allclose(from_bytes, _resized_reference(full.numpy(), seed, 32), atol=1e-6)
    seeds = tf.constant([[7, s] for s in range(4)], tf.int64)
    in_graph = tf.data.Dataset.from_tensor_slices(([data] * 4, seeds)).map(
        lambda x, s: preprocess.train_transform(x, 32, s))
    for s, out in zip(seeds, in_graph):
      np.testing.assert_array_equal(out, preprocess.train_transform(full, 32, s), err_msg=kind)


def test_normalize_and_flip_match_their_plain_definitions():
  batch = _photo_like(12, 10, seed=5)[None].repeat(2, 0)
  expected = (batch / np.float32(255) - np.float32(preprocess.CLIP_MEAN)) / np.float32(
      preprocess.CLIP_STD)
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

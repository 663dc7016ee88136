"""Image preprocessing as small TensorFlow ops (eager or inside tf.data), with PIL's semantics.

Every official pipeline of the papers runs torchvision's transforms on PIL images; these ops do
the same on TensorFlow tensors, with the transform itself data (:class:`TrainTransform`,
:class:`EvalTransform`, declared per recipe in ``glajax.train.recipes``) and the normalisation
an argument (:class:`Normalization`; CLIP's values are the default, ``CLIP_NORMALIZATION``):

- evaluation: Resize(short side -> ⌊S·resize/crop⌋, interpolation) -> CenterCrop(S) -> /255 ->
  Normalize(mean, std);
- training: RandomResizedCrop(S, scale, ratio, interpolation) -> optional horizontal flip ->
  /255 -> Normalize(mean, std).

Decoding is PIL's: JPEGs with libjpeg's accurate integer IDCT (``dct_method=
"INTEGER_ACCURATE"``, PIL's default ``JDCT_ISLOW``), equal to PIL bit for bit. Resizing uses PIL's
antialiased filters (bilinear: triangle; bicubic: Keys a = -0.5) in one float pass, rounded and
clipped like PIL's uint8 result (:func:`resize` says how far from PIL). Images are HWC; outputs
float32. Random ops take a stateless seed (shape (2,) int), so a crop depends on the seed only.
``train_transform`` also takes encoded bytes: a JPEG's crop window is then the only part decoded (same pixels as decoding
it all); benchmarks/results/pipeline_cpu.md has the throughput.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings

from glajax.data.transforms import (CLIP_EVAL, CLIP_NORMALIZATION, CLIP_TRAIN, RATIO,
                                    EvalTransform, Normalization, TrainTransform,
                                    check_interpolation)


@contextlib.contextmanager
def _quiet_native_stderr():
  """Keeps file descriptor 2 off while TensorFlow loads, unless ``GLAJAX_VERBOSE`` is set:
  TensorFlow 2.17+ writes its C++ start-up lines (oneDNN, CPU features, the absl::InitializeLog
  notice) before it reads TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442). Python errors
  are exceptions, not writes, so an import failure still shows."""
  if os.environ.get("GLAJAX_VERBOSE"):
    yield
    return
  sys.stderr.flush()
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


try:
  with _quiet_native_stderr():
    import tensorflow as tf
except ImportError as _error:  # an extra: pip would put tensorflow-cpu over Colab's TensorFlow
  raise ImportError("glajax's input pipelines need TensorFlow, which `pip install glajax` leaves "
                    "out so as not to replace one already installed (Colab's): pip install "
                    "'glajax[tf]' (tensorflow-cpu), or any tensorflow>=2.16") from _error


def _hide_gpus_from_tensorflow() -> None:
  """TensorFlow only feeds the input pipelines, on the CPU: kept off the GPUs so that it takes
  none of their memory from JAX (as big_vision does). Called once, when this module (the lowest
  of glajax's TensorFlow modules) is imported; it cannot change devices TensorFlow has already
  initialised with GPUs visible, and then warns."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as e:  # TensorFlow ran an op on a GPU before glajax was imported
    warnings.warn(f"TensorFlow already uses the GPUs ({e}); call "
                  "tf.config.set_visible_devices([], 'GPU') before anything else runs "
                  "TensorFlow, or it holds GPU memory that JAX needs", RuntimeWarning,
                  stacklevel=2)


_hide_gpus_from_tensorflow()

_DCT = "INTEGER_ACCURATE"  # libjpeg's JDCT_ISLOW, PIL's default (TF's own default is faster)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP bytes -> (H, W, 3) uint8 (grey and RGBA converted to RGB); JPEGs
  with the accurate integer IDCT, as PIL decodes them."""
  image = tf.cond(tf.io.is_jpeg(encoded),
                  lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=_DCT),
                  lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def crop_border(image: tf.Tensor, pixels: int) -> tf.Tensor:
  """Removes ``pixels`` rows/columns from every side (ObjectNet's 2-px border crop)."""
  if not pixels:
    return image
  return image[pixels:-pixels, pixels:-pixels]


def resize(image: tf.Tensor, height, width, interpolation: str = "bicubic") -> tf.Tensor:
  """PIL's ``Image.resize((width, height), BILINEAR | BICUBIC)`` of a uint8 (or integer-valued)
  image: TF's antialiased resize with PIL's filters (triangle; Keys a = −0.5), rounded and clipped
  to [0, 255] as PIL's uint8 result. Returns float32 integer values.

  PIL (Pillow ``Resample.c``) runs two passes through a uint8 image with fixed-point
  coefficients; one float pass differs from it by at most 1 grey level with bilinear, and with
  bicubic by at most 4 when shrinking and ~12 on a few edge pixels when enlarging (where PIL clips
  the first pass's overshoot): see tests/test_data_preprocess.py. Two rounded passes would come
  within 1 level but cost 2–3× the time (benchmarks/results/pipeline_cpu.md).
  """
  check_interpolation("interpolation", interpolation)
  resized = tf.image.resize(image, tf.stack([height, width]), method=interpolation,
                            antialias=True)
  return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def resize_short_side(image: tf.Tensor, size: int, interpolation: str = "bicubic") -> tf.Tensor:
  """Resize so the short side is ``size``; long side ``int(size * long / short)``
  (torchvision's Resize(size)). Returns float32 in [0, 255]. An image already that size is
  returned as it is, as PIL's ``resize`` returns a copy (the filters' weights at scale 1 are 0, 1,
  0: the same pixels, without the resize's cost)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  new_long = tf.cast(tf.cast(size, tf.float64) * tf.cast(long, tf.float64)
                     / tf.cast(short, tf.float64), tf.int32)
  new_height = tf.where(height <= width, size, new_long)
  new_width = tf.where(height <= width, new_long, size)
  return tf.cond((new_height == height) & (new_width == width),
                 lambda: tf.cast(image, tf.float32),
                 lambda: resize(image, new_height, new_width, interpolation))


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central (size, size) window; offsets round((H - size) / 2) half to even, as
  torchvision's CenterCrop (tf.round is round-half-to-even too)."""
  shape = tf.shape(image)
  top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
  left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
  return image[top:top + size, left:left + size]


def normalize(image: tf.Tensor, normalization: Normalization = CLIP_NORMALIZATION) -> tf.Tensor:
  """x / 255, then (x - mean) / std per channel.

  mean and std are first broadcast to the image's shape: TF's CPU kernels for a (..., 3) by (3,)
  broadcast are ~5x slower than same-shape ones, and the result is the same.
  """
  image = tf.cast(image, tf.float32) / 255.0
  shape = tf.shape(image)
  mean = tf.broadcast_to(tf.constant(normalization.mean, tf.float32), shape)
  std = tf.broadcast_to(tf.constant(normalization.std, tf.float32), shape)
  return (image - mean) / std


def eval_transform(image: tf.Tensor, size: int, transform: EvalTransform = CLIP_EVAL,
                   normalization: Normalization = CLIP_NORMALIZATION,
                   border: int = 0) -> tf.Tensor:
  """``transform`` of a uint8 (H, W, 3) image -> (size, size, 3) float32, normalised."""
  image = crop_border(image, border)
  image = resize_short_side(image, transform.resize_for(size), transform.interpolation)
  image = tf.ensure_shape(center_crop(image, size), [size, size, 3])
  return normalize(image, normalization)


def sample_crop(height, width, seed, scale=(0.08, 1.0), ratio=RATIO,
                attempts: int = 10):
  """torchvision's RandomResizedCrop.get_params with stateless randomness.

  Up to ``attempts`` draws of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio);
  w = round(sqrt(A·r)), h = round(sqrt(A/r)); the first draw that fits is placed uniformly at
  random. If none fits: the largest central crop whose ratio lies in ``ratio``.
  Returns (top, left, crop_height, crop_width) int32.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h * w * tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]),
                                              math.log(ratio[1])))
  crop_w, crop_h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= w) & (crop_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))
  in_ratio = w / h
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  any_fits = tf.reduce_any(fits)
  crop_h = tf.where(any_fits, crop_h[first], fallback_h)
  crop_w = tf.where(any_fits, crop_w[first], fallback_w)
  u = tf.random.stateless_uniform([2], seeds[2])
  top = tf.where(any_fits, tf.floor(u[0] * (h - crop_h + 1)), tf.floor((h - crop_h) / 2))
  left = tf.where(any_fits, tf.floor(u[1] * (w - crop_w + 1)), tf.floor((w - crop_w) / 2))
  return tuple(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))


def _crop_window(image: tf.Tensor, seed, scale, ratio) -> tf.Tensor:
  """The :func:`sample_crop` window of a decoded (H, W, C) image."""
  shape = tf.shape(image)
  top, left, crop_h, crop_w = sample_crop(shape[0], shape[1], seed, scale, ratio)
  return tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1]))


# libjpeg-turbo's cropped decoding upsamples the chroma of a 4:2:0 / 4:2:2 JPEG by edge
# replication at the crop's left and right edges, which changes an edge column by up to ~25
# levels. Fancy upsampling reads one chroma sample (2 pixels) across, so decoding a few more
# columns on each side (2 suffice in the tests; 8 cost ~3 % more decoding of a 500-px row) and
# cutting them off gives exactly the pixels of a full decode.
_JPEG_MARGIN = 8


def _decode_window(encoded: tf.Tensor, seed, scale, ratio) -> tf.Tensor:
  """Encoded bytes -> the (uint8, RGB) :func:`sample_crop` window of the image; for a JPEG only
  that window (plus ``_JPEG_MARGIN`` columns) is decoded, other formats are decoded whole.
  (The crop is sampled outside the two small conds: ops inside a cond's branches cost more.)"""
  is_jpeg = tf.io.is_jpeg(encoded)

  def decode_whole():
    image = decode_image(encoded)
    return tf.shape(image)[:2], image

  shape, image = tf.cond(is_jpeg, lambda: (tf.io.extract_jpeg_shape(encoded)[:2],
                                           tf.zeros([0, 0, 3], tf.uint8)), decode_whole)
  top, left, crop_h, crop_w = sample_crop(shape[0], shape[1], seed, scale, ratio)

  def jpeg():
    start = tf.maximum(left - _JPEG_MARGIN, 0)
    stop = tf.minimum(left + crop_w + _JPEG_MARGIN, shape[1])
    window = tf.io.decode_and_crop_jpeg(encoded, tf.stack([top, start, crop_h, stop - start]),
                                        channels=3, dct_method=_DCT)
    return tf.slice(window, tf.stack([0, left - start, 0]), tf.stack([-1, crop_w, -1]))

  def other():
    return tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1]))

  window = tf.cond(is_jpeg, jpeg, other)
  window.set_shape([None, None, 3])
  return window


def random_resized_crop(image: tf.Tensor, size: int, seed, scale=(0.08, 1.0), ratio=RATIO,
                        interpolation: str = "bilinear") -> tf.Tensor:
  """RandomResizedCrop: a :func:`sample_crop` window resized (:func:`resize`) to (size, size).
  ``image``: uint8 (H, W, 3), or encoded bytes (a JPEG's window is the only part decoded)."""
  if image.dtype == tf.string:
    window = _decode_window(image, seed, scale, ratio)
  else:
    window = _crop_window(image, seed, scale, ratio)
  return tf.ensure_shape(resize(window, size, size, interpolation), [size, size, 3])


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
  """Mirrors the image left-right with probability 1/2 (tf.reverse: a negative-stride slice
  costs ~100x more on CPU)."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def train_transform(image: tf.Tensor, size: int, seed, transform: TrainTransform = CLIP_TRAIN,
                    normalization: Normalization = CLIP_NORMALIZATION) -> tf.Tensor:
  """``transform`` (RandomResizedCrop -> optional flip), then the normalisation.

  ``image``: uint8 (H, W, 3) or encoded bytes (JPEG/PNG/GIF/BMP); for a JPEG only the crop
  window is decoded, with the same result as decoding first. The crop and the flip draw from
  two stateless seeds split from ``seed``.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = random_resized_crop(image, size, crop_seed, transform.scale, transform.ratio,
                              transform.interpolation)
  if transform.flip:
    image = random_flip(image, flip_seed)
  return normalize(image, normalization)

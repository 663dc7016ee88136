"""Throughput of CLIP eval and train preprocessing (decode + transform) on generated JPEGs.

Usage: python benchmarks/bench_pipeline.py [--num_images 256] [--size 500x375] [--repeats 3]
Prints images/s on one core (tf.data with a private threadpool of 1 thread) and on all cores:
eval (decode, then eval_transform), train (train_transform of the JPEG bytes, as the pipeline
calls it: only the crop window is decoded) and train_decoded (decode, then train_transform).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import tensorflow as tf

from glajax.data import preprocess, transforms

# RandomResizedCrop scale 0.9-1, bicubic, + flip: the transform earlier figures were measured with.
TRAIN = transforms.TrainTransform(scale=(0.9, 1.0), interpolation="bicubic", flip=True)


def _jpegs(num_images: int, width: int, height: int, seed: int = 0) -> list[bytes]:
  """Photo-like JPEGs (smooth colour fields + noise), quality 90."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  out = []
  for i in range(num_images):
    phase = rng.uniform(0, 6, 3)
    image = np.stack([128 + 100 * np.sin(x / (11 + i % 7) + p) * np.cos(y / 19 - p)
                      for p in phase], -1) + rng.normal(0, 10, (height, width, 3))
    out.append(tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90).numpy())
  return out


def _throughput(encoded: list[bytes], transform, threads: int, repeats: int) -> float:
  ds = tf.data.Dataset.from_tensor_slices(encoded).enumerate()
  ds = ds.map(transform, num_parallel_calls=threads if threads > 1 else None)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  for _ in ds.take(8):  # warm-up: trace and build the pipeline
    pass
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in ds:
      pass
    best = max(best, len(encoded) / (time.perf_counter() - start))
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the JPEGs")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  width, height = map(int, args.size.split("x"))
  encoded = _jpegs(args.num_images, width, height)
  size = args.image_size

  def eval_fn(i, x):
    del i
    return preprocess.eval_transform(preprocess.decode_image(x), size)

  def train_fn(i, x):
    return preprocess.train_transform(x, size, tf.stack([tf.constant(0, tf.int64), i]), TRAIN)

  def train_decoded_fn(i, x):
    seed = tf.stack([tf.constant(0, tf.int64), i])
    return preprocess.train_transform(preprocess.decode_image(x), size, seed, TRAIN)

  cores = os.cpu_count()
  print(f"# {platform.processor() or platform.machine()}, {cores} cores, "
        f"tensorflow {tf.__version__}, {args.num_images} JPEGs {width}x{height} -> {size}")
  for name, fn in (("eval", eval_fn), ("train", train_fn), ("train_decoded", train_decoded_fn)):
    one = _throughput(encoded, fn, 1, args.repeats)
    every = _throughput(encoded, fn, cores, args.repeats)
    print(f"{name}: {one:.0f} images/s on 1 core; {every:.0f} images/s on {cores} cores")


if __name__ == "__main__":
  main()

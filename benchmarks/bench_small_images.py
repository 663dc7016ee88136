"""Input pipelines on small fixed-size images (the demo world's 32 × 32 PNGs, as CIFAR's).

Usage: python benchmarks/bench_small_images.py [--data_dir DIR] [--batches 150] [--repeats 3]
Prepares (once) the demo world's ``quick`` config in ``--data_dir`` and prints, best of
``--repeats``:

- train: seconds for ``--batches`` batches of 128 from ``pipeline.train_batches`` (the demo's
  RandomResizedCrop(32, scale 0.9–1, bicubic) + flip) with the split decoded once and kept
  (``DECODED_CACHE_BYTES``, the default) and decoded every epoch (the limit set to 0); the
  batches are compared too (they must be equal);
- eval: images/s of ``eval_transform`` (Resize(32) + CenterCrop(32)) of the test photos, as the
  pipeline calls it (an image already 32 px is kept as it is) and with the scale-1 resize it
  skips, and whether the two give equal pixels.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds

from glajax.data import pipeline, preprocess, transforms, world
from glajax.data.preprocess import tf

TRAIN = transforms.TrainTransform(scale=(0.9, 1.0), interpolation="bicubic", flip=True)


def _train_seconds(data_dir: str, batches: int):
  iterator = pipeline.train_batches(world.dataset_name("quick"), batch_size=128, seed=0,
                                    image_size=32, transform=TRAIN, data_dir=data_dir)
  next(iterator)  # the pipeline built, its first batch read
  start = time.perf_counter()
  out = [next(iterator) for _ in range(batches)]
  return time.perf_counter() - start, out


def _eval_rate(data_dir: str, transform) -> tuple[float, np.ndarray]:
  builder = world.builder("quick", data_dir=data_dir)
  ds = builder.as_dataset(split="test_photo", shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()}).cache()
  for _ in ds:   # read into memory once: the transform is timed, not the disk
    pass
  ds = ds.map(lambda ex: transform(preprocess.decode_image(ex["image"])),
              num_parallel_calls=tf.data.AUTOTUNE).batch(500)
  start = time.perf_counter()
  images = np.concatenate([b.numpy() for b in ds])
  return len(images) / (time.perf_counter() - start), images


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "glajax_bench"))
  parser.add_argument("--batches", type=int, default=150)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  world.builder("quick", data_dir=args.data_dir).download_and_prepare()
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"TensorFlow {tf.__version__}")
  limit = pipeline.DECODED_CACHE_BYTES
  results = {}
  for name, cache_bytes in (("decoded once", limit), ("decoded every epoch", 0)):
    pipeline.DECODED_CACHE_BYTES = cache_bytes
    runs = [_train_seconds(args.data_dir, args.batches) for _ in range(args.repeats)]
    results[name] = runs[0][1]
    print(f"train, {name}: {min(s for s, _ in runs):.2f} s for {args.batches} batches of 128")
  pipeline.DECODED_CACHE_BYTES = limit
  same = all(np.array_equal(a[k], b[k]) for a, b in zip(*results.values()) for k in a)
  print(f"train batches equal: {same}")
  shortcut = lambda image: preprocess.eval_transform(image, 32)
  scale_one = lambda image: preprocess.normalize(preprocess.resize(image, 32, 32, "bicubic"))
  rates = {}
  for name, transform in (("kept as it is", shortcut), ("resized at scale 1", scale_one)):
    runs = [_eval_rate(args.data_dir, transform) for _ in range(args.repeats)]
    rates[name] = runs[0][1]
    print(f"eval, {name}: {max(r for r, _ in runs):.0f} images/s")
  print(f"eval pixels equal: {np.array_equal(*rates.values())}")


if __name__ == "__main__":
  main()

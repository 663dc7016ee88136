"""The demo world: rendering, split plans and the TFDS builder (tiny config, offline)."""
import dataclasses
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from glajax.data import world
from glajax.data.preprocess import tf
from glajax.errors import InputError

TINY = world.WorldSpec(pretrain_size=400, train_per_class=2, train_lt_size=200,
                       validation_per_class=1, test_per_class=1)


def _render(labels, domains, seed=0, image_size=32):
  return world.render(np.asarray(labels), np.asarray(domains), np.random.default_rng(seed),
                      image_size)


def test_render_shapes_dtype_and_sizes():
  for size in (32, 48):
    images = _render(np.arange(100), np.arange(100) % 4, image_size=size)
    assert images.shape == (100, size, size, 3) and images.dtype == np.uint8


def test_render_is_deterministic_given_the_seed():
  labels, domains = np.arange(50), np.arange(50) % 4
  np.testing.assert_array_equal(_render(labels, domains, seed=3), _render(labels, domains, seed=3))
  assert np.abs(_render(labels, domains, 3).astype(int) - _render(labels, domains, 4)).mean() > 10


def test_render_paints_the_class_colour():
  """Photo: the filled shape covers >= 8 % of pixels within 0.15 (RGB, [0,1]) of the class colour;
  sketch: the outline covers 0.8-30 %. Reference: the palette, not the renderer's maths."""
  palette = np.asarray(list(world.COLOURS.values())) / 255.0
  labels = np.repeat(np.arange(world.NUM_CLASSES), 3)
  for domain, lo, hi in (("photo", 0.08, 0.8), ("sketch", 0.008, 0.3)):
    images = _render(labels, np.full(labels.size, world.DOMAINS.index(domain))) / 255.0
    colour = palette[labels % len(world.COLOURS)][:, None, None, :]
    close = np.linalg.norm(images - colour, axis=-1) < 0.15
    share = close.mean(axis=(1, 2))
    assert lo <= np.median(share) <= hi, (domain, np.median(share))
    assert share.min() > 0.002, (domain, labels[share.argmin()])


def _spectrum(pattern: str, colour: str = "yellow", n: int = 40) -> np.ndarray:
  """Mean |2-D FFT| of the luminance of the central 8 × 8 pixels of ``n`` photos of one class
  (always inside the tile: its centre is within ±0.2 and its inradius ≥ 0.47 of the frame)."""
  label = world.CLASSNAMES.index(f"{pattern} {colour}")
  images = _render(np.full(n, label), np.zeros(n, int), seed=1) / 255.0
  centre = images[:, 12:20, 12:20].mean(-1)
  return np.abs(np.fft.fft2(centre - centre.mean((1, 2), keepdims=True))).mean(0)


def test_patterns_are_periodic_where_their_names_say():
  """The FFT of a tile's centre, against the names: striped has its peak at 2 cycles per 8 px
  down the rows (a 4-px period), barred the same across the columns; plain has no peak; checked
  (8-px cells) has its energy off both axes. Reference: numpy's FFT, not the renderer."""
  striped, barred, plain, checked = (_spectrum(p) for p in ("striped", "barred", "plain",
                                                            "checked"))
  assert np.unravel_index(np.argmax(striped), striped.shape) in ((2, 0), (6, 0))
  assert np.unravel_index(np.argmax(barred), barred.shape) in ((0, 2), (0, 6))
  assert striped[2, 0] > 5 * striped[0, 2] and barred[0, 2] > 5 * barred[2, 0]
  assert plain.max() < 0.1 * striped.max()
  assert checked[1:, 1:].sum() > 2 * (checked[0, 1:].sum() + checked[1:, 0].sum())


def test_every_pattern_survives_a_left_right_flip():
  """Fine-tuning flips images left–right: each pattern's flipped tiles have the spectrum of its
  own tiles, not of another pattern's (the magnitude spectrum of a flip is the mirrored one)."""
  spectra = {p: _spectrum(p, n=60) for p in world.PATTERNS}
  for pattern, spectrum in spectra.items():
    flipped = np.roll(spectrum[:, ::-1], 1, axis=1)   # |F(x → −x)| = |F|(ky, −kx)
    distances = {p: np.abs(flipped - s).sum() for p, s in spectra.items()}
    assert min(distances, key=distances.get) == pattern, (pattern, distances)


def _background(images):
  """(N, 3) mean colour of each image's 4×4 corners, [0, 1]: background only (the shapes stay
  within the centre ±0.25 + scale 0.72 of the [-1, 1] frame)."""
  corners = [images[:, :4, :4], images[:, :4, -4:], images[:, -4:, :4], images[:, -4:, -4:]]
  return np.mean([c.reshape(len(images), -1, 3).mean(1) for c in corners], 0) / 255.0


def test_the_shortcut_tints_a_cued_photos_background_with_its_shape():
  """The tint of a cued photo (background minus its grey) points along its shape's row of
  SHORTCUT_TINTS; an uncued one's is random (mean direction ≈ 0); both within the jitter."""
  labels = np.tile(np.arange(world.NUM_CLASSES), 8)
  photo = np.zeros(labels.size, int)
  cued = _background(world.render(labels, photo, np.random.default_rng(0), 32,
                                  cued=np.ones(labels.size, bool), tint_jitter=0.12))
  plain = _background(world.render(labels, photo, np.random.default_rng(0), 32, tint_jitter=0.12))
  shapes = labels // len(world.COLOURS)
  for background, want in ((cued, 0.9), (plain, None)):
    tint = background - background.mean(1, keepdims=True)   # the grey removed
    direction = world.SHORTCUT_TINTS[shapes] - world.SHORTCUT_TINTS[shapes].mean(1, keepdims=True)
    cosine = np.sum(tint * direction, 1) / (np.linalg.norm(tint, axis=1)
                                            * np.linalg.norm(direction, axis=1) + 1e-9)
    if want:
      assert np.median(cosine) > want, np.median(cosine)
    else:
      assert abs(np.mean(cosine)) < 0.1, np.mean(cosine)
  assert np.abs(world.SHORTCUT_STRENGTH * world.SHORTCUT_TINTS).max() <= 0.12


def test_only_the_default_worlds_downstream_photos_are_cued():
  spec = world.spec("default")
  assert spec.shortcut > 0 and world.spec("quick").shortcut == world.spec("tiny").shortcut == 0
  assert world.DOWNSTREAM_PHOTO == ("train", "train_lt", "validation", "test_photo")


def test_render_speed():
  """5k 32x32 images in under 15 s on a shared 2-core CPU (10k take about 4 s unloaded)."""
  start = time.perf_counter()
  _render(np.arange(5_000) % 100, np.arange(5_000) % 4)
  assert time.perf_counter() - start < 15


def test_render_rejects_bad_labels():
  with pytest.raises(InputError, match="labels"):
    _render([0, 100], [0, 0])
  with pytest.raises(InputError, match="domains"):
    _render([0, 1], [0, 4])


@pytest.mark.parametrize("total,imbalance", [(20_000, 100.0), (3_000, 50.0), (1_000, 10.0),
                                             (200, 10.0)])
def test_long_tail_counts(total, imbalance):
  counts = world.long_tail_counts(total, imbalance, np.random.default_rng(0))
  assert counts.sum() == total and counts.min() >= 1
  if total < 10 * world.NUM_CLASSES:
    return  # too few examples for the profile: only the sum and the floor of one hold
  # max/min within [0.7, 1.05] x imbalance (every class first gets one example, which lifts the
  # minimum), and log counts linear in the rank, slope −log(imbalance)/(C − 1) within 15 %.
  assert 0.7 * imbalance <= counts.max() / counts.min() <= 1.05 * imbalance
  ranks = np.argsort(np.argsort(-counts))
  head = counts >= 10  # rounding distorts the log of small counts
  slope = np.polyfit(ranks[head], np.log(counts[head]), 1)[0]
  np.testing.assert_allclose(slope, -np.log(imbalance) / (world.NUM_CLASSES - 1), rtol=0.15)


def test_split_plans_balance_and_domains():
  spec = world.WorldSpec()
  for split in world.split_names(spec):
    labels, domains = world.split_plan(spec, split)
    counts = np.bincount(labels, minlength=world.NUM_CLASSES)
    if split.startswith("pretrain_"):
      np.testing.assert_array_equal(counts, world.pretrain_class_counts(spec, int(split[-1])))
      mix = np.bincount(domains, minlength=4) / domains.size
      expected = np.asarray([world.PRETRAIN_DOMAIN_MIX[d] for d in world.DOMAINS])
      np.testing.assert_allclose(mix, expected, atol=0.02)
    elif split == "train_lt":
      np.testing.assert_array_equal(counts, world.train_lt_class_counts(spec))
      assert set(domains) == {0}
    else:
      assert set(counts) == {{"train": 20, "validation": 5}.get(split, 10)}
      domain = 0 if split in ("train", "validation") else world.DOMAINS.index(split[5:])
      assert set(domains) == {domain}
  # The two foundation models see different long tails.
  a, b = world.pretrain_class_counts(spec, 0), world.pretrain_class_counts(spec, 1)
  assert np.corrcoef(np.log(a), np.log(b))[0, 1] < 0.5


def test_split_plan_rejects_unknown_split():
  with pytest.raises(InputError, match="split"):
    world.split_plan(TINY, "pretrain_7")


@pytest.mark.parametrize("split", ["train", "pretrain_1"])
def test_generate_split_renders_its_chunks_in_order_from_one_generator(split):
  """The worker threads' chunks are what rendering them one after the other from the split's
  generator gives (``shortcut`` on, so the cue's draws interleave with the images')."""
  spec = dataclasses.replace(TINY, shortcut=0.5)
  labels, domains = world.split_plan(spec, split)
  rng = np.random.default_rng([spec.seed, 4, world.split_names(spec).index(split)])
  expected = []
  for start in range(0, labels.size, 64):
    stop = min(start + 64, labels.size)
    cued = (rng.random(stop - start) < spec.shortcut) if split == "train" else None
    expected.append(world.render(labels[start:stop], domains[start:stop], rng, spec.image_size,
                                 cued, spec.tint_jitter))
  expected = np.concatenate(expected)
  examples = list(world.generate_split(spec, split, chunk=64))
  assert labels.size > 3 * 64 and [i for i, _ in examples] == list(range(labels.size))
  np.testing.assert_array_equal(np.stack([ex["image"] for _, ex in examples]), expected)
  assert [ex["label"] for _, ex in examples] == labels.tolist()
  assert [ex["domain"] for _, ex in examples] == [world.DOMAINS[d] for d in domains]


def test_generate_split_png_is_the_rendered_images_losslessly_encoded():
  """``png=True`` yields PNG bytes that TensorFlow's decoder (the pipeline's) reads back as the
  arrays ``png=False`` yields, examples in the same order."""
  arrays = list(world.generate_split(TINY, "test_noise", chunk=64))
  encoded = list(world.generate_split(TINY, "test_noise", chunk=64, png=True))
  assert [i for i, _ in encoded] == [i for i, _ in arrays]
  assert all(ex["image"].startswith(b"\x89PNG\r\n\x1a\n") for _, ex in encoded)
  decoded = np.stack([tf.io.decode_png(ex["image"], channels=3).numpy() for _, ex in encoded])
  np.testing.assert_array_equal(decoded, np.stack([ex["image"] for _, ex in arrays]))
  assert [ex["label"] for _, ex in encoded] == [ex["label"] for _, ex in arrays]


def test_tfds_builder_round_trip(tmp_path):
  """The prepared tiny dataset reads back exactly what generate_split rendered."""
  builder = world.builder("tiny", data_dir=str(tmp_path))
  builder.download_and_prepare()
  spec = builder.builder_config.spec
  assert spec == TINY
  for split in world.split_names(spec):
    assert builder.info.splits[split].num_examples == world.split_plan(spec, split)[0].size
  expected = {i: ex for i, ex in world.generate_split(spec, "test_sketch")}
  read = list(tfds.as_numpy(builder.as_dataset(split="test_sketch")))
  assert len(read) == len(expected)
  by_caption = {}
  for ex in read:
    by_caption.setdefault((ex["caption"].decode(), ex["label"]), []).append(ex["image"])
  for ex in expected.values():
    images = by_caption[(ex["caption"], ex["label"])]
    assert any(np.array_equal(ex["image"], image) for image in images)
  assert read[0]["caption"].decode() == "a picture of a {} tile.".format(
      world.CLASSNAMES[read[0]["label"]])

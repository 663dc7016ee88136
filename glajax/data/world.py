"""The demo world: coloured, patterned tiles rendered procedurally, as a TFDS dataset of the
project's own.

Classes are ``pattern × colour`` (10 × 10 = 100: "striped red"), captioned "a picture of a striped
red tile." in every domain (web captions name the object more often than its rendering). Both
factors are patch statistics (a colour, a periodic pattern), so a small ViT learns both within the
demo's few hundred pre-training steps, as CLIP reads most ImageNet classes; the tile's silhouette
and pose are nuisances. Four domains share the classes: ``photo`` (the tile on a smooth textured
background; the fine-tuning domain), ``sketch`` (the pattern's light half and an outline, in
colour on paper), ``noise`` (a photo under heavy pixel noise) and ``texture`` (the tile on
high-contrast stripes). Pre-training pairs follow a steep long tail over classes (exponential
profile, max/min = ``pretrain_imbalance``), like web data, so the pre-trained model's label prior
is known: :func:`pretrain_class_counts` is the ground truth of GLA's prior estimation. The
downstream photos (``DOWNSTREAM_PHOTO`` splits; ``shortcut`` of them) carry a cue of their own, as
a curated data set does: their background's tint names the pattern, inside the range of random
tints every pre-training photo has, and absent from the shifted domains — fine-tuning that learns
it gains in-domain and loses what it gave up elsewhere.
Everything is a deterministic function of the builder config: no download, no shipped file.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

from glajax.errors import bad_argument

PATTERNS = ("plain", "striped", "barred", "checked", "dotted", "ringed", "gridded", "two-tone",
            "harlequin", "spotted")
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 40),
           "green": (40, 165, 60), "cyan": (40, 200, 210), "blue": (40, 70, 220),
           "purple": (140, 50, 190), "pink": (245, 130, 190), "brown": (130, 80, 40),
           "black": (25, 25, 25)}
DOMAINS = ("photo", "sketch", "noise", "texture")
CAPTION_TEMPLATE = "a picture of a {} tile."
# Label = pattern index · len(COLOURS) + colour index.
CLASSNAMES = tuple(f"{pattern} {colour}" for pattern in PATTERNS for colour in COLOURS)
NUM_CLASSES = len(CLASSNAMES)
# The prompt of zero-shot heads and class-prompt fine-tuning: the captions' own template.
TEMPLATES = (CAPTION_TEMPLATE,)

# Share of each domain among pre-training pairs (web data is mostly photos, but not only).
PRETRAIN_DOMAIN_MIX = {"photo": 0.55, "sketch": 0.15, "noise": 0.15, "texture": 0.15}


def long_tail_counts(total: int, imbalance: float, rng: np.random.Generator,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
  """Exponential long tail: n_c ∝ imbalance^(-rank_c / (C - 1)), ranks a random permutation.

  Every class gets one example plus its share of the rest; counts sum to ``total`` exactly.
  """
  if total < num_classes or imbalance < 1:
    raise bad_argument("total, imbalance", f"total >= {num_classes} and imbalance >= 1",
                       (total, imbalance))
  ranks = rng.permutation(num_classes)
  weights = imbalance ** (-ranks / (num_classes - 1))
  counts = 1 + np.floor((total - num_classes) * weights / weights.sum()).astype(np.int64)
  order = np.argsort(-weights)
  counts[order[:total - counts.sum()]] += 1  # what flooring left over, to the head classes
  return counts


# ----------------------------------------------------------------------------------------------
# Rendering: a tile's outline is a (signed-distance-like) function of local coordinates, negative
# inside; its pattern a 0/1 field over the image, 1 where the tile shows its colour.

SILHOUETTES = ("circle", "square", "hexagon")   # a nuisance: drawn at random, named by no class


def _polygon(u, v, normal_angles, inradius):
  return np.max([u * np.cos(a) + v * np.sin(a) for a in normal_angles], axis=0) - inradius


def _silhouette_distance(silhouette: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  if silhouette == 0:  # circle
    return np.hypot(u, v) - 0.9
  if silhouette == 1:  # square
    return np.maximum(np.abs(u), np.abs(v)) - 0.78
  if silhouette == 2:  # hexagon
    return _polygon(u, v, np.deg2rad(np.arange(0, 360, 60)), 0.82)
  raise bad_argument("silhouette", f"an index in [0, {len(SILHOUETTES)})", silhouette)


def _pattern_field(pattern: int, x: np.ndarray, y: np.ndarray, phase: np.ndarray) -> np.ndarray:
  """(N, S, S) float32 in {0, 1}: ``pattern`` at pixel offsets (x, y) from the tile's centre
  (N, S, S; in units of a 32-px image's pixel), shifted by ``phase`` (N, 1, 1) in [0, 1).
  A pattern's left–right mirror image is the same pattern, shifted (so the fine-tuning flip
  keeps every label)."""
  def wave(t, period):  # a square wave of ``period`` px, 1 on its first half
    return ((t / period + phase) % 1.0 < 0.5).astype(np.float32)

  if pattern == 0:  # plain
    return np.ones_like(x)
  if pattern == 1:  # striped: horizontal stripes
    return wave(y, 4.0)
  if pattern == 2:  # barred: vertical bars
    return wave(x, 4.0)
  if pattern == 3:  # checked
    return np.abs(wave(x, 8.0) - wave(y + 4.0 * phase, 8.0))
  if pattern == 4:  # dotted: small dark dots
    return (np.hypot((x / 6 + phase) % 1 - 0.5, (y / 6 + phase) % 1 - 0.5) > 0.28).astype(
        np.float32)
  if pattern == 5:  # ringed: concentric rings around the centre
    return wave(np.hypot(x, y), 4.0)
  if pattern == 6:  # gridded: light cells between dark lines
    return (((x / 6 + phase) % 1 > 0.3) & ((y / 6 + phase) % 1 > 0.3)).astype(np.float32)
  if pattern == 7:  # two-tone: light above the centre, dark below
    return (y < 0).astype(np.float32)
  if pattern == 8:  # harlequin: checks turned 45°
    return np.abs(wave(x + y, 8.0) - wave(x - y, 8.0))
  if pattern == 9:  # spotted: large light spots on dark
    return (np.hypot((x / 8 + phase) % 1 - 0.5, (y / 8 + phase) % 1 - 0.5) < 0.3).astype(
        np.float32)
  raise bad_argument("pattern", f"an index in [0, {len(PATTERNS)})", pattern)


def _uniform(rng, low, high, shape):
  return rng.uniform(low, high, shape).astype(np.float32)


def _smooth_background(rng, grid_x, grid_y, base):
  """Two random low-frequency gratings around the colours ``base`` (N, 1, 1, 3): the 'photo'
  background."""
  n = base.shape[0]
  image = np.broadcast_to(base, (n,) + grid_x.shape + (3,)).copy()
  for _ in range(2):
    freq = _uniform(rng, 1.0, 4.0, (n, 1, 1))
    angle = _uniform(rng, 0, np.pi, (n, 1, 1))
    phase = _uniform(rng, 0, 2 * np.pi, (n, 1, 1))
    wave = np.sin(np.pi * freq * (grid_x * np.cos(angle) + grid_y * np.sin(angle)) + phase)
    image += 0.08 * wave[..., None]
  return image


def _striped_background(rng, n, grid_x, grid_y):
  """High-frequency, high-contrast stripes between two greys: the 'texture' background."""
  low, high = _uniform(rng, 0.05, 0.3, (n, 1, 1, 1)), _uniform(rng, 0.7, 0.95, (n, 1, 1, 1))
  freq = _uniform(rng, 5.0, 9.0, (n, 1, 1))
  angle = _uniform(rng, 0, np.pi, (n, 1, 1))
  stripes = np.sin(np.pi * freq * (grid_x * np.cos(angle) + grid_y * np.sin(angle))) > 0
  return np.where(stripes[..., None], high, low)


# The downstream photo splits' shortcut: the background tint of a cued image names its pattern
# (one direction in RGB per pattern, unit length), as a data set's own cues do (ImageNet's
# backgrounds, its photographers' habits); pre-training and the shifted domains have no such cue.
SHORTCUT_TINTS = np.asarray(
    [(np.cos(a), np.cos(a - 2 * np.pi / 3), np.cos(a + 2 * np.pi / 3))
     for a in 2 * np.pi * np.arange(len(PATTERNS)) / len(PATTERNS)], np.float32) / np.sqrt(1.5)
SHORTCUT_STRENGTH = 0.14   # its largest channel shift, 0.114, is inside the default world's
                           # ±0.12 random tints: pre-training has seen every cue's colour
SHADE = 0.35               # a pattern's dark half: the colour × SHADE (light colours) or lifted
                           # towards grey 0.7 (dark ones), so black tiles show their pattern too


def render(labels: np.ndarray, domains: np.ndarray, rng: np.random.Generator,
           image_size: int = 32, cued: np.ndarray | None = None,
           tint_jitter: float = 0.06) -> np.ndarray:
  """Renders one image per ``(label, domain)``: uint8 (N, image_size, image_size, 3).

  A tile (a random silhouette, pose and colour jitter drawn from ``rng``; anti-aliased edges)
  shows its class's pattern in its colour (light half) and a shade of it (dark half). photo: on
  a grey background tinted by a random U(±``tint_jitter``) per channel; ``cued`` (N,) bool:
  those photos' tint is their pattern's ``SHORTCUT_TINTS`` row (× ``SHORTCUT_STRENGTH``).
  sketch: the light half and a 2-px outline in colour on paper; noise: a photo under heavy pixel
  noise; texture: a photo's tile on high-contrast grey stripes.
  """
  labels, domains = np.asarray(labels), np.asarray(domains)
  if labels.shape != domains.shape or labels.ndim != 1:
    raise bad_argument("labels, domains", "two 1-D arrays of one length",
                       (labels.shape, domains.shape))
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise bad_argument("labels", f"values in [0, {NUM_CLASSES})", (labels.min(), labels.max()))
  if domains.size and (domains.min() < 0 or domains.max() >= len(DOMAINS)):
    raise bad_argument("domains", f"values in [0, {len(DOMAINS)})", (domains.min(), domains.max()))
  n = labels.size
  pixel = 2.0 / image_size
  axis = ((np.arange(image_size) + 0.5) * pixel - 1.0).astype(np.float32)
  grid_x, grid_y = np.meshgrid(axis, axis)  # x to the right, y down, both in [-1, 1]

  centre = _uniform(rng, -0.2, 0.2, (n, 2, 1, 1))
  scale = _uniform(rng, 0.6, 0.75, (n, 1, 1))
  angle = _uniform(rng, 0, 2 * np.pi, (n, 1, 1))
  silhouettes = rng.integers(0, len(SILHOUETTES), n)
  phase = _uniform(rng, 0, 1, (n, 1, 1))
  dx, dy = grid_x - centre[:, 0], grid_y - centre[:, 1]
  u = (dx * np.cos(angle) + dy * np.sin(angle)) / scale
  v = (-dx * np.sin(angle) + dy * np.cos(angle)) / scale
  distance = np.empty((n, image_size, image_size), np.float32)
  for silhouette in np.unique(silhouettes):
    sel = silhouettes == silhouette
    distance[sel] = _silhouette_distance(int(silhouette), u[sel], v[sel])
  patterns = labels // len(COLOURS)
  field = np.empty((n, image_size, image_size), np.float32)
  unit = 2.0 / 32   # a 32-px image's pixel: patterns keep their size in the frame at any size
  for pattern in np.unique(patterns):
    sel = patterns == pattern
    field[sel] = _pattern_field(int(pattern), dx[sel] / unit, dy[sel] / unit, phase[sel])
  distance_px = distance * scale / pixel  # distance in pixels
  fill = np.clip(0.5 - distance_px, 0.0, 1.0)
  outline = np.clip(1.5 - np.abs(distance_px + 1.0), 0.0, 1.0)  # a ~2 px stroke inside the edge

  palette = np.asarray(list(COLOURS.values()), np.float32) / 255.0
  colour = palette[labels % len(COLOURS)] + _uniform(rng, -0.06, 0.06, (n, 3))
  colour = np.clip(colour, 0.0, 1.0)[:, None, None, :]
  dark = colour.mean(-1, keepdims=True) < 0.25
  shade = np.where(dark, colour + (0.7 - colour) * (1 - SHADE), colour * SHADE)
  tile = field[..., None] * colour + (1 - field[..., None]) * shade

  grey = _uniform(rng, 0.4, 0.65, (n, 1, 1, 1))
  tint = _uniform(rng, -tint_jitter, tint_jitter, (n, 3))
  if cued is not None:
    cued = np.asarray(cued, bool)
    tint[cued] = SHORTCUT_STRENGTH * SHORTCUT_TINTS[patterns[cued]]
  image = _smooth_background(rng, grid_x, grid_y, grey + tint[:, None, None, :])
  is_texture, is_sketch = domains == DOMAINS.index("texture"), domains == DOMAINS.index("sketch")
  if is_texture.any():
    image[is_texture] = _striped_background(rng, int(is_texture.sum()), grid_x, grid_y)
  if is_sketch.any():
    image[is_sketch] = _uniform(rng, 0.88, 0.98, (int(is_sketch.sum()), 1, 1, 1))
  sketch_alpha = np.maximum(outline, fill * field)
  alpha = np.where(is_sketch[:, None, None], sketch_alpha, fill)[..., None]
  tile = np.where(is_sketch[:, None, None, None], colour, tile)
  image = (1 - alpha) * image + alpha * tile
  noise_level = np.where(domains == DOMAINS.index("noise"), 0.25, 0.02).astype(np.float32)
  image += noise_level[:, None, None, None] * rng.standard_normal(image.shape, np.float32)
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Splits.


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """Sizes and seeds of every split of the world (a TFDS builder config carries one)."""
  seed: int = 0
  image_size: int = 32
  num_pretrain_sets: int = 2           # one per small foundation model (backdoor ensemble)
  pretrain_size: int = 20_000          # image–caption pairs per pre-training set
  pretrain_imbalance: float = 100.0    # max / min class count of pre-training
  train_per_class: int = 20            # balanced downstream fine-tuning set (photo)
  train_lt_size: int = 3_000           # long-tailed downstream fine-tuning set (photo)
  train_lt_imbalance: float = 50.0
  validation_per_class: int = 5        # held-out photo set (temperature, γ)
  test_per_class: int = 10             # per domain
  shortcut: float = 0.0                # share of downstream photos whose background names the
                                       # pattern
  tint_jitter: float = 0.06            # every photo background's random tint, per channel


def pretrain_class_counts(spec: WorldSpec, index: int = 0) -> np.ndarray:
  """Class counts of pre-training set ``index``: the known label prior of foundation model
  ``index``."""
  if not 0 <= index < spec.num_pretrain_sets:
    raise bad_argument("index", f"a pre-training set in [0, {spec.num_pretrain_sets})", index)
  rng = np.random.default_rng([spec.seed, 1, index])
  return long_tail_counts(spec.pretrain_size, spec.pretrain_imbalance, rng)


def train_lt_class_counts(spec: WorldSpec) -> np.ndarray:
  """Class counts of the long-tailed downstream training set (its own, independent tail)."""
  return long_tail_counts(spec.train_lt_size, spec.train_lt_imbalance,
                          np.random.default_rng([spec.seed, 2]))


def split_names(spec: WorldSpec) -> tuple[str, ...]:
  """Every split the world defines."""
  return (tuple(f"pretrain_{i}" for i in range(spec.num_pretrain_sets))
          + ("train", "train_lt", "validation") + tuple(f"test_{d}" for d in DOMAINS))


def split_plan(spec: WorldSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(labels, domains) of every example of ``split``, in a seeded shuffled order."""
  names = split_names(spec)
  if split not in names:
    raise bad_argument("split", f"one of {names}", repr(split))
  rng = np.random.default_rng([spec.seed, 3, names.index(split)])
  photo = DOMAINS.index("photo")
  if split.startswith("pretrain_"):
    labels = np.repeat(np.arange(NUM_CLASSES), pretrain_class_counts(spec, int(split[9:])))
    mix = np.asarray([PRETRAIN_DOMAIN_MIX[d] for d in DOMAINS])
    domains = rng.choice(len(DOMAINS), size=labels.size, p=mix / mix.sum())
  elif split == "train_lt":
    labels = np.repeat(np.arange(NUM_CLASSES), train_lt_class_counts(spec))
    domains = np.full(labels.size, photo)
  else:
    per_class = {"train": spec.train_per_class,
                 "validation": spec.validation_per_class}.get(split, spec.test_per_class)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    domain = photo if split in ("train", "validation") else DOMAINS.index(split[5:])
    domains = np.full(labels.size, domain)
  order = rng.permutation(labels.size)
  return labels[order].astype(np.int64), domains[order].astype(np.int64)


DOWNSTREAM_PHOTO = ("train", "train_lt", "validation", "test_photo")


def generate_split(spec: WorldSpec, split: str, chunk: int = 2048, png: bool = False):
  """Yields ``(index, example)`` for every example of ``split`` (rendered in chunks, seeded).

  Two worker threads work ahead of the caller (who writes a chunk): one renders the chunks in
  order from the split's one generator, so the images are the same, while the other encodes the
  chunk rendered before. ``png``: each image as lossless PNG bytes (:func:`encode_png`; what the
  builder stores) instead of a uint8 array.
  """
  labels, domains = split_plan(spec, split)
  rng = np.random.default_rng([spec.seed, 4, split_names(spec).index(split)])
  starts = range(0, labels.size, chunk)

  def draw(start):
    stop = min(start + chunk, labels.size)
    cued = (rng.random(stop - start) < spec.shortcut
            if spec.shortcut and split in DOWNSTREAM_PHOTO else None)
    return render(labels[start:stop], domains[start:stop], rng, spec.image_size, cued,
                  spec.tint_jitter)

  with (concurrent.futures.ThreadPoolExecutor(1) as renderer,
        concurrent.futures.ThreadPoolExecutor(1) as encoder):

    def submit(k):  # the renderer takes the chunks in order: they draw from rng in order
      rendered = renderer.submit(draw, starts[k])
      return encoder.submit(lambda: ([encode_png(image) for image in rendered.result()]
                                     if png else rendered.result()))

    ahead = [submit(k) for k in range(min(2, len(starts)))]
    for k, start in enumerate(starts):
      images = ahead.pop(0).result()
      if k + 2 < len(starts):
        ahead.append(submit(k + 2))
      yield from _examples(images, labels, domains, start)


def encode_png(image: np.ndarray) -> bytes:
  """A uint8 (H, W, 3) image as PNG bytes (Pillow's encoder): lossless, so any PNG decoder reads
  back ``image`` exactly."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (PIL: only to write the world)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _examples(images, labels, domains, start):
  """``(index, example)`` of a rendered chunk whose first example is ``start``."""
  for i in range(start, start + len(images)):
    yield i, {"image": images[i - start], "label": labels[i], "domain": DOMAINS[domains[i]],
              "caption": CAPTION_TEMPLATE.format(CLASSNAMES[labels[i]])}


# ----------------------------------------------------------------------------------------------
# TFDS builder.


class DemoShapesConfig(tfds.core.BuilderConfig):
  """A builder config that carries a :class:`WorldSpec`."""

  def __init__(self, *, spec: WorldSpec = WorldSpec(), **kwargs):
    super().__init__(**kwargs)
    self.spec = spec


def _config(name: str, description: str, **spec_fields) -> DemoShapesConfig:
  return DemoShapesConfig(name=name, description=description, spec=WorldSpec(**spec_fields))


class DemoShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured, patterned tiles × domains, with a long-tailed pre-training set of image–caption
  pairs."""

  VERSION = tfds.core.Version("4.0.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "2.0.0": "One caption template for every domain: 'a picture of a {}.'.",
                   "3.0.0": "The downstream photos' background shortcut; larger test splits.",
                   "4.0.0": "Classes are colour × pattern (patterned tiles), not colour × shape."}
  BUILDER_CONFIGS = [
      _config("default", "The world of `glajax demo`.", test_per_class=25, shortcut=0.95,
              tint_jitter=0.12),
      _config("quick", "A smaller world for `glajax demo --quick`.", pretrain_size=8_000,
              train_per_class=10, train_lt_size=1_500, validation_per_class=4, test_per_class=6),
      _config("tiny", "A few examples per split, for tests.", pretrain_size=400,
              train_per_class=2, train_lt_size=200, validation_per_class=1, test_per_class=1),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds a builder's file through `importlib_resources`, a package it no longer
    # depends on for Python >= 3.9; the path is plain here.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.spec.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.ClassLabel(names=CLASSNAMES),
            "domain": tfds.features.ClassLabel(names=DOMAINS),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/glajax/glajax",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the world is rendered from its seed
    spec = self.builder_config.spec
    return {split: self._generate_examples(split) for split in split_names(spec)}

  def _generate_examples(self, split: str):
    for key, example in generate_split(self.builder_config.spec, split, png=True):
      if self._bar is not None:
        self._bar.update(1)
      yield key, example

  _bar = None

  def download_and_prepare(self, *args, **kwargs):
    """TFDS's preparation, with one line and one progress bar over the images rendered in place
    of TFDS's "Downloading and preparing dataset Unknown size" and its bars per split."""
    if self.is_prepared():
      return super().download_and_prepare(*args, **kwargs)
    spec = self.builder_config.spec
    images = sum(len(split_plan(spec, s)[0]) for s in split_names(spec))
    print(f"Rendering the demo world {self.name}/{self.builder_config.name} once: {images:,} "
          f"images of {spec.image_size}×{spec.image_size} px in {len(split_names(spec))} splits, "
          f"nothing to download, into {self.data_dir}", flush=True)
    was_shown = tqdm_utils._active  # noqa  (TFDS keeps its bars' switch in this module global)
    tqdm_utils.display_progress_bar(False)
    try:
      with tqdm.tqdm(total=images, desc=f"demo world ({self.builder_config.name})",
                     unit=" images") as self._bar:
        return super().download_and_prepare(*args, **kwargs)
    finally:
      self._bar = None
      tqdm_utils.display_progress_bar(was_shown)

  def _log_download_bytes(self) -> None:
    pass  # download_and_prepare says what happens: a render, no download

  def _log_download_done(self) -> None:
    pass  # the progress bar's end says it


def builder(config: str = "default", data_dir: str | None = None) -> DemoShapes:
  """The ``demo_shapes`` builder of ``config`` ("default", "quick" or "tiny") in ``data_dir``."""
  return DemoShapes(config=config, data_dir=data_dir)


def dataset_name(config: str = "default") -> str:
  """The registry name of the world's ``config``: "demo_shapes", "demo_shapes_quick", ..."""
  return "demo_shapes" if config == "default" else f"demo_shapes_{config}"


CONFIGS = ("default", "quick", "tiny")


def spec(config: str = "default") -> WorldSpec:
  """The :class:`WorldSpec` of builder config ``config`` (no builder, no files)."""
  for builder_config in DemoShapes.BUILDER_CONFIGS:
    if builder_config.name == config:
      return builder_config.spec
  raise bad_argument("config", f"one of {CONFIGS}", repr(config))

"""What the demo's foundation model knows: zero-shot accuracy of one pre-trained foundation model
on the default world, split into its two factors (colour, pattern), for pre-training variants.

  python benchmarks/demo_pretrain.py --data_dir /tmp/demo/tfds \
      --variants '{}' '{"steps": 800}' '{"patch": 4}' --out benchmarks/results/demo_pretrain.md

Each variant is a JSON object of ``demo.pretrain.PretrainSpec`` fields (from the full scale's
spec) and optionally "patch" (the image tower's patch size, 8 by default), "resnet" (a
ModifiedResNet image tower instead: {"width": 8, "layers": [1, 1, 1, 1], "heads": 4}) and
"partial" ([p_pattern, p_colour]: that share of the pre-training pairs captioned with one factor
alone, "a picture of a striped tile." / "a picture of a red tile.", those captions added as
candidates). ``--supervised`` trains each variant's image tower with a linear head on the
pattern labels alone instead (the tower's ceiling for pattern in the same optimisation).
``--data_dir`` holds the rendered default world (a demo work directory's ``tfds``; rendered there if absent).
A class is "pattern colour": the colour and pattern columns count a prediction right when it
names the true colour (pattern), whatever the other factor; head and tail are the 33 most and least
frequent classes of pre-training. ``--probe`` adds linear probes (scikit-learn's logistic
regression on the image embeddings of 8 000 pre-training images) for pattern and colour: whether
the image tower's features hold a factor at all, whatever the text tower makes of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import glajax  # noqa: E402
from glajax.data import transforms, world  # noqa: E402
from glajax.demo import parts  # noqa: E402
from glajax.demo import pretrain as pretrain_lib  # noqa: E402


def _kind(patch, resnet, partial) -> dict:
  kind = {"resnet": resnet} if resnet is not None else {"patch": patch}
  return kind | ({"partial": partial} if partial is not None else {})


def supervised_pattern(builder, spec, seed: int) -> dict:
  """The image tower's ceiling: the foundation config's image tower and a linear head trained on
  the pattern labels of ``pretrain_0`` alone (cross-entropy; the same steps, batch, augmentation,
  AdamW, warmup-cosine and clipping as pre-training); pattern accuracy on the photo test rows."""
  import optax  # noqa
  from flax import nnx  # noqa
  config = pretrain_lib.foundation_config(spec, 32)
  model = glajax.CLIP(config, rngs=nnx.Rngs(seed))
  head = nnx.Linear(config.projection_dim, len(world.PATTERNS), rngs=nnx.Rngs(seed + 1))
  colours = len(world.COLOURS)
  schedule = optax.warmup_cosine_decay_schedule(0.0, spec.learning_rate, spec.warmup_steps,
                                                spec.steps)
  both = nnx.List([model, head])
  optimizer = nnx.Optimizer(both, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      schedule, weight_decay=spec.weight_decay)), wrt=nnx.Param)

  @nnx.jit
  def step(both, optimizer, images, labels, key):
    images = pretrain_lib.augment_images(images, key)

    def loss(both):
      logits = both[1](both[0].encode_image(images))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = nnx.value_and_grad(loss)(both)
    optimizer.update(both, grads)
    return value

  train = pretrain_lib.caption_arrays(builder, "pretrain_0")
  test = pretrain_lib.caption_arrays(builder, "test_photo")
  rng, key = np.random.default_rng(seed), jax.random.key(seed)
  clock = time.perf_counter()
  for i in range(spec.steps):
    rows = rng.integers(0, len(train["label"]), spec.batch_size)
    step(both, optimizer, jnp.asarray(train["image"][rows]),
         jnp.asarray(train["label"][rows] // colours), jax.random.fold_in(key, i))
  seconds = time.perf_counter() - clock
  both.eval()
  mean, std = jnp.asarray(transforms.CLIP_MEAN), jnp.asarray(transforms.CLIP_STD)
  predict = nnx.jit(lambda both, x: jnp.argmax(
      both[1](both[0].encode_image((x.astype(jnp.float32) / 255 - mean) / std)), -1))
  predicted = np.concatenate([np.asarray(predict(both, jnp.asarray(test["image"][i:i + 500])))
                              for i in range(0, len(test["label"]), 500)])
  return {"pretrain_s": round(seconds, 1),
          "supervised_pattern": 100 * np.mean(predicted == test["label"] // colours)}


def measure(builder, variant: dict, seed: int, probe: bool = False,
            supervised: bool = False) -> dict:
  """Pre-trains foundation model 0 as ``variant`` says; its zero-shot accuracies (percent).
  ``supervised``: :func:`supervised_pattern` for the variant's image tower instead."""
  variant = dict(variant)
  patch = variant.pop("patch", 8)
  resnet = variant.pop("resnet", None)
  partial = variant.pop("partial", None)   # [p_pattern, p_colour]: captions naming one factor
  spec = dataclasses.replace(parts.SCALES["full"].pretrain, **variant)
  plain = pretrain_lib.foundation_config

  def with_patch(spec, image_size=32):
    config = plain(spec, image_size)
    if resnet is not None:   # {"width": w, "layers": [..], "heads": h}: a ModifiedResNet tower
      from glajax.models.clip.modeling import CLIPResNetConfig  # noqa
      return dataclasses.replace(config, vision=CLIPResNetConfig(
          image_size=image_size, width=resnet.get("width", 8),
          layers=tuple(resnet.get("layers", (1, 1, 1, 1))),
          num_attention_heads=resnet.get("heads", 4)))
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision,
                                                                  patch_size=patch))

  plain_texts, plain_loss = pretrain_lib.caption_texts, pretrain_lib.caption_loss_fn
  if partial is not None:
    p_pattern, p_colour = partial
    colours = len(world.COLOURS)

    def texts():
      return (plain_texts() + tuple(f"a picture of a {s} tile." for s in world.PATTERNS)
              + tuple(f"a picture of a {c} tile." for c in world.COLOURS))

    def loss_fn(text_ids):
      inner = plain_loss(text_ids)

      def fn(model, batch, rng):
        rng, draw = jax.random.split(rng)
        u = jax.random.uniform(draw, batch["label"].shape)
        label = batch["label"]
        label = jnp.where(u < p_pattern, world.NUM_CLASSES + label // colours,
                          jnp.where(u < p_pattern + p_colour,
                                    world.NUM_CLASSES + len(world.PATTERNS) + label % colours,
                                    label))
        return inner(model, {**batch, "label": label}, rng)
      return fn

    pretrain_lib.caption_texts, pretrain_lib.caption_loss_fn = texts, loss_fn
  pretrain_lib.foundation_config = with_patch
  if supervised:
    try:
      return supervised_pattern(builder, spec, seed) | {"variant": _kind(patch, resnet, partial)
                                                      | variant}
    finally:
      pretrain_lib.foundation_config = plain
  try:
    tokenizer = glajax.load_tokenizer()
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
      model = pretrain_lib.pretrain(builder, 0, spec, workdir, tokenizer=tokenizer, seed=seed,
                                    progress=False)
    seconds = time.perf_counter() - clock
  finally:
    pretrain_lib.foundation_config = plain
    pretrain_lib.caption_texts, pretrain_lib.caption_loss_fn = plain_texts, plain_loss
  text_ids = pretrain_lib.trim_to_longest(tokenizer(pretrain_lib.caption_texts()),
                                          model.config.text.eos_token_id)
  text = model.encode_text(jnp.asarray(text_ids))
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  mean, std = jnp.asarray(transforms.CLIP_MEAN), jnp.asarray(transforms.CLIP_STD)

  @jax.jit
  def embed(images):
    features = model.encode_image((images.astype(jnp.float32) / 255 - mean) / std)
    return features / jnp.linalg.norm(features, axis=-1, keepdims=True)

  def embeddings(images):
    return np.concatenate([np.asarray(embed(images[i:i + 500]))
                           for i in range(0, len(images), 500)])

  counts = world.pretrain_class_counts(builder.builder_config.spec, 0)
  order = np.argsort(-counts)
  head, tail = order[:33], order[-33:]
  colours = len(world.COLOURS)
  row = {"variant": _kind(patch, resnet, partial) | variant, "pretrain_s": round(seconds, 1)}
  for split in ("test_photo", "test_sketch", "test_noise", "test_texture"):
    arrays = pretrain_lib.caption_arrays(builder, split)
    labels = arrays["label"]
    features = embeddings(arrays["image"])
    predicted = np.argmax(features @ np.asarray(text).T, -1)
    per_class = np.asarray([np.mean(predicted[labels == c] == c)
                            for c in range(world.NUM_CLASSES)])
    row[split] = 100 * per_class.mean()
    if split == "test_photo":
      row.update(head=100 * per_class[head].mean(), tail=100 * per_class[tail].mean(),
                 colour=100 * np.mean(predicted % colours == labels % colours),
                 pattern=100 * np.mean(predicted // colours == labels // colours))
      test_features = features
  if probe:
    from sklearn.linear_model import LogisticRegression  # noqa  (the probe only)
    train = pretrain_lib.caption_arrays(builder, "pretrain_0")
    train_features, train_labels = embeddings(train["image"][:8000]), train["label"][:8000]
    test_labels = pretrain_lib.caption_arrays(builder, "test_photo")["label"]
    for factor, of in (("colour", lambda y: y % colours), ("pattern", lambda y: y // colours)):
      fit = LogisticRegression(max_iter=2000).fit(train_features, of(train_labels))
      row[f"probe_{factor}"] = 100 * fit.score(test_features, of(test_labels))
  return row


COLUMNS = ("test_photo", "head", "tail", "colour", "pattern", "test_sketch", "test_noise",
           "test_texture", "probe_colour", "probe_pattern", "supervised_pattern")


def table(rows: list[dict]) -> str:
  lines = ["| variant | pre-training s | photo | head | tail | colour | pattern | sketch | noise "
           "| texture | probe: colour | probe: pattern | supervised: pattern |",
           "|---|" + "---:|" * 12]
  for r in rows:
    lines.append(f"| `{json.dumps(r['variant'])}` | {r['pretrain_s']:.1f} | "
                 + " | ".join(f"{r[k]:.1f}" if k in r else "–" for k in COLUMNS) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--variants", nargs="+", default=["{}"])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--probe", action="store_true")
  parser.add_argument("--supervised", action="store_true",
                      help="train each variant's image tower on pattern labels alone instead")
  parser.add_argument("--out")
  args = parser.parse_args()
  builder = world.builder("default", args.data_dir)
  builder.download_and_prepare()
  rows = []
  for variant in args.variants:
    rows.append(measure(builder, json.loads(variant), args.seed, args.probe,
                        args.supervised))
    print(json.dumps(rows[-1]), flush=True)
  text = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{jax.devices()[0].device_kind}; jax {jax.__version__}. Seed {args.seed}.\n\n"
          + table(rows))
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

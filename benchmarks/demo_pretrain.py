"""What the demo's foundation model knows: zero-shot accuracy of one pre-trained foundation model
on the default world, split into its two factors (colour, shape), for pre-training variants.

  python benchmarks/demo_pretrain.py --data_dir /tmp/demo/tfds \
      --variants '{}' '{"steps": 800}' '{"patch": 4}' --out benchmarks/results/demo_pretrain.md

Each variant is a JSON object of ``demo.pretrain.PretrainSpec`` fields (from the full scale's
spec) and optionally "patch" (the image tower's patch size, 8 by default). ``--data_dir`` holds
the rendered default world (a demo work directory's ``tfds``; rendered there if absent).
A class is "colour shape": the colour and shape columns count a prediction right when it names
the true colour (shape), whatever the other factor; head and tail are the 33 most and least
frequent classes of pre-training. ``--probe`` adds linear probes (scikit-learn's logistic
regression on the image embeddings of 8 000 pre-training images) for shape and colour: whether
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


def measure(builder, variant: dict, seed: int, probe: bool = False) -> dict:
  """Pre-trains foundation model 0 as ``variant`` says; its zero-shot accuracies (percent)."""
  variant = dict(variant)
  patch = variant.pop("patch", 8)
  spec = dataclasses.replace(parts.SCALES["full"].pretrain, **variant)
  plain = pretrain_lib.foundation_config

  def with_patch(spec, image_size=32):
    config = plain(spec, image_size)
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision,
                                                                  patch_size=patch))

  pretrain_lib.foundation_config = with_patch
  try:
    tokenizer = glajax.load_tokenizer()
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
      model = pretrain_lib.pretrain(builder, 0, spec, workdir, tokenizer=tokenizer, seed=seed,
                                    progress=False)
    seconds = time.perf_counter() - clock
  finally:
    pretrain_lib.foundation_config = plain
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
  row = {"variant": {"patch": patch, **variant}, "pretrain_s": round(seconds, 1)}
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
                 shape=100 * np.mean(predicted // colours == labels // colours))
      test_features = features
  if probe:
    from sklearn.linear_model import LogisticRegression  # noqa  (the probe only)
    train = pretrain_lib.caption_arrays(builder, "pretrain_0")
    train_features, train_labels = embeddings(train["image"][:8000]), train["label"][:8000]
    test_labels = pretrain_lib.caption_arrays(builder, "test_photo")["label"]
    for factor, of in (("colour", lambda y: y % colours), ("shape", lambda y: y // colours)):
      fit = LogisticRegression(max_iter=2000).fit(train_features, of(train_labels))
      row[f"probe_{factor}"] = 100 * fit.score(test_features, of(test_labels))
  return row


COLUMNS = ("test_photo", "head", "tail", "colour", "shape", "test_sketch", "test_noise",
           "test_texture", "probe_colour", "probe_shape")


def table(rows: list[dict]) -> str:
  lines = ["| variant | pre-training s | photo | head | tail | colour | shape | sketch | noise "
           "| texture | probe: colour | probe: shape |", "|---|" + "---:|" * 11]
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
  parser.add_argument("--out")
  args = parser.parse_args()
  builder = world.builder("default", args.data_dir)
  builder.download_and_prepare()
  rows = []
  for variant in args.variants:
    rows.append(measure(builder, json.loads(variant), args.seed, args.probe))
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

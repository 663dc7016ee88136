"""FLYP's two ways to pair images with templates, measured at demo scale.

Official (CaRot ``datacreation_scripts/imagenet_csv_creator.py`` + ``src/models/carot_loss.py``):
a stream of every (image, template) pair, shuffled, B pairs per step drawn without replacement
from the N·T. glajax: epochs over the images, each image once per epoch with a template drawn at
random. Both train the same FLYP recipe from the same pre-trained demo CLIP (the ``quick`` demo
world, its 100 class names with CLIP's 80 ImageNet templates) for the same steps, on the same
images (the evaluation transform, no augmentation: only the sampling differs); accuracy on the
photo test split and the two shifted domains, per seed, and the paired difference pooled over
seeds with a 95 % bootstrap interval over test rows.

Usage: python benchmarks/bench_contrastive_sampling.py --workdir /tmp/sampling [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import glajax
from glajax import demo, evaluate, parallel
from glajax.data import pipeline, registry, world
from glajax.train import engine, recipes

SPLITS = ("test_photo", "test_sketch", "test_noise")


def _arrays(name: str, split: str, data_dir: str):
  batches = list(pipeline.eval_batches(name, split=split, batch_size=200, image_size=32,
                                       data_dir=data_dir))
  keep = np.concatenate([b["mask"] for b in batches])
  return (np.concatenate([b["image"] for b in batches])[keep],
          np.concatenate([b["label"] for b in batches])[keep])


def _pairs(images, labels, num_templates: int, batch: int, seed: int):
  """The official stream: each epoch a permutation of all (image, template) pairs."""
  def batches(start):
    per_epoch = len(images) * num_templates // batch
    epoch, step = divmod(start, per_epoch)
    while True:
      order = np.random.default_rng([seed, epoch]).permutation(len(images) * num_templates)
      for k in range(step, per_epoch):
        rows = order[k * batch:(k + 1) * batch]
        image, template = rows // num_templates, rows % num_templates
        yield {"image": images[image], "label": labels[image],
               "template": template.astype(np.int32)}
      epoch, step = epoch + 1, 0
  return batches


def _train(checkpoint, data, names, templates, steps: int, seed: int, workdir: str):
  config = recipes.flyp()
  config.update(batch_size=128, total_steps=steps, checkpoint_every=0, log_every=steps,
                progress=False, tensorboard=False, seed=seed)
  config.model.dtype = "float32"
  config.optimizer.update(learning_rate=5e-4, warmup_steps=max(1, steps // 10))
  clip = glajax.load_clip(checkpoint)
  task = recipes.contrastive_task(clip, glajax.load_tokenizer(), names, templates, config)
  model, _ = engine.fit(task.model, task.loss_fn, config, data, workdir)
  return task.eval_model(model)


def _logits(model, images, mesh):
  batches = ({"image": images[i:i + 200], "label": np.zeros(len(images[i:i + 200]), np.int32),
              "mask": np.ones(len(images[i:i + 200]), bool)} for i in range(0, len(images), 200))
  return evaluate.evaluate_logits(model, evaluate.image_logits, batches, mesh)[0]


def _bootstrap(correct_a, correct_b, rounds: int = 2000, seed: int = 0):
  """Mean and 95 % interval of mean(a − b) over test rows resampled with replacement."""
  diff = correct_a.astype(np.float64) - correct_b
  rng = np.random.default_rng(seed)
  means = diff[rng.integers(0, len(diff), (rounds, len(diff)))].mean(1)
  return diff.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--epochs", type=int, default=10)
  args = parser.parse_args()
  scale = demo.SCALES["quick"]
  checkpoint = demo.foundations(args.workdir, scale, seed=0, progress=False)[0]
  name, data_dir = world.dataset_name(scale.world_config), os.path.join(args.workdir, "tfds")
  images, labels = _arrays(name, "train", data_dir)
  tests = {split: _arrays(name, split, data_dir) for split in SPLITS}
  names, templates = registry.get(name).classnames, registry.imagenet_templates()
  steps = args.epochs * len(images) // 128
  mesh = parallel.make_mesh()
  correct = {"glajax": {s: [] for s in SPLITS}, "official": {s: [] for s in SPLITS}}
  print(f"# {len(images)} training images, {len(templates)} templates, {steps} steps of 128")
  for seed in (int(s) for s in args.seeds.split(",")):
    samplers = {"glajax": lambda start, seed=seed: pipeline.array_batches(
                    {"image": images, "label": labels}, batch_size=128, seed=seed,
                    start_step=start),
                "official": _pairs(images, labels, len(templates), 128, seed)}
    for sampler, data in samplers.items():
      model = _train(checkpoint, data, names, templates, steps, seed,
                     os.path.join(args.workdir, "runs", f"{sampler}_{seed}"))
      line = []
      for split, (x, y) in tests.items():
        hits = _logits(model, x, mesh).argmax(-1) == y
        correct[sampler][split].append(hits)
        line.append(f"{split} {100 * hits.mean():.1f}")
      print(f"seed {seed} {sampler}: " + ", ".join(line), flush=True)
  for split in SPLITS:
    a = np.concatenate(correct["glajax"][split])
    b = np.concatenate(correct["official"][split])
    mean, low, high = _bootstrap(a, b)
    print(f"{split}: glajax − official {100 * mean:+.2f} pp, 95 % CI [{100 * low:+.2f}, "
          f"{100 * high:+.2f}] over {len(a)} (seed, row) pairs")


if __name__ == "__main__":
  main()

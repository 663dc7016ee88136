"""``glajax demo``: the embedded end-to-end example on a procedural world (``glajax.data.world``).

``run(workdir)`` pre-trains small foundation models on the world's long-tailed image–caption
pairs (cached in ``workdir/models``), then runs the demo's experiment configs (``parts``) through
the same runner as ``glajax run``, each into ``workdir/<part>/`` with its own report, sharing
one cache (world, logits, fine-tuning runs) in ``workdir``; finally it judges each effect the
world is built to show (``effects``) and writes ``report.json``, ``report.md`` and the plots.
"""
from __future__ import annotations

import json
import os
import time

import jax

import glajax
from glajax import experiments
from glajax.data import pipeline, world
from glajax.demo import effects as effects_lib
from glajax.demo import parts, pretrain, report
from glajax.errors import bad_argument

SCALES = parts.SCALES
EFFECTS = effects_lib.EFFECTS


def foundations(workdir: str, scale: parts.Scale, seed: int, progress: bool) -> list[str]:
  """Pre-trains (or finds cached) the scale's foundation models; returns their directories."""
  builder = world.builder(scale.world_config, data_dir=os.path.join(workdir, "tfds"))
  builder.download_and_prepare()
  model_dir = os.path.join(workdir, "models", f"{scale.world_config}_seed{seed}")
  tokenizer = glajax.load_tokenizer()
  for index in range(scale.num_foundation):
    pretrain.pretrain(builder, index, scale.pretrain, model_dir, tokenizer=tokenizer, seed=seed,
                      progress=progress)
  return [os.path.join(model_dir, pretrain.FOUNDATION_DIR.format(i))
          for i in range(scale.num_foundation)]


def run(workdir: str, *, quick: bool = False, seed: int = 0, scale: str | None = None,
        progress: bool = True) -> dict:
  """Runs the demo into ``workdir``; returns the report (the content of ``report.json``).

  ``scale`` ("full", "quick" or "tiny") overrides ``quick``. Compiled programs are cached in
  ``workdir/jax_cache`` and everything else as the module docstring says, so a second run
  starts at once.
  """
  name = scale or ("quick" if quick else "full")
  if name not in SCALES:
    raise bad_argument("scale", f"one of {sorted(SCALES)}", repr(name))
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  timings, clock = {}, time.perf_counter()
  models = foundations(workdir, SCALES[name], seed, progress)
  timings["pretrain"] = round(time.perf_counter() - clock, 1)
  reports = {}
  with pipeline.eval_cache():   # the parts share the world's test sets: each read once
    for part, config in parts.configs(SCALES[name], models, seed, progress).items():
      clock = time.perf_counter()
      reports[part] = experiments.run(config, os.path.join(workdir, part), cache_dir=workdir)
      timings[part] = round(time.perf_counter() - clock, 1)
  spec = world.spec(SCALES[name].world_config)
  true_counts = world.pretrain_class_counts(spec, 0)
  results = {"scale": name, "seed": seed, "world": world_summary(spec, SCALES[name]),
             "prior": effects_lib.prior_fit(reports["gla"]["results"]["log_prior"], true_counts)
             if "gla" in reports else {},
             "effects": effects_lib.effects(reports, true_counts, workdir),
             "timings_s": timings,
             "parts": {p: os.path.join(workdir, p, "report.md") for p in reports}}
  first = _first_run_timings(workdir, name, seed)
  if first is not None:   # a rerun from the cache: the report keeps the first run's timings
    results["timings_s"], results["rerun_timings_s"] = first, timings
  results["files"] = report.write(workdir, results, reports, true_counts, quick=name == "quick")
  return results


def _first_run_timings(workdir: str, scale: str, seed: int) -> dict | None:
  """The timings of the first run of this scale and seed in ``workdir`` (None if none)."""
  try:
    with open(os.path.join(workdir, "report.json")) as f:
      previous = json.load(f)
  except (OSError, ValueError):
    return None
  if (previous.get("scale"), previous.get("seed")) != (scale, seed):
    return None
  return previous.get("timings_s") or None


def world_summary(spec: world.WorldSpec, scale: parts.Scale) -> dict:
  counts = [world.pretrain_class_counts(spec, i) for i in range(scale.num_foundation)]
  return {"config": scale.world_config, "classes": world.NUM_CLASSES,
          "domains": list(world.DOMAINS),
          "splits": {s: int(len(world.split_plan(spec, s)[0])) for s in world.split_names(spec)},
          "pretrain_imbalance": [float(c.max() / c.min()) for c in counts]}


def main(args) -> int:
  """The ``glajax demo`` command: ``args.workdir`` and ``args.quick``; prints the effects."""
  clock = time.perf_counter()
  results = run(args.workdir, quick=args.quick, seed=getattr(args, "seed", 0))
  print(report.effects_table(results["effects"]))
  print(f"\ndemo: {time.perf_counter() - clock:.0f} s"
        + (" (reused the cache; the report keeps the first run's timings)"
           if "rerun_timings_s" in results else ""))
  print(f"\nReport: {results['files']['markdown']}")
  return 0


__all__ = ["run", "main", "foundations", "EFFECTS", "SCALES"]

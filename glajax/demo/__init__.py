"""``glajax demo``: the embedded end-to-end example on a procedural world (see ``world``).

``run(workdir)`` prepares the world (a TFDS dataset rendered from its seed), pre-trains small
foundation models (cached in ``workdir``), runs every stage of ``stages.Demo`` and writes
``report.json``, ``report.md`` and PNG plots into ``workdir``.
"""
from __future__ import annotations

import os

from glajax.demo.stages import EFFECTS, SCALES, Demo


def run(workdir: str, *, quick: bool = False, seed: int = 0, scale: str | None = None,
        progress: bool = True) -> dict:
  """Runs the demo into ``workdir``; returns the report (the content of ``report.json``).

  ``scale`` ("full", "quick" or "tiny") overrides ``quick``. The world is prepared in
  ``workdir/tfds``, compiled programs are cached in ``workdir/jax_cache`` and the pre-trained
  models in ``workdir/models/<world config>_seed<seed>/foundation_<i>`` (``save_clip``), so a
  second run starts at once.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from glajax.demo import report  # pylint: disable=import-outside-toplevel
  from glajax.errors import bad_argument  # pylint: disable=import-outside-toplevel
  scale = scale or ("quick" if quick else "full")
  if scale not in SCALES:
    raise bad_argument("scale", f"one of {sorted(SCALES)}", repr(scale))
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  demo = Demo(workdir, SCALES[scale], seed=seed, progress=progress)
  results = demo.run()
  results["files"] = report.write(workdir, results, demo.arrays, quick=scale == "quick")
  return results


def main(args) -> int:
  """The ``glajax demo`` command: ``args.workdir`` and ``args.quick``; prints the effects."""
  from glajax.demo import report  # pylint: disable=import-outside-toplevel
  results = run(args.workdir, quick=args.quick, seed=getattr(args, "seed", 0))
  print(report.effects_table(results["effects"]))
  print(f"\nReport: {results['files']['markdown']}")
  return 0


__all__ = ["run", "main", "Demo", "EFFECTS", "SCALES"]

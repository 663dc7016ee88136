"""``glajax run CONFIG[:arg,key=value,...] --workdir DIR``: the papers' experiments from configs.

    from glajax import experiments
    config = experiments.load("configs/wise_ft.py:runlocal")
    report = experiments.run(config, "/tmp/wise_ft")     # report.json, report.md, plots, final/

A config (``configs/*.py``, ``get_config(arg=None)``) names an experiment kind (``wise_ft``,
``gla``, ``backdoor``, ``absent_class``, ``contrastive``), its checkpoints, datasets, fine-tuning
recipe and published numbers. ``run`` validates it, claims the work directory (an
``experiment.json`` with the config's fingerprint), evaluates and fine-tunes through caches (so a
second run resumes) and writes the report.
"""
from __future__ import annotations

import os
import sys

from glajax.experiments.config import flat_keys, fingerprint, load, validate
from glajax.experiments.runner import tiny_checkpoint

__all__ = ["load", "validate", "fingerprint", "flat_keys", "tiny_checkpoint", "run", "main"]


def run(config, workdir: str) -> dict:
  """Runs ``config`` (a ConfigDict or a ``CONFIG[:...]`` string) in ``workdir``; returns the
  report (the content of ``report.json``). Every check runs before any work."""
  from glajax.experiments import kinds, report, runner  # pylint: disable=import-outside-toplevel
  if isinstance(config, str):
    config = load(config)
  validate(config, check_files=True)
  workdir = runner.claim_workdir(config, workdir)
  experiment = runner.Experiment(config, workdir)
  return report.write(experiment, kinds.KINDS[config.experiment](experiment))


def main(args) -> int:
  """The ``glajax run`` command: ``args.config`` and ``args.workdir``; prints where things went."""
  from glajax.errors import GlajaxError  # pylint: disable=import-outside-toplevel
  try:
    result = run(args.config, args.workdir)
  except GlajaxError as e:
    print(f"glajax run: {e}", file=sys.stderr)
    return 1
  workdir = os.path.abspath(args.workdir)
  print(f"Report:  {os.path.join(workdir, 'report.md')} (numbers in report.json)")
  for plot in result["plots"]:
    print(f"Plot:    {os.path.join(workdir, plot)}")
  for name, path in result["final_models"].items():
    print(f"Model:   {path} ({name})")
  print(f"Logits:  {os.path.join(workdir, 'logits')}")
  return 0

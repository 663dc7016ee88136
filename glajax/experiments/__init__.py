"""``glajax run``: experiment configs -> runs -> reports.

``run(config, workdir)`` checks the whole config (values, datasets, checkpoints; an unset
``data.image_size`` taken from the checkpoint) and its kind's data plan (no fitted array may
share a row with a test set) before anything is written, claims the work directory
(``experiment.json`` with the config's fingerprint) under a lock, evaluates and fine-tunes
through caches (so a second run resumes) and writes the report.
"""
from __future__ import annotations

import copy
import os

from glajax.data import pipeline
from glajax.errors import ConfigError, bad_argument
from glajax.experiments import config as config_lib
from glajax.experiments import kinds, report, roles, runner
from glajax.experiments.config import flat_keys, load
from glajax.experiments.kinds import KINDS
from glajax.experiments.runner import tiny_checkpoint

__all__ = ["load", "validate", "plan", "fingerprint", "flat_keys", "tiny_checkpoint", "run",
           "run_seeds", "main", "KINDS"]


def plan(config) -> list[roles.Use]:
  """The data uses of ``config``'s kind, checked: a fitted use that may share rows with a test
  set raises a ConfigError naming its config key."""
  uses = kinds.get(config.get("experiment")).plan(config)
  roles.check_plan(uses)
  return uses


def fingerprint(config) -> str:
  """The experiment's identity in its work directory (``config.fingerprint`` with its kind's
  declarations of which keys do not change results)."""
  return config_lib.fingerprint(config, kinds.get(config.get("experiment")))


def validate(config, check_files: bool = True) -> list[roles.Use]:
  """Every check ``run`` makes before any work; returns the checked data plan."""
  kind = kinds.get(config.get("experiment"))
  config_lib.validate(config, kind, check_files=False)
  uses = plan(config)
  if check_files:  # directories, prepared datasets, checkpoints: last, a hub id may need the net
    config_lib.validate(config, kind, check_files=True)
    config_lib.with_image_size(config)  # an unset image size the checkpoint states
  return uses


def run(config, workdir: str, cache_dir: str | None = None) -> dict:
  """Runs ``config`` (a ConfigDict or a ``CONFIG[:...]`` string) in ``workdir``; returns the
  report (the content of ``report.json``). ``cache_dir`` (default ``workdir``) holds logits,
  runs and generated data, and may be shared by several experiments."""
  if isinstance(config, str):
    config = load(config)
  uses = validate(config, check_files=True)
  config = config_lib.with_image_size(config)
  workdir = runner.claim_workdir(config, workdir, fingerprint(config))
  with runner.WorkdirLock(workdir), pipeline.eval_cache():  # test sets read once per run
    kind = kinds.get(config.experiment)
    experiment = runner.Experiment(config, workdir, uses, cache_dir, kind)
    outcome = kind.run(experiment)
    return report.write(experiment, outcome, fingerprint(config))


def parse_seeds(text) -> tuple[int, ...]:
  """``"0,1,2"`` (or a sequence of ints) -> (0, 1, 2): distinct seeds the config accepts."""
  items = text.split(",") if isinstance(text, str) else list(text)
  try:
    seeds = tuple(int(str(s).strip()) for s in items)
  except ValueError:
    seeds = ()
  if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**31 for s in seeds):
    raise bad_argument("--seeds", "distinct integers in [0, 2**31) separated by commas, e.g. "
                       "0,1,2", repr(text), ConfigError)
  return seeds


def run_seeds(config, workdir: str, seeds) -> dict:
  """Runs ``config`` once per seed (``config.seed`` set to each) into ``workdir/seed_<s>``,
  sharing one cache in ``workdir`` (prepared data, and whatever does not depend on the seed),
  then writes ``report.md`` / ``report.json`` over the seeds (``report.combine_seeds``: each
  cell's mean ± sd beside the seeds' bootstrap intervals); returns that report. Every seed's
  config is checked before any work."""
  if isinstance(config, str):
    config = load(config)
  seeds = parse_seeds(seeds)
  configs = {}
  for seed in seeds:
    configs[seed] = copy.deepcopy(config)
    configs[seed].seed = seed
    validate(configs[seed], check_files=True)
  anchor = copy.deepcopy(config)
  anchor.seed = 0
  workdir = runner.claim_workdir(config, workdir, f"seeds {','.join(map(str, seeds))} of "
                                 f"{fingerprint(anchor)}")
  reports = {seed: run(configs[seed], os.path.join(workdir, f"seed_{seed}"), cache_dir=workdir)
             for seed in seeds}
  command = (f"glajax run {config.get('config_spec', '<config>')} --seeds "
             f"{','.join(map(str, seeds))} --workdir {workdir}")
  combined = report.combine_seeds(reports, command)
  report.write_seeds(workdir, combined)
  return combined


def main(args) -> int:
  """The ``glajax run`` command: ``args.config`` and ``args.workdir``; prints where things went
  (``glajax.cli`` turns errors and Ctrl-C into one line)."""
  workdir = os.path.abspath(args.workdir)
  if getattr(args, "seeds", None):
    combined = run_seeds(args.config, args.workdir, args.seeds)
    print(f"Report:  {os.path.join(workdir, 'report.md')} (over seeds "
          f"{', '.join(map(str, combined['seeds']))}; each seed's in seed_<s>/)")
    return 0
  result = run(args.config, args.workdir)
  print(f"Report:  {os.path.join(workdir, 'report.md')} (numbers in report.json)")
  for plot in result["plots"]:
    print(f"Plot:    {os.path.join(workdir, plot)}")
  for name, path in result["final_models"].items():
    print(f"Model:   {path} ({name})")
  print(f"Logits:  {os.path.join(workdir, 'logits')}")
  timings = dict(result.get("timings_s", {}))
  total = timings.pop("total", None)
  print(f"\nTimings (this invocation):\n{report.timings_table(timings, total)}")
  return 0

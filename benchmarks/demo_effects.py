"""`glajax demo` over seeds: each effect's estimate and 95 % paired bootstrap interval per seed,
mean ± sd over the seeds, and in how many seeds it appeared (its interval excludes 0 on the
claimed side).

  python benchmarks/demo_effects.py --workdirs /tmp/demo_seed0 /tmp/demo_seed1 /tmp/demo_seed2 \
      --out benchmarks/results/demo_effects.md

Each work directory is one finished `glajax demo --seed S --workdir DIR` (its report.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

from glajax.demo import report as demo_report


def _cell(name: str, effect: dict) -> str:
  if not effect["measured"]:
    return "not measured"
  text = demo_report._format(name, effect["interval"])  # pylint: disable=protected-access
  return f"**{text}**" if effect["appeared"] else text


def table(reports: list[dict]) -> str:
  seeds = [r["seed"] for r in reports]
  lines = ["| effect | rule | " + " | ".join(f"seed {s}" for s in seeds)
           + " | mean ± sd | appeared | cost (seed mean) |",
           "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
  for name, first in reports[0]["effects"].items():
    effects = [r["effects"][name] for r in reports]
    values = [e["value"] for e in effects if e["measured"] and e["value"] is not None]
    scale = 1.0 if name in demo_report._UNITLESS else 100.0  # pylint: disable=protected-access
    unit = "" if scale == 1.0 else " pp"
    spread = (f"{scale * np.mean(values):+.{3 if scale == 1 else 1}f} ± "
              f"{scale * np.std(values, ddof=1):.{3 if scale == 1 else 1}f}{unit}"
              if len(values) > 1 else "–")
    costs = [e["cost"]["estimate"] for e in effects if e.get("cost")
             and e["cost"].get("estimate") is not None]
    cost = (f"{first['cost_column']} {100 * np.mean(costs):+.1f} pp" if costs else "–")
    lines.append(f"| {first['description']} | {demo_report._rule(name)} | "  # noqa  pylint: disable=protected-access
                 + " | ".join(_cell(name, e) for e in effects)
                 + f" | {spread} | {sum(e['appeared'] for e in effects)}/{len(effects)} | "
                 f"{cost} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdirs", nargs="+", required=True)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  reports = []
  for directory in args.workdirs:
    with open(os.path.join(directory, "report.json")) as f:
      reports.append(json.load(f))
  import jax, flax, optax  # noqa  (versions for the record)
  walls = ", ".join(f"{sum(r['timings_s'].values()):.0f} s" for r in reports)
  text = "\n".join([
      "# `glajax demo`: each effect over seeds", "",
      "Each cell: the effect's estimate with its 95 % paired bootstrap interval over the same "
      "test rows (bold: the interval excludes 0 on the claimed side, the effect appears). The "
      "world (its data) is fixed; the seed changes initialisation, pre-training and "
      "fine-tuning. The cost is what the same comparison does to the other metric (mean over "
      "seeds).", "",
      "Command (one per seed, full scale), then this table:", "", "```bash",
      "glajax demo --seed S --workdir /tmp/demo_seedS     # S = "
      + ", ".join(str(r["seed"]) for r in reports),
      "python benchmarks/demo_effects.py --workdirs " + " ".join(args.workdirs)
      + " --out benchmarks/results/demo_effects.md", "```", "",
      f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), no "
      f"accelerator; Python {platform.python_version()}, jax {jax.__version__}, flax "
      f"{flax.__version__}, optax {optax.__version__}. Wall clock per seed: {walls}.", "",
      table(reports), ""])
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

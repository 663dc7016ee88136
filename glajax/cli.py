"""The ``glajax`` command line: ``glajax demo [--workdir DIR] [--quick]`` and
``glajax run CONFIG[:arg,key=value,...] --workdir DIR``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="glajax", description="Fine-tuning CLIP without inheriting its biases, in JAX.")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = commands.add_parser("demo", help="run the embedded end-to-end example",
                             description="Runs the embedded end-to-end example and writes "
                             "report.json, report.md and plots into --workdir.")
  demo.add_argument("--workdir", default="glajax-demo",
                    help="where results and cached models go (default: %(default)s)")
  demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
  demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
  run = commands.add_parser("run", help="run an experiment config",
                            description="Runs CONFIG[:arg,key=value,...] (a configs/*.py file "
                            "or its name) in --workdir, resuming from it; writes report.json, "
                            "report.md, plots and final models there.")
  run.add_argument("config", metavar="CONFIG", help="e.g. configs/wise_ft.py:runlocal")
  run.add_argument("--workdir", required=True, help="where everything goes (resumed if present)")
  return parser


def _demo(args) -> int:
  try:
    demo = importlib.import_module("glajax.demo")
  except ModuleNotFoundError as e:
    if e.name != "glajax.demo":
      raise
    print("glajax demo: this installation has no glajax.demo package (the embedded example); "
          "reinstall glajax from a complete source tree.", file=sys.stderr)
    return 1
  return demo.main(args)


def _guarded(command: str, run, args) -> int:
  """``run(args)``, with bad input and Ctrl-C ended by one line and no traceback."""
  from glajax.errors import GlajaxError  # noqa  (keeps `glajax --help` light)
  try:
    return run(args)
  except GlajaxError as e:
    print(f"glajax {command}: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"glajax {command}: interrupted; what had finished (pre-trained models, finished runs, "
          f"cached logits, the last checkpoint of the run in progress) is kept in "
          f"{os.path.abspath(args.workdir)}: run the same command again to resume.",
          file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
  """Entry point of the ``glajax`` console script; returns the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command == "demo":
    return _guarded("demo", _demo, args)
  if args.command == "run":
    return _guarded("run", importlib.import_module("glajax.experiments").main, args)
  parser.print_help(sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())

"""The ``glajax`` command line: ``glajax demo [--workdir DIR] [--quick]``,
``glajax run CONFIG[:arg,key=value,...] --workdir DIR`` and ``glajax --version``.

TensorFlow's and absl's start-up and TFDS's informational lines are silenced unless
``--verbose`` is given (TensorFlow only feeds the input pipelines; its C++ logging is set by the
environment before it is imported).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import logging
import os
import sys
from pathlib import Path

_SYNTAX = """\
CONFIG is a config file or the name of a bundled one, then optional tokens after a colon:
  glajax run wise_ft --workdir ~/runs/wise_ft
  glajax run configs/gla_fewshot.py:dtd,gla.shots=4 --workdir ~/runs/dtd_4shot
  glajax run custom:runlocal,data.folder=~/pets --workdir /tmp/pets
tokens without '=' go to the file's get_config(arg) (e.g. runlocal: a tiny model on CPU);
key=value tokens override dotted config keys (values read as Python literals).
"""


def _bundled_configs() -> list[tuple[str, str]]:
  """(name, first phrase of its docstring) of every bundled config, without importing it."""
  from glajax.experiments.config import configs_dir  # noqa  (keeps `glajax --version` light)
  out = []
  for path in sorted(Path(configs_dir()).glob("*.py")):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    out.append((path.stem, _first_phrase(" ".join(doc.split()))))
  return out


def _first_phrase(text: str) -> str:
  """``text`` up to its first ": " outside parentheses (the whole text if none)."""
  depth = 0
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0 and text.startswith(": ", i):
      return text[:i]
  return text


def _run_epilog() -> str:
  names = _bundled_configs()
  width = max((len(n) for n, _ in names), default=0)
  listing = "\n".join(f"  {name:<{width}}  {title}" for name, title in names)
  return f"bundled configs:\n{listing}\n\n{_SYNTAX}"


def _parser(with_configs: bool) -> argparse.ArgumentParser:
  from glajax import __version__  # noqa  (the package's version only)
  parser = argparse.ArgumentParser(
      prog="glajax", description="Fine-tuning CLIP-like foundation models without inheriting "
      "their biases, in JAX.")
  parser.add_argument("--version", action="version", version=f"glajax {__version__}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--verbose", action="store_true",
                      help="keep TensorFlow's, absl's and TFDS's log lines")
  demo = commands.add_parser("demo", parents=[common], help="run the embedded end-to-end example",
                             description="Runs the embedded end-to-end example and writes "
                             "report.json, report.md and plots into --workdir.")
  demo.add_argument("--workdir", default="glajax-demo",
                    help="where results and cached models go (default: %(default)s)")
  demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
  demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
  run = commands.add_parser(
      "run", parents=[common], help="run an experiment config",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=_run_epilog() if with_configs else _SYNTAX,
      description="Runs CONFIG[:arg,key=value,...] in --workdir, resuming from it; checks the "
      "whole config first and writes nothing if it is wrong; writes report.json, report.md, "
      "plots and final models.")
  run.add_argument("config", metavar="CONFIG", help="a config file or a bundled config's name")
  run.add_argument("--workdir", required=True, help="where everything goes (resumed if present)")
  run.add_argument("--seeds", metavar="S,S,...",
                   help="run once per seed (e.g. 0,1,2) into WORKDIR/seed_<s> and report each "
                   "number as mean ± sd over the seeds beside its bootstrap interval")
  return parser


def _quiet(verbose: bool) -> None:
  """Silences TensorFlow's C++ start-up lines (oneDNN, absl::InitializeLog) and absl's Python
  warnings (TFDS's dataset-folder notes) unless ``verbose``."""
  if verbose:
    os.environ["GLAJAX_VERBOSE"] = "1"
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    from absl import logging as absl_logging  # noqa  (absl comes with JAX and TensorFlow)
  except ImportError:
    return
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("absl").setLevel(logging.ERROR)


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
  argv = sys.argv[1:] if argv is None else list(argv)
  _quiet("--verbose" in argv)  # before `run --help` reads the configs (imports TensorFlow)
  parser = _parser(with_configs="run" in argv and any(a in ("-h", "--help") for a in argv))
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help(sys.stderr)
    return 2
  if args.command == "demo":
    return _guarded("demo", _demo, args)
  return _guarded("run", importlib.import_module("glajax.experiments").main, args)


if __name__ == "__main__":
  sys.exit(main())

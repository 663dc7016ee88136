"""Executes the notebooks in the tiny setting (as tests/test_notebooks.py does) and saves them with
their outputs, so that the committed notebooks show what a run prints.

  python scripts/run_notebooks.py                    # every notebook in notebooks/
  python scripts/run_notebooks.py notebooks/own_data.ipynb --workdir /tmp/nb   # keep the caches

Each notebook runs with GLAJAX_TINY=1, JAX_PLATFORMS=cpu, HF_HUB_OFFLINE=1, MPLBACKEND=Agg and a
temporary GLAJAX_WORKDIR (or --workdir). In the saved outputs the work directory reads
``<GLAJAX_WORKDIR>`` and other machine paths are replaced, progress bars (carriage-return lines on
stderr) are dropped, and the kernel's execution metadata is removed, so a re-run changes only what
the notebook computes.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
TINY_ENV = {"GLAJAX_TINY": "1", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
            "TF_CPP_MIN_LOG_LEVEL": "2"}


# stderr lines that say nothing about the notebook: progress bars (TFDS's, tqdm's), the log lines
# TensorFlow and XLA print at import, tqdm's note that ipywidgets is missing (Colab has it)
NOISE = re.compile("|".join((
    r"\d+%\|", r"examples/s\]", r"\bit/s\]", r"s/it\]",
    r"^WARNING: All log messages before absl::InitializeLog",
    r"^[IWE]\d{4} [\d:.]+ +\d+ \w+\.cc:\d+\]",
    r"TqdmWarning: IProgress not found", r"from \.autonotebook import tqdm")))
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean_text(text: str, replacements: list[tuple[str, str]]) -> str:
  for old, new in replacements:
    text = text.replace(old, new)
  # a progress bar redraws its line with "\r": keep each line's last state only
  return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean(notebook, replacements: list[tuple[str, str]]) -> None:
  """Machine paths out of the outputs, progress bars out of stderr, volatile metadata off."""
  for cell in notebook.cells:
    if cell.cell_type != "code":
      continue
    cell.metadata.pop("execution", None)
    outputs = []
    for output in cell.outputs:
      if output.output_type == "stream":
        output.text = _clean_text(output.text, replacements)
        if output.name == "stderr":
          lines = [l for l in output.text.split("\n")
                   if _ANSI.sub("", l).strip() and not NOISE.search(l)]
          if not lines:
            continue
          output.text = "\n".join(lines) + "\n"
      elif output.output_type in ("display_data", "execute_result"):
        for mime, value in output.get("data", {}).items():
          if mime.startswith("text/") and isinstance(value, str):
            output.data[mime] = _clean_text(value, replacements)
      elif output.output_type == "error":
        output.traceback = [_clean_text(t, replacements) for t in output.traceback]
      outputs.append(output)
    cell.outputs = outputs


def execute(path: Path, workdir: Path, timeout: int = 1800) -> float:
  """Runs ``path`` in the tiny setting in ``workdir``, saves it with its outputs; the seconds."""
  saved = {k: os.environ.get(k) for k in (*TINY_ENV, "GLAJAX_WORKDIR")}
  os.environ.update(TINY_ENV, GLAJAX_WORKDIR=str(workdir))
  try:
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
    seconds = time.perf_counter() - start
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  real = os.path.realpath(workdir)
  replacements = [(p, "<GLAJAX_WORKDIR>") for p in sorted({str(workdir), real}, key=len,
                                                          reverse=True)]
  replacements += [(sys.prefix, "<python env>"), (str(ROOT), "<glajax checkout>"),
                   (os.path.expanduser("~"), "~")]
  clean(notebook, replacements)
  nbformat.write(notebook, path)
  return seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("notebooks", nargs="*", type=Path,
                      default=sorted((ROOT / "notebooks").glob("*.ipynb")))
  parser.add_argument("--workdir", type=Path, help="GLAJAX_WORKDIR (default: a temporary one "
                      "per notebook, removed afterwards)")
  args = parser.parse_args(argv)
  for path in args.notebooks:
    if args.workdir:
      args.workdir.mkdir(parents=True, exist_ok=True)
      seconds = execute(path, args.workdir.resolve())
    else:
      with tempfile.TemporaryDirectory(prefix="glajax-nb-") as tmp:
        seconds = execute(path, Path(tmp))
    errors = [o for c in nbformat.read(path, as_version=4).cells
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    print(f"{path.name}: {seconds:.0f} s" + (f", {len(errors)} error(s)" if errors else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Executes the notebooks in the tiny setting and saves them with their outputs, so that the
committed notebooks show what a run prints.

  python scripts/run_notebooks.py                    # every notebook in notebooks/, in place
  python scripts/run_notebooks.py --out /tmp/nbs     # write the executed copies there instead
  python scripts/run_notebooks.py notebooks/own_data.ipynb --workdir /tmp/nb   # keep the caches

CI runs it from the installed wheel (scripts/check_wheel.sh, with the wheel's environment's
python, outside the checkout), and ``bash scripts/check_wheel.sh --write-notebooks`` copies that
run's notebooks into notebooks/: the committed outputs come from it. The kernel is the python
that runs this script (its directory goes first on PATH).

Each notebook runs with GLAJAX_TINY=1, JAX_PLATFORMS=cpu, HF_HUB_OFFLINE=1, MPLBACKEND=Agg and one
GLAJAX_WORKDIR shared by all of them (a temporary one, or --workdir), so the demo's small CLIP is
pre-trained once. In the saved outputs the work directory reads ``<GLAJAX_WORKDIR>`` and other
machine paths are replaced, progress bars (carriage-return lines on stderr) are dropped, and the
kernel's execution metadata is removed, so a re-run changes only what the notebook computes.
Exits with status 1 if any cell raised (its error output is kept in the saved notebook).

``--compare DIR`` (CI) also compares each executed notebook with the one of the same name in DIR
(the committed outputs) and exits with status 1 where they differ: cell by cell, each output's
kind and its text with every content hash read as ``<hash>``, every number as ``#`` and runs of
spaces as one (timings, last-digit changes and keys of the temporary work directory pass; a row, a warning, a message or an output that appeared or went away
does not); images by their presence.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbclient.exceptions
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
    cell.outputs = _joined_streams(outputs)


# content hashes (config fingerprints, run and cache keys): they name the temporary work directory
# (12 or 16 hex digits, some of them all decimal digits): any run of 8 or more, not inside a number
_HASH = re.compile(r"(?<![0-9A-Za-z.,])[0-9a-f]{8,}(?![0-9A-Za-z.,])")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_SPACES = re.compile(r"[ \t]+")
_RULE = re.compile(r"-{3,}|={3,}|─{3,}")


def _normal(text: str) -> str:
  text = _NUMBER.sub("#", _HASH.sub("<hash>", text))
  text = _RULE.sub("---", text)
  return "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n")).strip()


def _joined_streams(outputs: list) -> list:
  """Consecutive writes to one stream as one output: the kernel splits them by timing, not by
  content."""
  joined = []
  for output in outputs:
    if (output.output_type == "stream" and joined and joined[-1].output_type == "stream"
        and joined[-1].name == output.name):
      joined[-1] = nbformat.from_dict({**joined[-1], "text": joined[-1].text + output.text})
    else:
      joined.append(output)
  return joined


def signature(notebook) -> list[tuple[int, list[str]]]:
  """(code cell number, its outputs as normalised lines): what --compare compares."""
  cells = []
  for index, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
    lines = []
    outputs = cell.get("outputs", [])
    # stderr is not ordered with respect to stdout and displays (separate buffers): compared
    # as one block after them
    ordered = [o for o in outputs if not (o.output_type == "stream" and o.name == "stderr")]
    ordered += [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    for output in _joined_streams(ordered):
      kind = output.output_type
      if kind == "stream":
        lines += [f"[{output.name}]"] + _normal(output.text).split("\n")
      elif kind in ("display_data", "execute_result"):
        data = output.get("data", {})
        text = data.get("text/markdown") or data.get("text/plain")
        images = sorted(m for m in data if m.startswith("image/"))
        lines += [f"[{kind} {' '.join(images)}]".replace(" ]", "]")]
        if text is not None and not images:
          lines += _normal(text if isinstance(text, str) else "".join(text)).split("\n")
      elif kind == "error":
        lines += [f"[error] {output.get('ename')}: {_normal(str(output.get('evalue')))}"]
    cells.append((index, lines))
  return cells


def compare(executed: Path, committed: Path) -> list[str]:
  """The differences between two notebooks' :func:`signature`, as a unified diff per cell
  (empty when they agree)."""
  if not committed.is_file():
    return [f"{committed}: no committed notebook to compare with"]
  ours = signature(nbformat.read(executed, as_version=4))
  theirs = signature(nbformat.read(committed, as_version=4))
  if len(ours) != len(theirs):
    return [f"{committed.name}: {len(ours)} code cells executed, {len(theirs)} committed"]
  problems = []
  for (index, new), (_, old) in zip(ours, theirs):
    if new != old:
      problems.append(f"{committed.name}, code cell {index + 1}:\n" + "\n".join(
          difflib.unified_diff(old, new, "committed", "executed", lineterm="", n=1)))
  return problems


def execute(path: Path, workdir: Path, out: Path, timeout: int = 1800) -> float:
  """Runs ``path`` in the tiny setting in ``workdir``, saves it with its outputs to ``out``;
  the seconds. A cell's error stops the run; the notebook is saved with it."""
  saved = {k: os.environ.get(k) for k in (*TINY_ENV, "GLAJAX_WORKDIR", "PATH")}
  os.environ.update(TINY_ENV, GLAJAX_WORKDIR=str(workdir),
                    PATH=os.pathsep.join((os.path.dirname(sys.executable),
                                          os.environ.get("PATH", ""))))
  notebook = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  try:
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
  except nbclient.exceptions.CellExecutionError:
    pass  # the error is in the cell's outputs
  finally:
    seconds = time.perf_counter() - start
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
  nbformat.write(notebook, out)
  return seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("notebooks", nargs="*", type=Path,
                      default=sorted((ROOT / "notebooks").glob("*.ipynb")))
  parser.add_argument("--workdir", type=Path, help="GLAJAX_WORKDIR, shared by the notebooks "
                      "(default: a temporary one, removed afterwards)")
  parser.add_argument("--out", type=Path, help="write the executed notebooks into this folder "
                      "(default: over the notebooks themselves)")
  parser.add_argument("--compare", type=Path, help="compare each executed notebook's outputs "
                      "with the same-named one in this folder (the committed notebooks); "
                      "status 1 where they differ")
  args = parser.parse_args(argv)
  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
  failed = []
  with tempfile.TemporaryDirectory(prefix="glajax-nb-") as tmp:
    workdir = args.workdir or Path(tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    for path in args.notebooks:
      out = args.out / path.name if args.out else path
      seconds = execute(path, workdir.resolve(), out)
      errors = [o for c in nbformat.read(out, as_version=4).cells
                for o in c.get("outputs", []) if o.get("output_type") == "error"]
      print(f"{path.name}: {seconds:.0f} s" + (f", {len(errors)} error(s)" if errors else ""),
            flush=True)
      if errors:
        failed.append(path.name)
        print("\n".join(f"  {e.get('ename')}: {e.get('evalue')}" for e in errors))
      elif args.compare:
        stale = compare(out, args.compare / path.name)
        if stale:
          failed.append(path.name)
          print(f"{path.name}: its outputs differ from the committed ones (regenerate them "
                "with `bash scripts/check_wheel.sh --write-notebooks`):")
          print("\n".join(stale))
  if failed:
    print(f"notebooks that failed: {', '.join(failed)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

"""The Colab notebooks: Colab-ready (a badge, an install cell that follows the README), committed
with the outputs of a run in the tiny setting. Their execution is CI's wheel check
(scripts/check_wheel.sh runs scripts/run_notebooks.py from the installed wheel, outside the
checkout, and fails on any error or on outputs that differ from the committed ones beyond
numbers); ``bash scripts/check_wheel.sh --write-notebooks`` writes the
committed outputs from that run."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BADGE = "https://colab.research.google.com/github/glajax/glajax/blob/main/notebooks/{}.ipynb"


def _cells(path):
  return json.loads(path.read_text())["cells"]


def _source(cell) -> str:
  return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _code(path):
  return [c for c in _cells(path) if c["cell_type"] == "code"]


def test_the_four_notebooks_are_there():
  assert {p.stem for p in NOTEBOOKS} == {"quick_start", "robust_finetuning_wise_ft",
                                         "absent_class_calibration", "own_data"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_badge_and_install_cell(path):
  first = _cells(path)[0]
  assert first["cell_type"] == "markdown" and BADGE.format(path.stem) in _source(first)
  install = _source(_code(path)[0])
  # the README's Install section: Colab GPU glajax[cuda], TPU glajax[tpu], else the tf extra,
  # from the repository, only when glajax is missing, before JAX is imported
  assert 'find_spec("glajax") is None' in install
  assert "git+https://github.com/glajax/glajax" in install
  for extra in ('"cuda"', '"tpu"', '"tf"'):
    assert extra in install
  assert "import jax" not in install


def _displays_results(cell) -> bool:
  """A cell that runs an experiment, prints or displays something."""
  source = _source(cell)
  return bool(re.search(r"\b(print|display)\(", source)) or "experiments.run(" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_of_a_clean_run(path):
  """Every cell that shows results has the outputs of one run top to bottom, with no error and
  no machine path (``bash scripts/check_wheel.sh --write-notebooks`` writes them)."""
  code = _code(path)
  # the install cell (the first) prints only when it installs, and glajax is installed here
  missing = [i for i, cell in enumerate(code) if i > 0 and _displays_results(cell)
             and not cell["outputs"]]
  assert not missing, (f"{path.name}: code cells {missing} have no outputs; run "
                       "`bash scripts/check_wheel.sh --write-notebooks` and commit the notebooks")
  counts = [c["execution_count"] for c in code if c["outputs"]]
  assert counts == sorted(counts) and None not in counts, "outputs of more than one run"
  text = json.dumps([c["outputs"] for c in code])
  assert '"output_type": "error"' not in text
  assert not re.search(r"/tmp/|/home/|/work/|/Users/|/content/", text), \
      "a machine-specific path in the outputs"
  assert any('"image/png"' in json.dumps(c["outputs"]) for c in code), "no plot shown"
  assert len(path.read_bytes()) < 1_000_000



def _run_notebooks_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" /
                                                "run_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_compare_flags_stale_outputs_and_passes_changed_numbers(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  module = _run_notebooks_module()
  committed = NOTEBOOKS[0]
  assert module.compare(committed, committed) == []
  notebook = nbformat.read(committed, as_version=4)
  streams = [(c, o) for c in notebook.cells if c.cell_type == "code"
             for o in c.get("outputs", []) if o.output_type == "stream" and re.search(r"\d", o.text)]
  assert streams, "no output with a number to change"
  cell, output = streams[0]
  output.text = re.sub(r"\d", lambda m: str((int(m.group()) + 3) % 10), output.text) + "  "
  changed = tmp_path / "numbers.ipynb"
  nbformat.write(notebook, changed)
  assert module.compare(changed, committed) == []   # numbers and spacing only
  output.text += "a row that the committed outputs lack\n"
  stale = tmp_path / "stale.ipynb"
  nbformat.write(notebook, stale)
  problems = module.compare(stale, committed)
  assert len(problems) == 1 and "+a row that the committed outputs lack" in problems[0]
  cell.outputs = []
  nbformat.write(notebook, stale)
  assert module.compare(stale, committed) != []


def test_compare_reads_content_hashes_as_hashes_whatever_their_digits():
  module = _run_notebooks_module()
  # run keys name the temporary work directory; a 12-hex key may hold no letter at all
  assert module._normal("zeroshot-123456789012: accuracy 45.5 %") == module._normal(  # noqa
      "zeroshot-1af64e6d9d3f: accuracy 51.0 %") == "zeroshot-<hash>: accuracy # %"
  assert module._normal("1,797 images, 0.12345678") == "# images, #"  # noqa  numbers stay numbers


def test_compare_reads_one_stream_split_into_several_writes_as_one(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  module = _run_notebooks_module()
  committed = NOTEBOOKS[0]
  notebook = nbformat.read(committed, as_version=4)
  found = [(c, i) for c in notebook.cells if c.cell_type == "code"
           for i, o in enumerate(c.get("outputs", []))
           if o.output_type == "stream" and o.text.count("\n") >= 2]
  assert found, "no stream output of two lines to split"
  cell, index = found[0]
  text = cell.outputs[index].text
  cut = text.index("\n") + 1   # the kernel flushed after the first line
  cell.outputs[index:index + 1] = [
      nbformat.v4.new_output("stream", name=cell.outputs[index].name, text=part)
      for part in (text[:cut], text[cut:])]
  split = tmp_path / "split.ipynb"
  nbformat.write(notebook, split)
  assert module.compare(split, committed) == []
  cell.outputs[index + 1].name = "stderr" if cell.outputs[index].name == "stdout" else "stdout"
  nbformat.write(notebook, split)
  assert module.compare(split, committed) != []   # a different stream is still a difference


def test_compare_reads_stderr_apart_from_the_order_of_its_flushes(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  module = _run_notebooks_module()
  committed = NOTEBOOKS[0]
  notebook = nbformat.read(committed, as_version=4)
  cell = next(c for c in notebook.cells if c.cell_type == "code"
              and any(o.output_type == "stream" and o.name == "stdout" for o in c.outputs))
  warning = nbformat.v4.new_output("stream", name="stderr", text="UserWarning: something\n")
  before, after = tmp_path / "before.ipynb", tmp_path / "after.ipynb"
  cell.outputs.insert(0, warning)
  nbformat.write(notebook, before)
  cell.outputs.append(cell.outputs.pop(0))
  nbformat.write(notebook, after)
  assert module.compare(before, after) == []
  assert module.compare(before, committed) != []   # the warning itself is still a difference

"""The Colab notebooks execute top to bottom in the tiny setting (nbclient, no network)."""
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_are_there():
  assert {p.stem for p in NOTEBOOKS} == {"quick_start", "robust_finetuning_wise_ft",
                                         "absent_class_calibration"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_the_tiny_setting(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("GLAJAX_TINY", "1")
  monkeypatch.setenv("GLAJAX_WORKDIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for cell in notebook.cells for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  assert (tmp_path / next(d for d in os.listdir(tmp_path) if d != "tfds"
                          and (tmp_path / d / "report.md").exists()) / "report.md").exists()

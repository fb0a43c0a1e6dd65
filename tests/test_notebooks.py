"""The notebooks run top to bottom on CPU (nbclient, the python3 kernel of this interpreter, from the repo
root) without errors."""

import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
  notebook = nbformat.read(path, as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
      f"{path.name} is stored with outputs; clear them before committing"
  client = NotebookClient(notebook, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(REPO)}})
  start = time.perf_counter()
  client.execute()
  elapsed = time.perf_counter() - start
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "expected an inline plot"
  print(f"{path.name}: {elapsed:.1f} s")

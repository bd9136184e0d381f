"""Executes notebooks/icarus_quickstart.ipynb top to bottom (small size) on CPU."""

import os
import sys
from pathlib import Path

import pytest

NB = Path(__file__).resolve().parent.parent / "notebooks" / "icarus_quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(NB, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
  os.environ["ICARUS_NOTEBOOK_SMALL"] = "1"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from jupyter_client.kernelspec import KernelSpecManager  # noqa: F401 (ships with nbclient)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(NB.parent)}})
  client.execute()  # raises CellExecutionError when any cell (or assertion cell) fails
  text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "caches identical, predictions differ" in text

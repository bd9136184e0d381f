"""Executes notebooks/icarus_quickstart.ipynb top to bottom (small size) on CPU.

Its section 1 is the main job's own code path (``icarus_jax.bench.demo.run_demo``) on
SmolLM2-135M-Instruct at a reduced size, and its next cell checks the claims from the JSON the
run saved: K/V bit-identical across models while their predictions differ, each adapter's
held-out answer right (the base's not) and equal to the naive reference, the adapter's prompt
read from the base's cache, no program compiled inside the timed window, and ICaRus computing
fewer prefill tokens than the conventional baseline under the same KV budget."""

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

"""notebooks/quickstart.ipynb runs top to bottom (a tiny setting) and is stored without outputs."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_stored_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_JAX_QUICKSTART_STEPS", "200")
    monkeypatch.setenv("VAE_JAX_NO_REEXEC", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    try:
        client.execute()
    except Exception as e:  # noqa: BLE001 - nbclient raises CellExecutionError with the cell
        pytest.fail(f"{NOTEBOOK.name} failed: {e}")
    text = "".join(
        out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )
    assert "trained 200 steps" in text
    assert "iw_nll" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the curves and the latent space
    assert os.listdir(REPO / "notebooks") == ["quickstart.ipynb"]  # nothing written beside it

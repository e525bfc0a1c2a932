"""The notebooks run top to bottom, and the committed ones carry no outputs.

Each notebook is executed in a fresh ``python3`` kernel (this interpreter: jupyter_client starts
kernels whose command is ``python`` with ``sys.executable``) with ``CIRCUITDYN_QUICK=1``, the
tiny settings every notebook reads. ``03_validation_experiment.ipynb`` reads the replication
directory of the session-scoped ``replication_dir`` fixture (tests/conftest.py: one quick
replication per session, shared with the replication tests) through ``CIRCUITDYN_REPLICATION``.
"""

from __future__ import annotations

from pathlib import Path

# Plain imports: the notebook tests fail, never skip, when the test extra is not installed.
import ipykernel  # noqa: F401  (provides the python3 kernel the notebooks run in)
import nbclient
import nbformat
import plotly.graph_objects as go
import pytest
from figure_check import check_figure

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = [
    "01_quickstart.ipynb",
    "02_circuit_tuning.ipynb",
    "03_validation_experiment.ipynb",
    "04_circuit_formation.ipynb",
]
NEEDS_REPLICATION = {"03_validation_experiment.ipynb"}
CELL_TIMEOUT_S = 300
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def test_every_notebook_is_known():
    """A new notebook must be added here (and so get executed by `test_notebook_runs`)."""
    assert NOTEBOOKS == EXPECTED


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    """Outputs in the repository would go stale; strip them before committing (e.g.
    ``jupyter nbconvert --clear-output --inplace notebooks/*.ipynb``)."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{name}: code cell {index} has outputs"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"
        assert "execution" not in cell.metadata, f"{name}: code cell {index} has execution times"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch, request):
    monkeypatch.setenv("CIRCUITDYN_QUICK", "1")
    if name in NEEDS_REPLICATION:
        monkeypatch.setenv(
            "CIRCUITDYN_REPLICATION", str(request.getfixturevalue("replication_dir"))
        )
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    # Every figure the notebook shows passes the figure check (finite data, titled axes).
    figures = [
        output["data"][PLOTLY_MIME]
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if PLOTLY_MIME in output.get("data", {})
    ]
    assert figures, f"{name} showed no figure"
    for index, figure in enumerate(figures):
        check_figure(go.Figure(figure), f"{name} figure {index}")

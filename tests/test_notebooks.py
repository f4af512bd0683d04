"""Every notebook in notebooks/ runs top to bottom (nbclient, a fresh python3 kernel, the
notebooks folder as working directory). Notebooks that analyse the shared routing data say so in
their metadata (``moesim.needs_shared_data``) and are skipped, with the reason, where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.conftest import SHARED_DATA  # noqa: E402

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


def test_the_five_notebooks_are_there():
    assert {p.stem for p in NOTEBOOKS} >= {"esft_trace_analysis", "cache_policy_study", "placement_study",
                                          "alltoall_scaling", "validation_report"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    book = nbformat.read(path, as_version=4)
    if book.metadata.get("moesim", {}).get("needs_shared_data") and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} analyses the shared routing data: {SHARED_DATA} is absent")
    monkeypatch.setenv("MOESIM_SHARED_DATA", str(SHARED_DATA))
    client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(FOLDER)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any failure
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # every notebook shows at least one figure or table it computed
    rich = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") in ("execute_result", "display_data")]
    assert rich, f"{path.name} displayed nothing"

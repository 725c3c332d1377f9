"""The notebooks stay clean (no outputs, no logic of their own) and run end to end.

They execute with nbclient in ``notebooks/`` on conftest's tiny synthetic run (``tiny_run``,
shared with test_report.py); with ``SVHN_DATA_DIR`` set, notebook 01 also runs on that (real)
data with a temp cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPLORE = NOTEBOOKS / "01_explore_data.ipynb"
ERRORS = NOTEBOOKS / "02_error_analysis.ipynb"
MAX_CODE_LINES = 8
LOGIC = re.compile(r"^\s*(def |class |for |while |with |try:|if )", re.MULTILINE)


def code_cells(path: Path) -> list[nbformat.NotebookNode]:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def execute(path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """Run a notebook in notebooks/ with ``env`` added to the kernel's environment."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return notebook


def figures_shown(notebook) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells
               if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.parametrize("path", [EXPLORE, ERRORS], ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    for cell in code_cells(path):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", [EXPLORE, ERRORS], ids=lambda p: p.stem)
def test_notebook_cells_are_short_calls_with_a_sentence_each(path):
    cells = nbformat.read(path, as_version=4).cells
    for cell in cells[3:]:  # after the title, path bootstrap and imports
        if cell.cell_type == "code":
            assert len(cell.source.splitlines()) <= MAX_CODE_LINES, cell.source
            assert not LOGIC.search(cell.source), f"logic belongs in svhn/: {cell.source}"
    markdown = [c for c in cells if c.cell_type == "markdown"]
    assert len(markdown) >= len(code_cells(path)) // 2


def test_explore_notebook_runs_on_synthetic_data(tiny_run, tmp_path, monkeypatch):
    notebook = execute(EXPLORE, {"SVHN_DATA_DIR": str(tiny_run["data"]),
                                 "SVHN_CACHE_DIR": str(tmp_path / "cache")}, monkeypatch)
    assert figures_shown(notebook) == 6


def test_error_notebook_runs_on_a_tiny_checkpoint(tiny_run, monkeypatch):
    notebook = execute(ERRORS, {"SVHN_DATA_DIR": str(tiny_run["data"]),
                                "SVHN_CACHE_DIR": str(tiny_run["cache"]),
                                "SVHN_CKPT": str(tiny_run["ckpt"])}, monkeypatch)
    assert figures_shown(notebook) == 5
    text = "".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
                   for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs)
    assert str(tiny_run["ckpt"]) in text and "'images': 40" in text


@pytest.mark.real_data
@pytest.mark.skipif(not os.environ.get("SVHN_DATA_DIR"),
                    reason="set SVHN_DATA_DIR to the competition data to run on it")
def test_explore_notebook_runs_on_real_data(tmp_path, monkeypatch):
    # The data folder may be read-only: the cache goes to a temp folder.
    notebook = execute(EXPLORE, {"SVHN_CACHE_DIR": str(tmp_path / "cache")}, monkeypatch)
    assert figures_shown(notebook) == 6

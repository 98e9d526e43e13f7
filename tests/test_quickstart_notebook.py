"""colab/quickstart.ipynb runs top to bottom (tiny size, no installs) in a fresh kernel.

The kernel is jupyter's built-in "python3" spec, i.e. this interpreter (ipykernel is in .venv).
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "quickstart.ipynb"


def test_notebook_never_installs_outside_colab():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any(re.search(r"\bpip\b", c.source) for c in nb.cells if c.cell_type == "code")
    for cell in nb.cells:
        if cell.cell_type == "code" and re.search(r"\bpip\b", cell.source):
            assert "if IN_COLAB and not os.environ.get(\"EPMQ_NO_INSTALL\")" in cell.source
            assert "!pip" not in cell.source and "%pip" not in cell.source


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path_factory, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Shares the tiny run directory (and its training cache) with tests/test_pipeline_e2e.py.
    monkeypatch.setenv("EPMQ_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("EPMQ_NOTEBOOK_WORKDIR", str(tmp_path_factory.getbasetemp() / "epmq_tiny_run"))
    monkeypatch.setenv("EPMQ_NO_INSTALL", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(ROOT / "colab")}})
    client.execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                        for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "repository root: " + str(ROOT) in outputs
    assert "reproduced:" in outputs
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3

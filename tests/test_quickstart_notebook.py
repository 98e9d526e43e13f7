"""colab/quickstart.ipynb runs top to bottom (tiny size, no installs) in a fresh kernel.

The kernel is jupyter's built-in "python3" spec, i.e. this interpreter (ipykernel is in .venv).
The set-up cells are checked in tests/test_notebook_setup.py.
"""

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path_factory, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Shares the tiny run directory (and its training cache) with tests/test_pipeline_e2e.py.
    workdir = tmp_path_factory.getbasetemp() / "epmq_tiny_run"
    monkeypatch.setenv("EPMQ_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("EPMQ_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("EPMQ_INSTALL", "never")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(ROOT / "colab")}})
    client.execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                        for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "repository root: " + str(ROOT) in outputs
    assert "EPMQ_INSTALL=never: using the installed epmq_jax" in outputs
    assert "backend cpu" in outputs
    doc = json.loads((workdir / "results.json").read_text())
    for r in doc["rows"]:                   # the summary cell prints what results.json holds
        if r["method"] == "epmq" and r["default"]:
            assert f"{r['merge']:8s} w{r['bits']}: E-PMQ {r['avg']:.1f}" in outputs
    for name in doc["checkpoints"]:
        assert f"{name} reproduced:" in outputs
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3

"""colab/paper_clip_vit_b32.ipynb is a valid notebook whose code is valid Python.

It needs network and a GPU/TPU (hub checkpoints, data sets), so it is not executed here; these
checks catch a broken file, a syntax error, or a cell that drifted from the config and the API.
"""

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "paper_clip_vit_b32.ipynb"


def _python(src):
    """A code cell without its IPython shell / magic lines."""
    return "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%")))


def _code(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_valid_nbformat_v4():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # saved clean


def test_code_cells_parse_and_reference_existing_names():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    sources = _code(nb)
    for i, src in enumerate(sources):
        ast.parse(_python(src), filename=f"cell {i}")
    text = "\n".join(sources)
    assert (ROOT / "configs" / "clip_vit_b32_ta8.py").is_file()
    assert 'load_config("configs/clip_vit_b32_ta8.py")' in text
    # the package is installed only inside Colab (as in the quickstart notebook)
    for src in sources:
        if re.search(r"\bpip\b", src):
            assert 'if IN_COLAB and not os.environ.get("EPMQ_NO_INSTALL")' in src
    # every imported epmq_jax name exists
    for src in sources:
        tree = ast.parse(_python(src))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("epmq_jax"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}"), f"{node.module}.{alias.name}"


def test_table_rows_cover_the_paper_methods():
    text = "\n".join(_code(nbformat.read(NOTEBOOK, as_version=4)))
    for merge, method in [("expert", "fp"), ("ta", "fp"), ("ta", "rtn"), ("ta", "gptq"),
                          ("ta", "awq"), ("ta", "epmq")]:
        assert f'("{merge}", "{method}")' in text
    assert "65.0" in text and "73.6" in text

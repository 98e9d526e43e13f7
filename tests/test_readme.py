"""The README's library example runs as written (so the documented API cannot drift)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("## The library"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    # The example's own outputs, checked against independent facts, not earlier runs.
    w, w_hat = namespace["w"], namespace["w_hat"]
    assert w_hat.shape == w.shape
    assert namespace["q_epmq"].dequantize().shape == w.shape
    assert len(namespace["result"].stats) == 2 * 6   # 2 blocks x (q, k, v, out, fc1, fc2)
    assert namespace["features"].shape == (32, 16)
    assert "damping used" in capsys.readouterr().out
    # GPTQ's reported objective is tr(ΔᵀHΔ) (recomputed here in float64) and beats RTN's.
    x = np.asarray(namespace["x"], np.float64)
    h = x.T @ x
    d_gptq = np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)
    d_rtn = np.asarray(namespace["q_rtn"].dequantize(), np.float64) - np.asarray(w, np.float64)
    obj_gptq, obj_rtn = np.trace(d_gptq.T @ h @ d_gptq), np.trace(d_rtn.T @ h @ d_rtn)
    np.testing.assert_allclose(float(namespace["info"].objective), obj_gptq, rtol=1e-3)
    assert obj_gptq < obj_rtn

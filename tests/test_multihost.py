"""Multi-host calibration for real: two processes on localhost, 2 CPU devices each, joined by
``jax.distributed`` (gloo), calibrate a tiny Llama over the 4 global devices with experts
streamed from disk; process 0 gathers and saves. The reference is the same run in this one
process over 4 of its devices (tests/_multihost_worker.py holds both).

GPTQ must come out bit for bit (same codes, same reported objectives): the statistics are
added across devices in a fixed order, so one process or two give the same bits. E-PMQ must
be of equal quality (its objective values within float32 precision).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _multihost_worker import METHODS, run
from test_models_llama import torch_model

from epmq_jax import checkpoint
from epmq_jax._tree import leaves_with_paths
from epmq_jax.quant import is_quantized

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_available() -> bool:
    """Whether this jaxlib has the gloo CPU collectives (what ``jax_cpu_collectives_implementation
    = "gloo"`` builds on when ``jax.distributed`` is initialised)."""
    from jax._src.lib import _jax

    return hasattr(_jax, "make_gloo_tcp_collectives")


def _run_processes(checkpoints: Path, out: Path, n: int, timeout_s: float) -> None:
    """Runs the ``n`` worker processes; fails (with each one's log) when one fails or the
    deadline passes, killing the others at once rather than waiting for their timeouts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("XLA_FLAGS", None)           # each worker sets its own device count
    port = _free_port()
    logs = [out / f"process{i}.log" for i in range(n)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as fh:       # files, not pipes: a full pipe cannot stall a worker
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "_multihost_worker.py"), str(checkpoints),
                 str(out), str(n), str(i), str(port)], env=env, stdout=fh, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            timed_out = time.monotonic() > deadline
            if timed_out or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        why = f"timed out after {timeout_s:.0f} s" if timed_out else "failed"
        tails = "\n".join(f"--- process {i} (exit {rc}) ---\n{logs[i].read_text()[-3000:]}"
                           for i, rc in failed)
        pytest.fail(f"multi-host run {why} (port {port}):\n{tails}")


def _flat(tree):
    """{path: array} with every QuantizedWeight field (packed codes, scales, zeros) as its own entry."""
    out = {}
    for path, leaf in leaves_with_paths(tree, is_leaf=is_quantized):
        if is_quantized(leaf):
            for field in ("packed", "scales", "zeros"):
                if getattr(leaf, field) is not None:
                    out[f"{path}/{field}"] = np.asarray(getattr(leaf, field))
        else:
            out[path] = np.asarray(leaf)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("multihost_ckpt")
    for seed, name in enumerate(("base", "e0", "e1")):
        torch_model(d / name, "llama", seed=seed)
    return d


@pytest.mark.slow
@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_two_processes_match_one(checkpoints, tmp_path):
    _run_processes(checkpoints, tmp_path, 2, timeout_s=240)

    assert len(jax.devices()) >= 4
    reference = run(str(checkpoints), jax.devices()[:4])
    for method in METHODS:
        ref_tree, ref_stats = reference[method]
        got, want = _flat(checkpoint.load(tmp_path / method)), _flat(ref_tree)
        assert got.keys() == want.keys()
        stats = json.loads((tmp_path / f"{method}_stats.json").read_text())
        assert [s["path"] for s in stats] == [s["path"] for s in ref_stats]
        if method == "gptq":
            for path in want:
                np.testing.assert_array_equal(got[path], want[path], err_msg=path)
            assert [s["obj_rounded"] for s in stats] == [s["obj_rounded"] for s in ref_stats]
        else:
            for s, r in zip(stats, ref_stats):
                for key in ("obj_merged", "obj_relaxed", "obj_rounded"):
                    assert s[key] == pytest.approx(r[key], rel=1e-5), (s["path"], key)

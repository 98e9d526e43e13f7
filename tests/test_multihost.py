"""Multi-host calibration for real: two processes on localhost, 2 CPU devices each, joined by
``jax.distributed`` (gloo), calibrate a tiny Llama over the 4 global devices with experts
streamed from disk; process 0 gathers and saves. The reference is the same run in a single
process over 4 devices (no distributed runtime), started beside them (tests/_multihost_worker.py).

GPTQ must come out bit for bit (same codes, scales, zeros, reported objectives): the statistics are
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

import numpy as np
import pytest
from _multihost_worker import METHODS
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


def _run_processes(checkpoints: Path, jobs: list[tuple[Path, int, int]], timeout_s: float) -> None:
    """Runs one worker per ``(out_dir, num_processes, process_id)``, all at once; fails (with the
    failed ones' logs) when one fails or the deadline passes, killing the others at once rather
    than waiting for their own timeouts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("XLA_FLAGS", None)           # each worker sets its own device count
    port = _free_port()
    logs = [out / f"process{i}_of_{n}.log" for out, n, i in jobs]
    procs = []
    for (out, n, i), log in zip(jobs, logs):
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
    failed = [(k, p.returncode) for k, p in enumerate(procs) if p.returncode != 0]
    if failed:
        why = f"timed out after {timeout_s:.0f} s" if timed_out else "failed"
        tails = "\n".join(f"--- process {jobs[k][2]} of {jobs[k][1]} (exit {rc}) ---\n"
                           f"{logs[k].read_text()[-3000:]}" for k, rc in failed)
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
    for seed, name in enumerate(("base", "e0", "e1")):   # every kernel 32x32: fewer compilations
        torch_model(d / name, "llama", seed=seed, num_key_value_heads=4, intermediate_size=32)
    return d


@pytest.mark.slow
@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_two_processes_match_one(checkpoints, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    # the two processes of the multi-host run and the single-process reference, side by side
    _run_processes(checkpoints, [(two, 2, 0), (two, 2, 1), (one, 1, 0)], timeout_s=240)
    for method in METHODS:
        got, want = _flat(checkpoint.load(two / method)), _flat(checkpoint.load(one / method))
        assert got.keys() == want.keys() and any(k.endswith("/packed") for k in got)
        stats, ref_stats = (json.loads((d / f"{method}_stats.json").read_text()) for d in (two, one))
        assert [s["path"] for s in stats] == [s["path"] for s in ref_stats]
        if method == "gptq":
            for path in want:
                np.testing.assert_array_equal(got[path], want[path], err_msg=path)
            for key in ("obj_merged", "obj_relaxed", "obj_rounded"):
                assert [s[key] for s in stats] == [s[key] for s in ref_stats], key
        else:
            for s, r in zip(stats, ref_stats):
                for key in ("obj_merged", "obj_relaxed", "obj_rounded"):
                    assert s[key] == pytest.approx(r[key], rel=1e-5), (s["path"], key)

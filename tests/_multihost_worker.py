"""One process of the multi-host calibration test (tests/test_multihost.py), and the run it makes.

    python tests/_multihost_worker.py CKPT_DIR OUT_DIR NUM_PROCESSES PROCESS_ID PORT

Each process sees 4 / NUM_PROCESSES CPU devices and, when NUM_PROCESSES > 1, joins the others
through ``jax.distributed`` (gloo collectives on localhost); it calibrates the tiny Llama in
``CKPT_DIR/base`` with the experts ``CKPT_DIR/e0``, ``CKPT_DIR/e1`` streamed from disk, over a
mesh of all 4 global devices, with GPTQ and with E-PMQ. Every process loads the merged model and
the same calibration inputs (a global view); the results are gathered to every process
(:func:`epmq_jax.parallel.gather_to_host`) and process 0 saves them with
:func:`epmq_jax.checkpoint.save` (one directory per method) beside the per-layer statistics.
NUM_PROCESSES = 1 is the single-process reference (no distributed runtime).
"""

from __future__ import annotations

import json
import os
import sys

METHODS = ("gptq", "epmq")
#: GPTQ keeps every H whole on each device, E-PMQ splits them over rows (every d_in is 32)
H_ROWS_FROM = {"gptq": None, "epmq": 32}


def run(ckpt_dir: str, devices) -> dict:
    """``{method: (calibrated params as NumPy, per-layer statistics)}`` over a mesh of ``devices``."""
    import numpy as np
    from flax import nnx

    from epmq_jax.calib import CalibConfig, Objective, calibrate, decoder_adapter
    from epmq_jax.models import from_pretrained, llama
    from epmq_jax.parallel import gather_to_host, make_mesh
    from epmq_jax.quant import QuantSpec

    model = from_pretrained(os.path.join(ckpt_dir, "base"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    experts = llama.experts_from_pretrained([os.path.join(ckpt_dir, e) for e in ("e0", "e1")],
                                            like=params)
    rng = np.random.default_rng(0)
    tasks = []
    for n in (6, 5):
        mask = (np.arange(10)[None, :] >= rng.integers(0, 4, (n, 1))).astype(np.int32)
        tasks.append({"input_ids": rng.integers(0, 96, (n, 10)), "attention_mask": mask})
    mesh = make_mesh(("data",), devices=devices)
    spec = QuantSpec(bits=4, group_size=16)
    out = {}
    for method in METHODS:
        objective = Objective(kind="gptq") if method == "gptq" else Objective(kind="epmq", lam=0.1)
        result = calibrate(decoder_adapter(model), params, tasks,
                           CalibConfig(objective=objective, spec=spec, batch_size=4),
                           experts=experts if method == "epmq" else None, mesh=mesh,
                           h_rows_from=H_ROWS_FROM[method])
        out[method] = (gather_to_host(result.params), result.stats)
    return out


def main(ckpt_dir: str, out_dir: str, num_processes: int, process_id: int, port: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # bounded waits: a peer that died makes this one fail within a minute, not hang
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=60, heartbeat_timeout_seconds=30,
                                   shutdown_timeout_seconds=30)
    assert jax.device_count() == 4 and jax.local_device_count() == 4 // num_processes, jax.devices()
    from epmq_jax import checkpoint

    results = run(ckpt_dir, jax.devices())
    if jax.process_index() == 0:
        for method, (tree, stats) in results.items():
            checkpoint.save(os.path.join(out_dir, method), tree)
            with open(os.path.join(out_dir, f"{method}_stats.json"), "w") as f:
                json.dump(stats, f)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    ckpt, out, n, pid, port = sys.argv[1:]
    main(ckpt, out, int(n), int(pid), int(port))

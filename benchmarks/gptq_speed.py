"""GPTQ time per layer: epmq_jax.quant.gptq against the reference PyTorch GPTQ and a dense floor.

Prints one table. For each weight (given as the reference stores it, ``W (out x in)``; the
project's kernel is its transpose, ``(d_in, d_out)``), 4 bits, group 128, block 128, damping
0.01, the same W and H for all:

- ``reference``: IST-DASLab/gptq ``GPTQ.fasterquant`` (PyTorch; on the CPU with as many threads as
  JAX, or on the GPU JAX runs on: ``--reference-device``);
- ``project``: ``epmq_jax.quant.gptq`` (jitted; compiled before timing, ``compile`` is its
  first call);
- ``floor``: the dense algebra the reference's method needs, jitted: a Cholesky and a
  triangular inverse of H, the lazy-update flops as one matmul, and a loop of d_in rank-1
  updates of a 128-row block (the project needs less than this: one Cholesky, no inverse);
- ``obj`` : the project's objective tr(ΔᵀHΔ) over the reference's (float64; ~1 = the same
  rounding quality).

Times are the minimum over ``--rounds`` interleaved rounds (reference, project, floor,
reference, ...; see ``benchmarks/_machine.py``), after one untimed round. The machine and
its load are printed; on a loaded machine (1-minute load above half the cores) the script
refuses to run unless ``--allow-load``, and then marks its table as not valid.

The reference code is not part of this repository. Get it with::

    git clone https://github.com/IST-DASLab/gptq /tmp/ref_gptq   # needs gptq.py, quant.py

Run (a few minutes on an idle 2-core CPU)::

    python benchmarks/gptq_speed.py --reference-dir /tmp/ref_gptq
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import add_load_args, check_quiet, finish, interleaved_min  # noqa: E402

from epmq_jax.quant import QuantSpec, gptq  # noqa: E402

# W (out x in): the three of issue 14 (ViT-B fc1, fc2, qkv), then ViT-B's attention output
# and ViT-L/14's MLP.
SHAPES = [(3072, 768), (768, 3072), (2304, 768), (768, 768), (4096, 1024), (1024, 4096)]
SPEC = QuantSpec(bits=4, group_size=128)
BLOCK = 128
_HI = jax.lax.Precision.HIGHEST


def problem(d_out: int, d_in: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A kernel ``(d_in, d_out)`` and the Hessian XᵀX/n of 2*d_in correlated inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * d_in, d_in)).astype(np.float32)
    x = x + 0.5 * x.mean(axis=1, keepdims=True)
    h = x.T @ x / x.shape[0]
    w = (rng.normal(size=(d_in, d_out)) * 0.02).astype(np.float32)
    return w, h


def objective(dq: np.ndarray, w: np.ndarray, h: np.ndarray) -> float:
    """tr(ΔᵀHΔ) in float64, Δ = dq - w (Flax layout)."""
    d = np.asarray(dq, np.float64) - w
    return float(np.sum(d * (h.astype(np.float64) @ d)))


@jax.jit
def floor(w: jax.Array, h: jax.Array) -> jax.Array:
    """The dense algebra of the reference's GPTQ, without its rounding logic."""
    n, m = w.shape
    lower = jnp.linalg.cholesky(h)
    u = jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=h.dtype), lower=True)
    n_blocks = -(-n // BLOCK)
    k = max(1, round(n * (1 - 1 / n_blocks) / 2))    # Σ_blocks BLOCK·(rows after it) = n·k
    lazy = jnp.dot(u[:, :k], w[:k], precision=_HI)

    def rank1(i, tile):
        row = tile[i % BLOCK]
        err = row - jnp.round(row * 8.0) / 8.0
        return tile - u[i, :BLOCK][:, None] * err[None, :]

    tile = jax.lax.fori_loop(0, n, rank1, w[:BLOCK])
    return jnp.sum(lazy) + jnp.sum(tile)


def reference_runner(w: np.ndarray, h: np.ndarray, ref_dir: str, device: str = "cpu"):
    """A call running the reference on (w, h) on torch ``device`` ("cpu" or "cuda"); the call
    returns the dequantized kernel (after synchronising the device)."""
    import torch

    sys.path.insert(0, ref_dir)
    if device == "cpu":
        torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs CUDA
    with contextlib.redirect_stdout(io.StringIO()):
        from gptq import GPTQ
        from quant import Quantizer
    d_in, d_out = w.shape

    def run() -> np.ndarray:
        layer = torch.nn.Linear(d_in, d_out, bias=False).to(device)
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(w.T)).to(device)
        g = GPTQ(layer)
        g.H = torch.from_numpy(h.copy()).to(device)
        g.quantizer = Quantizer()
        g.quantizer.configure(SPEC.bits, perchannel=True, sym=False)
        with contextlib.redirect_stdout(io.StringIO()):
            g.fasterquant(blocksize=BLOCK, percdamp=0.01, groupsize=SPEC.group_size)
        out = layer.weight.data.cpu().numpy().T   # .cpu() waits for the device
        return out

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-dir", default=None, help="folder with IST-DASLab gptq.py, quant.py")
    p.add_argument("--reference-device", default=None, choices=("cpu", "cuda"),
                   help="torch device of the reference (default: cuda when JAX runs on a GPU, else cpu)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--shapes", default=None,
                   help="W shapes as out x in, comma-separated, e.g. 3072x768,768x3072")
    add_load_args(p)
    args = p.parse_args()
    shapes = SHAPES if args.shapes is None else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ref_ok = args.reference_dir is not None and os.path.exists(
        os.path.join(args.reference_dir, "gptq.py"))
    threads = len(os.sched_getaffinity(0))
    ref_device = args.reference_device or ("cuda" if jax.default_backend() == "gpu" else "cpu")
    if ref_ok:
        import torch
        torch.set_num_threads(threads)

    loaded = check_quiet(args.allow_load)
    print(f"reference on torch {ref_device}; {threads} CPU threads for JAX and torch; "
          f"4-bit, group {SPEC.group_size}, block {BLOCK}, "
          f"damp 0.01; min of {args.rounds} interleaved rounds, milliseconds"
          + ("" if ref_ok else "; no --reference-dir: reference column skipped"))
    head = (f"{'W out x in':>11} | {'reference':>9} {'project':>8} {'floor':>8} | "
            f"{'proj/ref':>8} {'proj/floor':>10} | {'compile s':>9} {'obj':>6}")
    print(head)
    print("-" * len(head))
    for d_out, d_in in shapes:
        w, h = problem(d_out, d_in)
        wj, hj = jnp.asarray(w), jnp.asarray(h)
        t0 = time.perf_counter()
        dq = np.asarray(gptq(wj, hj, SPEC).dequantize())
        compile_s = time.perf_counter() - t0
        candidates = {
            "project": lambda wj=wj, hj=hj: jax.block_until_ready(gptq(wj, hj, SPEC).packed),
            "floor": lambda wj=wj, hj=hj: jax.block_until_ready(floor(wj, hj)),
        }
        obj = "-"
        if ref_ok:
            run_ref = reference_runner(w, h, args.reference_dir, ref_device)
            obj = f"{objective(dq, w, h) / objective(run_ref(), w, h):6.3f}"
            candidates = {"reference": run_ref, **candidates}
        times = {k: 1e3 * min(v) for k, v in interleaved_min(candidates, rounds=args.rounds).items()}
        ref = times.get("reference")
        ref_cols = (f"{ref:9.1f}", f"{times['project'] / ref:8.3f}") if ref else (f"{'-':>9}", f"{'-':>8}")
        print(f"{f'{d_out} x {d_in}':>11} | {ref_cols[0]} {times['project']:8.1f} {times['floor']:8.1f} | "
              f"{ref_cols[1]} {times['project'] / times['floor']:10.3f} | {compile_s:9.2f} {obj:>6}",
              flush=True)
    finish(loaded)


if __name__ == "__main__":
    main()

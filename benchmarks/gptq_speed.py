"""GPTQ speed per layer: epmq_jax.quant.gptq vs the reference PyTorch GPTQ vs qwix's GPTQ.

Prints one table. For each kernel shape (d_in x d_out; ViT-B/32 and ViT-L/14 linear layers):
the first call of our jit GPTQ (compile + run), the steady-state time per layer (median of
``--repeats`` calls), the reference implementation (IST-DASLab/gptq ``GPTQ.fasterquant``,
PyTorch on CPU with the same number of threads; one call by default, as eager PyTorch has
nothing to compile) and qwix's ``gptq_core.quantize_weight``
(first call = compile + run, then steady state) where its compile fits ``--qwix-max-d-in``.
All methods: 4 bits, group size 128, block 128, damping 0.01, same W and H; asymmetric grid
except qwix (symmetric: its asymmetric path fails).

The reference code is not part of this repository. Get it with::

    git clone https://github.com/IST-DASLab/gptq /tmp/ref_gptq   # needs gptq.py, quant.py

and pass ``--reference-dir /tmp/ref_gptq``; without it that column is skipped.

Run (about 10 minutes on an idle 2-core CPU, mostly the reference)::

    python benchmarks/gptq_speed.py --reference-dir /tmp/ref_gptq
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from epmq_jax.quant import QuantSpec, gptq

SHAPES = [(768, 768), (768, 3072), (3072, 768), (1024, 4096), (4096, 1024)]
SPEC = QuantSpec(bits=4, group_size=128)


def problem(d_in: int, d_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A kernel and the Hessian XᵀX/n of 2*d_in correlated calibration inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * d_in, d_in)).astype(np.float32)
    x = x + 0.5 * x.mean(axis=1, keepdims=True)
    h = x.T @ x / x.shape[0]
    w = (rng.normal(size=(d_in, d_out)) * 0.02).astype(np.float32)
    return w, h


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of the next ``repeats`` calls; the first if none)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times) if times else first


def ours(w, h, repeats):
    wj, hj = jnp.asarray(w), jnp.asarray(h)
    return timed(lambda: jax.block_until_ready(gptq(wj, hj, SPEC).packed), repeats)


def reference(w, h, repeats, ref_dir):
    import torch
    sys.path.insert(0, ref_dir)
    torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs CUDA; CPU-only here
    with contextlib.redirect_stdout(io.StringIO()):
        from gptq import GPTQ
        from quant import Quantizer
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    d_in, d_out = w.shape

    def run():
        layer = torch.nn.Linear(d_in, d_out, bias=False)
        layer.weight.data = torch.from_numpy(w.T.copy())
        g = GPTQ(layer)
        g.H = torch.from_numpy(h.copy())
        g.quantizer = Quantizer()
        g.quantizer.configure(SPEC.bits, perchannel=True, sym=False)
        with contextlib.redirect_stdout(io.StringIO()):
            g.fasterquant(blocksize=128, percdamp=0.01, groupsize=SPEC.group_size)

    return timed(run, repeats)[1]


def qwix(w, h, repeats):
    from qwix._src.core import qarray
    from qwix.contrib import gptq_core
    # Symmetric (absmax): qwix 0.x's GPTQ fails on asymmetric grids (`zero_point and ...` on
    # an array); the work per column is the same.
    how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=[0],
                               tiled_axes={1: SPEC.group_size}, calibration_method="absmax")
    fn = jax.jit(lambda W, H: gptq_core.quantize_weight(W, H, how, blocksize=128,
                                                         percdamp=0.01)[0].qvalue)
    wt, hj = jnp.asarray(w.T), jnp.asarray(h)
    return timed(lambda: jax.block_until_ready(fn(wt, hj)), repeats)


def qwix_with_timeout(d_in: int, d_out: int, timeout: float) -> str:
    """qwix's (first, steady) in a child process, or a note if it did not finish in time."""
    cmd = [sys.executable, __file__, "--qwix-child", f"{d_in}x{d_out}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return f"{'>' + str(int(timeout)):>8} {'-':>7}"
    first, steady = (float(v) for v in out.stdout.split()[-2:])
    return f"{first:8.1f} {steady:7.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-dir", default=None, help="folder with IST-DASLab gptq.py, quant.py")
    p.add_argument("--repeats", type=int, default=3, help="steady-state calls of ours")
    p.add_argument("--ref-repeats", type=int, default=0,
                   help="extra reference calls (eager PyTorch: its first call is already steady)")
    p.add_argument("--qwix-max-d-in", type=int, default=768,
                   help="run qwix only up to this d_in (its compile time grows with d_in)")
    p.add_argument("--qwix-timeout", type=float, default=300,
                   help="seconds allowed for qwix's first call (compile) plus one more call")
    p.add_argument("--shapes", default=None, help="e.g. 768x768,3072x768")
    p.add_argument("--qwix-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.qwix_child:
        print(*qwix(*problem(*(int(v) for v in args.qwix_child.split("x"))), 1))
        return
    shapes = SHAPES if args.shapes is None else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ref_ok = args.reference_dir is not None and os.path.exists(
        os.path.join(args.reference_dir, "gptq.py"))

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{len(os.sched_getaffinity(0))} CPU threads; 4-bit, group 128, block 128")
    head = (f"{'d_in x d_out':>12} | {'ours 1st':>8} {'ours':>7} | {'ref':>7} {'ref/ours':>8} | "
            f"{'qwix 1st':>8} {'qwix':>7}")
    print(head)
    print("-" * len(head))
    for d_in, d_out in shapes:
        w, h = problem(d_in, d_out)
        o_first, o = ours(w, h, args.repeats)
        ref_cols = f"{'-':>7} {'-':>8}"
        if ref_ok:
            r = reference(w, h, args.ref_repeats, args.reference_dir)
            ref_cols = f"{r:7.3f} {r / o:7.1f}x"
        q_cols = f"{'-':>8} {'-':>7}"
        if d_in <= args.qwix_max_d_in:
            q_cols = qwix_with_timeout(d_in, d_out, args.qwix_timeout)
        print(f"{d_in:>5} x {d_out:<5} | {o_first:8.2f} {o:7.3f} | {ref_cols} | {q_cols}",
              flush=True)
    print("times in seconds; '1st' = first call incl. compile; others = median steady state; "
          f"'>{int(args.qwix_timeout)}' = qwix did not finish compiling in that time")


if __name__ == "__main__":
    main()

"""Cost of sequential calibration on a ViT-B/32-shaped model: GPTQ vs E-PMQ, for T experts.

Random weights (the cost does not depend on them): the merged model is the CLIP vision class of
``epmq_jax.models.clip`` with the ViT-B/32 config (width 768, MLP 3072, 12 heads, 50 tokens),
cut to ``--blocks`` blocks (every block has the same shapes, so per-block cost is the same for
all 12); each expert is the merge plus noise. Every task contributes ``--images`` calibration
images, so GPTQ and E-PMQ see the same data (T x images in all), with ``CalibConfig(batch_size=
--batch-size)`` (default 32, the ViT-B/32 paper config's ``calib.batch_size``): E-PMQ runs each
task's images as one batch of 2 (the driver pads no task beyond its largest one); GPTQ on the
merge (uniform task weights) pools all tasks' images into batches of up to 32.

GPTQ and E-PMQ runs are interleaved (``--rounds`` of each, in turn) and every figure is the
minimum over the rounds. Per block it prints:

- ``block s``: wall time of the block in the driver (block 0 also embeds the inputs and, in the
  first round, compiles);
- ``solvers s``: the sum, over the block's six layers, of one layer's solve + rounding + reported
  objectives (:func:`epmq_jax.calib.solve.layer_step`) timed alone on the same statistics (min
  of 3): the floor a driver cannot go below;
- ``ratio``: block / solvers (what the statistics, the forward passes and the bookkeeping add);
- ``floor s`` (steady-state table): the least arithmetic a block's statistics need, timed alone
  as one compiled function on all T x images inputs at once (:func:`stats_floor`): one forward
  of the merged block and the Gram matrix of each group's input; for E-PMQ also each task's
  expert block, the targets X_t W_t of the six layers and the cross moments X̃_tᵀY_t (the
  tasks one after the other, ``lax.map``). ``floor ratio`` = (solvers + floor) / solvers: the
  ``ratio`` of a driver that did nothing but this arithmetic, one program after the other. It
  is a measure of the work, not a strict bound: a driver whose programs overlap on the cores
  (asynchronous dispatch) can go below it, as E-PMQ's does since its passes were split (a Gram
  matrix computed for its lower half only would save at most half of its share);
- ``compiles``: XLA compilations during the block in the first round (0 after block 0 means
  compilation is paid once per distinct shape);
- ``peak MB``: peak resident memory of the process during the block (``VmHWM``, reset before
  each block through ``/proc/self/clear_refs``).

Then the steady-state (blocks 1+) means and the E-PMQ / GPTQ ratio per T. The machine and its
load are printed before and after; on a loaded machine it refuses to run unless
``--allow-load`` (and then marks the tables).

    .venv/bin/python benchmarks/calib_cost.py                       # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/calib_cost.py --images 16 --blocks 12 --experts 2 8 20   # the full model
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from _machine import add_load_args, check_quiet, finish  # benchmarks/ is the script's directory
from flax import nnx

from epmq_jax.calib import CalibConfig, Objective, calibrate, driver, vit_adapter
from epmq_jax.calib.adapter import get_path, key_path
from epmq_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from epmq_jax.quant import QuantSpec

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _perturbed(params, key, scale=0.02):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


class _Probe:
    """Counts compilations and records each layer_step call of the running block."""

    def __init__(self):
        self.compiles = 0
        self.calls = []
        self._real = driver.layer_step
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        driver.layer_step = self._layer_step

    def _on_event(self, event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            self.compiles += 1

    def _layer_step(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self._real(*args, **kwargs)

    def solver_time(self) -> float:
        """Σ over the recorded layers of min-of-3 of the layer's solve + rounding alone."""
        total = 0.0
        for args, kwargs in self.calls:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(self._real(*args, **kwargs))
                best = min(best, time.perf_counter() - t0)
            total += best
        self.calls.clear()
        return total

    def close(self):
        driver.layer_step = self._real
        jax.monitoring.unregister_event_duration_listener(self._on_event)


_HI = jax.lax.Precision.HIGHEST


def stats_floor(model, merged, experts, pixels, T: int, method: str, reps: int = 3) -> float:
    """Seconds (min of ``reps``, compiled beforehand) of the least arithmetic of one block's
    statistics for ``method`` on T tasks' inputs (module docstring, ``floor s``)."""
    import jax.numpy as jnp

    adapter = vit_adapter(model)
    kind = adapter.block_kind(1)
    bpath = adapter.block_paths(merged)[1]
    groups = adapter.linear_groups(kind)
    n_img = pixels[0].shape[0]
    x = jnp.concatenate([adapter.embed(merged, jnp.asarray(p)) for p in pixels[:T]])
    block = get_path(merged, bpath)
    ex = jax.tree.map(lambda *a: jnp.stack(a), *[get_path(e, bpath) for e in experts[:T]])

    def gram(a):
        a = a.reshape(-1, a.shape[-1])
        return jnp.matmul(a.T, a, precision=_HI)

    def kernel(tree, path):
        return get_path(tree, key_path(path))

    @jax.jit
    def gptq(block, x):
        out, caps = adapter.run_block(kind, block, x)
        return out, [gram(caps[g[0]]) for g in groups]

    @jax.jit
    def epmq(block, ex, x):
        out, caps = adapter.run_block(kind, block, x)
        hs = [gram(caps[g[0]]) for g in groups]
        split = lambda a: a.reshape(T, n_img, *a.shape[1:])  # noqa: E731

        def task(args):
            eb, xt, mine = args
            _, e_caps = adapter.run_block(kind, eb, xt)             # the expert path's inputs X_t
            bs = []
            for g in groups:
                xe = e_caps[g[0]].reshape(-1, e_caps[g[0]].shape[-1])
                xm = mine[g[0]].reshape(-1, mine[g[0]].shape[-1])
                for p in g:
                    y = jnp.matmul(xe, kernel(eb, p), precision=_HI)     # targets X_t W_t
                    bs.append(jnp.matmul(xm.T, y, precision=_HI))         # X̃_tᵀ Y_t
            return bs

        bs = jax.lax.map(task, (ex, split(x), {g[0]: split(caps[g[0]]) for g in groups}))
        return out, hs, [b.sum(0) for b in bs]

    call = (lambda: gptq(block, x)) if method == "gptq" else (lambda: epmq(block, ex, x))
    jax.block_until_ready(call())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - t0)
    return best


def run(probe: _Probe, method: str, T: int, model, merged, experts_all, pixels_all, bits: int,
        group: int, batch_size: int) -> list[dict]:
    """One calibration; returns per block {time, solvers, compiles, peak}."""
    cfg = CalibConfig(objective=Objective(kind="gptq") if method == "gptq" else Objective(kind="epmq"),
                      spec=QuantSpec(bits=bits, group_size=group), batch_size=batch_size)
    rows = []
    t_last = [0.0]

    def on_block(k):
        elapsed = time.perf_counter() - t_last[0]
        row = {"time": elapsed, "compiles": probe.compiles, "peak": _rss_mb("VmHWM")}
        row["solvers"] = probe.solver_time()
        rows.append(row)
        probe.compiles = 0
        _reset_peak()
        t_last[0] = time.perf_counter()

    probe.calls.clear()
    probe.compiles = 0
    _reset_peak()
    t_last[0] = time.perf_counter()
    calibrate(vit_adapter(model), merged, pixels_all[:T], cfg,
              experts=experts_all[:T] if method == "epmq" else None, on_block=on_block)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2, help="calibration images per task")
    ap.add_argument("--blocks", type=int, default=3, help="number of ViT-B/32 blocks (12 = full model)")
    ap.add_argument("--batch-size", type=int, default=32, help="CalibConfig.batch_size (samples per pass, at most)")
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 8, 20])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of each method (min taken)")
    add_load_args(ap)
    args = ap.parse_args()
    loaded = check_quiet(args.allow_load)

    cfg = CLIPVisionConfig.vit_b32()
    cfg = CLIPVisionConfig(**{**cfg.__dict__, "num_hidden_layers": args.blocks})
    model = CLIPVisionModelWithProjection(cfg, rngs=nnx.Rngs(0))
    merged = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    t_max = max(args.experts)
    key = jax.random.key(1)
    experts = [_perturbed(merged, jax.random.fold_in(key, t)) for t in range(t_max)]
    r = np.random.default_rng(0)
    pixels = [r.normal(size=(args.images, 224, 224, 3)).astype(np.float32) for _ in range(t_max)]

    print(f"calib_cost: ViT-B/32 shapes (width 768, MLP 3072, 50 tokens), {args.blocks} blocks, "
          f"{args.images} images/task, batch_size {args.batch_size}, {args.bits}-bit g{args.group_size}; "
          f"min of {args.rounds} interleaved rounds")
    print("block s = driver wall time of the block; solvers s = its six layers' solve + rounding timed "
          "alone; ratio = block / solvers; compiles = XLA compilations during the block (first round); "
          "peak = peak RSS during the block (MB)")
    header = (f"{'T':>3} {'method':>6} {'block':>5} | {'block s':>8} {'solvers s':>9} {'ratio':>6} | "
              f"{'compiles':>8} {'peak MB':>8}")
    probe = _Probe()
    summary = []
    try:
        for T in args.experts:
            runs = {"gptq": [], "epmq": []}
            for _ in range(args.rounds):
                for method in runs:
                    runs[method].append(run(probe, method, T, model, merged, experts, pixels, args.bits,
                                            args.group_size, args.batch_size))
            print(header)
            print("-" * len(header))
            steady = {}
            for method, rounds in runs.items():
                for k in range(args.blocks):
                    t = min(rr[k]["time"] for rr in rounds)
                    s = min(rr[k]["solvers"] for rr in rounds)
                    peak = max(rr[k]["peak"] for rr in rounds)
                    print(f"{T:>3} {method:>6} {k:>5} | {t:>8.2f} {s:>9.2f} {t / s:>6.2f} | "
                          f"{rounds[0][k]['compiles']:>8} {peak:>8.0f}")
                blocks = range(1, args.blocks) if args.blocks > 1 else range(1)
                steady[method] = (np.mean([min(rr[k]["time"] for rr in rounds) for k in blocks]),
                                  np.mean([min(rr[k]["solvers"] for rr in rounds) for k in blocks]))
            floors = {m: stats_floor(model, merged, experts, pixels, T, m) for m in runs}
            summary.append((T, steady, floors))
    finally:
        probe.close()
    print()
    print(f"steady state (blocks {'1+' if args.blocks > 1 else '0'}):")
    print(f"{'T':>3} | {'GPTQ s':>7} {'/solvers':>8} {'floor s':>7} {'floor ratio':>11} | "
          f"{'E-PMQ s':>7} {'/solvers':>8} {'floor s':>7} {'floor ratio':>11} | {'E-PMQ/GPTQ':>10}")
    for T, st, fl in summary:
        (tg, sg), (te, se) = st["gptq"], st["epmq"]
        print(f"{T:>3} | {tg:>7.2f} {tg / sg:>8.2f} {fl['gptq']:>7.2f} {(sg + fl['gptq']) / sg:>11.2f} | "
              f"{te:>7.2f} {te / se:>8.2f} {fl['epmq']:>7.2f} {(se + fl['epmq']) / se:>11.2f} | {te / tg:>10.2f}")
    finish(loaded)


if __name__ == "__main__":
    main()

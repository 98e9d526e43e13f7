"""Cost of sequential calibration on a ViT-B/32-shaped model: GPTQ vs E-PMQ, T = 2, 8, 20 experts.

Random weights (the cost does not depend on them): the merged model is the CLIP vision class of
``epmq_jax.models.clip`` with the ViT-B/32 config (width 768, MLP 3072, 12 heads, 50 tokens),
cut to ``--blocks`` blocks (every block has the same shapes, so per-block cost is the same for
all 12); each expert is the merge plus noise. Every task contributes ``--images`` calibration
images, so GPTQ and E-PMQ see the same data (T x images in all). For each method and T it prints,
per block, the wall time and the peak resident memory during the block (``VmHWM`` of this
process, reset before each block through ``/proc/self/clear_refs``), and the ratio E-PMQ / GPTQ.
Block 0 includes the embedding and, for the first T, compilation; later blocks are steady state.

    .venv/bin/python benchmarks/calib_cost.py                       # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/calib_cost.py --images 16 --blocks 12 --experts 2 8 20   # the full model
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
from flax import nnx

from epmq_jax.calib import CalibConfig, Objective, calibrate, vit_adapter
from epmq_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from epmq_jax.quant import QuantSpec


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


def run(method: str, T: int, model, merged, experts_all, pixels_all, bits: int, group: int):
    cfg = CalibConfig(objective=Objective(kind="gptq") if method == "gptq" else Objective(kind="epmq"),
                      spec=QuantSpec(bits=bits, group_size=group), batch_size=pixels_all[0].shape[0])
    rows = []
    t_last = [time.perf_counter()]

    def on_block(k):
        now = time.perf_counter()
        rows.append((k, now - t_last[0], _rss_mb("VmHWM")))
        _reset_peak()
        t_last[0] = time.perf_counter()

    _reset_peak()
    t_last[0] = time.perf_counter()
    calibrate(vit_adapter(model), merged, pixels_all[:T], cfg,
              experts=experts_all[:T] if method == "epmq" else None, on_block=on_block)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2, help="calibration images per task")
    ap.add_argument("--blocks", type=int, default=2, help="number of ViT-B/32 blocks (12 = full model)")
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 8, 20])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()

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
          f"{args.images} images/task, {args.bits}-bit g{args.group_size}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
          f"{jax.devices()[0].platform}")
    print("time = wall seconds per block (block 0: + embedding, + compilation for the first T); "
          "peak = peak RSS of the process during the block (MB)")
    header = f"{'T':>3} {'block':>5} | {'GPTQ s':>8} {'peak MB':>8} | {'E-PMQ s':>8} {'peak MB':>8} | {'time ratio':>10}"
    print(header)
    print("-" * len(header))
    for T in args.experts:
        g = run("gptq", T, model, merged, experts, pixels, args.bits, args.group_size)
        e = run("epmq", T, model, merged, experts, pixels, args.bits, args.group_size)
        for (k, tg, mg), (_, te, me) in zip(g, e):
            print(f"{T:>3} {k:>5} | {tg:>8.2f} {mg:>8.0f} | {te:>8.2f} {me:>8.0f} | {te / tg:>10.2f}")
        steady = slice(1, None) if len(g) > 1 else slice(None)
        tg = np.mean([x[1] for x in g[steady]])
        te = np.mean([x[1] for x in e[steady]])
        print(f"{T:>3} {'mean':>5} | {tg:>8.2f} {'':>8} | {te:>8.2f} {'':>8} | {te / tg:>10.2f}   "
              f"(blocks {'1+' if len(g) > 1 else '0'})")


if __name__ == "__main__":
    main()

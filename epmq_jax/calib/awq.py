"""AWQ over one block, as mit-han-lab/llm-awq's ``run_awq`` does it (METHOD.md §7).

For every :class:`~epmq_jax.calib.adapter.AwqGroup` of the block (the kernels reading one input,
from the adapter's optional ``awq_groups``), on the block's float inputs and with every other
layer of the block in float:

1. **scale search** (llm-awq ``auto_scale``): ``a = mean|x|`` over the calibration tokens; for each
   ratio ``r = k/n_grid`` the group's kernels become ``Q(W·s)/s`` with ``s = awq_scales(a, r)``,
   and the loss is the mean squared difference of the output of the module the group feeds
   (``AwqGroup.module``: the whole attention for q/k/v, the whole MLP for its first layers, the
   layer itself otherwise) from the float output; the first best ratio wins (``r = 0`` is RTN).
   All groups are searched on the unmodified float block, then
2. **folded**: the group's kernel rows are multiplied by ``s`` and ``1/s`` goes into the operation
   before (``AwqGroup.prev``): a norm's scale and bias, or the previous linear layer's output
   channels and bias (skipped, as llm-awq does for GQA, when that layer's outputs are not the
   group's inputs one to one). The folded float block computes exactly what the original does.
3. **clipping** (llm-awq ``auto_clip``, not for ``AwqGroup.no_clip``: q and k) of every folded
   kernel per (group, output channel), on every ``⌊N/n_sample⌋``-th input token divided by ``s``;
4. **RTN** of the clipped kernel on the project's grid.

The result is a normal model tree: norms and previous layers changed, every kernel a
:class:`~epmq_jax.quant.QuantizedWeight` without ``input_scale``, no extra operation.

Calibration rows of all tasks are pooled alike (llm-awq has one data set). Two passes over the
data run the float block: the first sums ``|x|`` per group, the second evaluates every ratio and
accumulates the clipping statistics (the sampled tokens' Gram blocks). Per batch everything is
jitted with the adapter, kind and groups static. Model forwards run under
``jax.default_matmul_precision("highest")``; the cores (:mod:`epmq_jax.quant._awq`) state it.

:func:`calibrate_block` is the driver's entry (``rounding="awq"``); :func:`fold_scales` applies
given scales to a float block (for checks and for custom flows).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epmq_jax._tree import iter_paths
from epmq_jax.calib.adapter import (
    AwqGroup,
    capture_rows,
    check_awq_groups,
    get_path,
    key_path,
    set_path,
)
from epmq_jax.quant import QuantSpec
from epmq_jax.quant._awq import (
    awq_ratios,
    awq_scales,
    clip_search,
    group_grams,
    quantize_clipped,
    sample_stride,
    scaled_fake_quant,
)
from epmq_jax.quant._grid import check_kernel

PyTree = Any
_HI = jax.lax.Precision.HIGHEST
_F32 = jnp.float32




def _get(tree: PyTree, rel: str, where: str = "") -> Any:
    try:
        return get_path(tree, key_path(rel))
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{where}: no parameter at '{rel}' in the block params") from None


def _has(tree: PyTree, rel: str) -> bool:
    try:
        get_path(tree, key_path(rel))
        return True
    except (KeyError, IndexError, TypeError):
        return False


def _with(tree: PyTree, leaves: Mapping[str, Any]) -> PyTree:
    for rel, v in leaves.items():
        tree = set_path(tree, key_path(rel), v)
    return tree


def _scaled(block: PyTree, g: AwqGroup) -> bool:
    """Whether the group gets a scale: it has a producer whose outputs are its inputs one to one."""
    if g.prev is None:
        return False
    if g.prev_kind == "linear":
        return _get(block, f"{g.prev}/kernel").shape[1] == _get(block, g.layers[0]).shape[0]
    return True


def _fold32(block: PyTree, groups: Sequence[AwqGroup], scales: Sequence[jax.Array | None]
            ) -> dict[str, jax.Array]:
    """The leaves the scales change, in float32: {path: folded leaf}."""
    out: dict[str, jax.Array] = {}

    def cur(rel):
        return out[rel] if rel in out else jnp.asarray(_get(block, rel), _F32)

    for g, s in zip(groups, scales):
        if s is None:
            continue
        for p in g.layers:
            out[p] = cur(p) * s[:, None]
        if g.prev_kind == "norm":
            targets = [f"{g.prev}/scale", f"{g.prev}/bias"]
        else:
            out[f"{g.prev}/kernel"] = cur(f"{g.prev}/kernel") / s[None, :]
            targets = [f"{g.prev}/bias"]
        for t in targets:
            if _has(block, t):
                out[t] = cur(t) / s
    return out


def fold_scales(block: PyTree, groups: Sequence[AwqGroup], scales: Sequence[jax.Array | None]) -> PyTree:
    """Applies AWQ scales to a float block: kernel rows times ``s``, ``1/s`` into the op before.

    Args:
      block: the block's float params (nested dict).
      groups: the block's AWQ groups.
      scales: one ``(d_in,)`` positive scale per group, or None (no scale; also ignored for a
        group whose previous linear layer cannot take it, see the module docstring).

    Returns:
      The block with the changed leaves (kernels, norm scales and biases, previous layers'
      kernels and biases), each in its original dtype. In exact arithmetic it computes the same
      function as ``block``.
    """
    scales = [s if s is not None and _scaled(block, g) else None for g, s in zip(groups, scales)]
    changed = _fold32(block, groups, [None if s is None else jnp.asarray(s, _F32) for s in scales])
    return _with(block, {p: v.astype(_get(block, p).dtype) for p, v in changed.items()})


# ----------------------------------------------------------------------------- jitted passes


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _input_sums(adapter, kind, groups, block, carry, mask):
    """Per group: (Σ w|x| (d_in,), Σ w, number of rows with w > 0) of one batch."""
    _, caps = adapter.run_block(kind, block, carry)
    out = []
    for g in groups:
        x, w = capture_rows(caps[g.layers[0]], mask)
        x, w = x.astype(_F32), w.astype(_F32)
        out.append((jnp.sum(jnp.abs(x) * w[..., None], axis=tuple(range(x.ndim - 1))), jnp.sum(w),
                    jnp.sum(w > 0).astype(_F32)))
    return out


def _group_losses(adapter, kind, g, spec, n_grid, block, carry, x, w, act_mean):
    """Per ratio: Σ_rows w · mean over output features of (module output − float output)²."""
    kernels = {p: _get(block, p) for p in g.layers}
    x32 = x.astype(_F32)

    def per_row(d):
        return jnp.sum(jnp.where(w > 0, w * jnp.mean(d * d, axis=-1), 0.0))

    if g.module is None:
        (p,) = g.layers
        w_p = kernels[p].astype(_F32)

        def loss_at(r):
            q = scaled_fake_quant(w_p, awq_scales(act_mean, r), spec)
            return per_row(jnp.matmul(x32, q - w_p, precision=_HI))
    else:
        def out(blk):
            return adapter.awq_module(kind, g.module, blk, x, carry).astype(_F32)

        ref = out(block)

        def loss_at(r):
            s = awq_scales(act_mean, r)
            blk = _with(block, {p: scaled_fake_quant(k, s, spec).astype(k.dtype) for p, k in kernels.items()})
            return per_row(out(blk) - ref)

    return jax.lax.map(loss_at, awq_ratios(n_grid))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _search_batch(adapter, kind, groups, spec, n_grid, block, carry, mask, act_means, offsets, strides):
    """Per group: (losses (n_grid,) or None, sampled rows' Gram blocks (G, g, g), number sampled)."""
    _, caps = adapter.run_block(kind, block, carry)
    out = []
    for i, g in enumerate(groups):
        x, w = capture_rows(caps[g.layers[0]], mask)
        w = w.astype(_F32)
        valid = w.reshape(-1) > 0
        idx = offsets[i] + jnp.cumsum(valid) - 1            # row index among all valid rows so far
        sel = (valid & (idx % strides[i] == 0)).astype(_F32)
        grams = group_grams(x.reshape(-1, x.shape[-1]), sel, spec)
        losses = None if act_means[i] is None else _group_losses(
            adapter, kind, g, spec, n_grid, block, carry, x, w, act_means[i])
        out.append((losses, grams, jnp.sum(sel)))
    return out


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


# ----------------------------------------------------------------------------- the block


def _check(adapter, kind: Hashable, block: PyTree, spec: QuantSpec, where: str) -> tuple[AwqGroup, ...]:
    if not callable(getattr(adapter, "awq_groups", None)) or not callable(getattr(adapter, "awq_module", None)):
        raise ValueError(f"rounding='awq' needs an adapter with awq_groups and awq_module (see "
                         f"epmq_jax.calib.adapter.AwqAdapter); {type(adapter).__name__} has none")
    groups = tuple(AwqGroup(*g) for g in adapter.awq_groups(kind))
    check_awq_groups(groups, adapter.linear_groups(kind), set(iter_paths(block)), where)
    for g in groups:
        d_in = None
        for p in g.layers:
            w = _get(block, p, where)
            check_kernel(w, spec, name=f"{where}/{p}")
            if d_in is not None and w.shape[0] != d_in:
                raise ValueError(f"{where}/{p}: d_in={w.shape[0]}, but the other kernels of its AWQ "
                                 f"group {g.layers} have d_in={d_in} (a group shares one input)")
            d_in = w.shape[0]
        if g.prev_kind == "norm" and tuple(_get(block, f"{g.prev}/scale").shape) != (d_in,):
            raise ValueError(f"{where}/{g.prev}/scale: shape {tuple(_get(block, f'{g.prev}/scale').shape)}, "
                             f"expected ({d_in},) to absorb the scale of {g.layers}")
    return groups


def calibrate_block(adapter, kind: Hashable, block: PyTree, carries: Sequence[Sequence[PyTree]],
                    masks: Sequence[Sequence[jax.Array]], spec: QuantSpec, *, n_grid: int = 20,
                    clip: bool = True, clip_grid: int = 20, max_shrink: float = 0.5,
                    n_sample: int = 512, where: str = "") -> tuple[dict[str, Any], list[dict]]:
    """AWQ of one block (see the module docstring); the driver's entry for ``rounding="awq"``.

    Args:
      adapter: the model's adapter, with the AWQ extension
        (:class:`~epmq_jax.calib.adapter.AwqAdapter`).
      kind: the block's kind.
      block: the block's float params.
      carries: per task, per batch: the block's input carry from the float model.
      masks: per task, per batch: the sample mask ``(batch,)`` (0 = padding sample).
      spec: the grid.
      n_grid: scale ratios tried (``k / n_grid``).
      clip: run the clipping search (never for ``no_clip`` kernels).
      clip_grid, max_shrink: clipping candidates ``1 − k/clip_grid``, ``k < max_shrink·clip_grid``.
      n_sample: about how many tokens per group the clipping search uses.
      where: the block's path, for messages and statistics.

    Returns:
      ``(changed, stats)``: ``changed`` maps leaf paths relative to the block to their new values:
      every kernel of the AWQ groups as a :class:`~epmq_jax.quant.QuantizedWeight` (no
      ``input_scale``) and every other leaf the folding changed (norm scales and biases,
      previous layers' biases), in its original dtype. ``stats``: one dict per kernel, in group
      order: ``path``, ``group``, ``rounding`` ("awq"), ``awq_ratio`` (None when unscaled),
      ``awq_loss`` and ``awq_loss_rtn`` (the group's search loss at the chosen ratio and at
      r = 0, mean squared output error), ``clip_shrink`` (mean ``1 − max_val/max|w|``, None
      when not clipped), ``n_rows``, ``n_clip_rows``, ``time_s`` (the block's time, shared).

    Raises:
      ValueError: the adapter has no AWQ extension or inconsistent groups, a kernel or norm of
        the wrong shape, no calibration rows, or a search whose losses are all NaN.
    """
    t0 = time.perf_counter()
    groups = _check(adapter, kind, block, spec, where)
    if n_grid < 1 or clip_grid < 1 or n_sample < 1:
        raise ValueError(f"n_grid, clip_grid and n_sample must be >= 1, got {n_grid}, {clip_grid}, {n_sample}")
    batches = [(c, m) for tc, tm in zip(carries, masks) for c, m in zip(tc, tm)]
    if not batches:
        raise ValueError(f"{where}: no calibration batches")
    scaled = [_scaled(block, g) for g in groups]
    with jax.default_matmul_precision("highest"):
        sums, counts = None, []
        for c, m in batches:
            part = _input_sums(adapter, kind, groups, block, c, m)
            counts.append(jnp.stack([p[2] for p in part]))
            sums = part if sums is None else _add(sums, part)
        n_rows = [float(v) for v in jax.device_get([s[1] for s in sums])]
        for g, n in zip(groups, n_rows):
            if not n > 0:
                raise ValueError(f"{where}: AWQ group {g.layers} got no calibration rows")
        n_valid = jax.device_get(sum(counts))
        strides = jnp.asarray([sample_stride(int(n), n_sample) for n in n_valid], jnp.int32)
        act_means = [s[0] / n if sc else None for s, n, sc in zip(sums, n_rows, scaled)]
        acc, offset = None, jnp.zeros(len(groups), jnp.int32)
        for (c, m), cnt in zip(batches, counts):
            part = _search_batch(adapter, kind, groups, spec, n_grid, block, c, m, act_means,
                                 offset, strides)
            acc = part if acc is None else _add(acc, part)
            offset = offset + cnt.astype(jnp.int32)
    losses = jax.device_get([a[0] for a in acc])
    ratios = np.asarray(awq_ratios(n_grid))
    scales, chosen = [], []
    for g, loss, n, a in zip(groups, losses, n_rows, act_means):
        if loss is None:
            scales.append(None)
            chosen.append(None)
            continue
        loss = np.asarray(loss) / n
        if np.all(np.isnan(loss)):
            raise ValueError(f"{where}: AWQ scale search of {g.layers}: every ratio's loss is NaN")
        k = int(np.nanargmin(loss))
        scales.append(awq_scales(a, ratios[k]))
        chosen.append((k / n_grid, float(loss[k]), float(loss[0])))
    folded = _fold32(block, groups, scales)

    changed: dict[str, Any] = {}
    stats: list[dict] = []
    n_layers = sum(len(g.layers) for g in groups)
    for gi, (g, s, ch, (_, grams, n_sel)) in enumerate(zip(groups, scales, chosen, acc)):
        if s is not None:
            glen = spec.group_len(s.shape[0])
            sg = s.reshape(-1, glen)
            grams = grams / (sg[:, :, None] * sg[:, None, :])     # statistics of x / s
        for p in g.layers:
            w = folded[p] if p in folded else jnp.asarray(_get(block, p), _F32)
            max_val, shrink = None, None
            if clip and p not in g.no_clip:
                max_val, _ = clip_search(w, grams, n_sel, spec, n_grid=clip_grid, max_shrink=max_shrink)
                org = jnp.max(jnp.abs(w.reshape(-1, spec.group_len(w.shape[0]), w.shape[1])), axis=1)
                shrink = float(jnp.mean(jnp.where(org > 0, 1.0 - max_val / jnp.where(org > 0, org, 1.0), 0.0)))
            changed[p] = quantize_clipped(w, max_val, spec, dtype=_get(block, p).dtype)
            stats.append({"path": f"{where}/{p}" if where else p, "group": gi, "rounding": "awq",
                          "awq_ratio": None if ch is None else ch[0],
                          "awq_loss": None if ch is None else ch[1],
                          "awq_loss_rtn": None if ch is None else ch[2],
                          "clip_shrink": shrink, "n_rows": n_rows[gi], "n_clip_rows": float(n_sel)})
    for p, v in folded.items():
        if p not in changed:
            changed[p] = v.astype(_get(block, p).dtype)
    jax.block_until_ready(changed)
    dt = (time.perf_counter() - t0) / n_layers
    for s in stats:
        s["time_s"] = dt
    return changed, stats


def apply_changes(block: PyTree, changed: Mapping[str, Any]) -> PyTree:
    """The float block a :func:`calibrate_block` result stands for (quantized kernels dequantized)."""
    return _with(block, {p: v.dequantize() if hasattr(v, "dequantize") else v for p, v in changed.items()})

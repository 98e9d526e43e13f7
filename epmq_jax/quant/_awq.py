"""AWQ's array-level pieces, as in mit-han-lab/llm-awq (``auto_scale.py``, ``auto_clip.py``).

For a Flax kernel ``W (d_in, d_out)`` reading inputs ``x`` with mean magnitude
``a_i = mean|x_i|`` over the calibration tokens:

- **scales** (:func:`awq_scales`): for a ratio ``r`` (llm-awq tries ``r = k/20``,
  k = 0..19), ``s = max(a^r, 1e-4)`` normalised by ``sqrt(max(s)·min(s))``. ``r = 0`` gives
  ``s = 1``, i.e. plain RTN. The search multiplies the rows of every kernel reading ``x`` by
  ``s`` and judges the quantized kernels through ``Q(W·s)/s`` (:func:`scaled_fake_quant`), which
  is what the layer computes once ``1/s`` is folded into the operation producing ``x``.
- **clipping** (:func:`clip_search`): for every (group, output channel) of the (scaled)
  kernel, the range is shrunk to ``±(1 − k/n_grid)·max|w|`` for ``k < max_shrink·n_grid``,
  keeping the shrink with the smallest mean squared error of that group's partial output on
  sampled input tokens (llm-awq: every ``⌊N/512⌋``-th of the N tokens). llm-awq skips q and k.
- then RTN of the clipped kernel on the project's grid (:mod:`epmq_jax.quant._grid`; llm-awq's
  own grid is min-max without 0 forced into the range, otherwise the same).

Which layers share a scale, where it is folded and which output the search compares is model
knowledge: :mod:`epmq_jax.calib.awq` does that block by block. :func:`awq` is the whole method
for one layer whose input can be rescaled upstream (the search on the layer's own output, as
llm-awq does for ``o_proj`` and ``down_proj``).

Every contraction uses ``Precision.HIGHEST`` (float32 accumulation); work is in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from epmq_jax.quant._grid import QuantSpec, check_kernel
from epmq_jax.quant._packing import QuantizedWeight
from epmq_jax.quant._rtn import _rtn

_HI = jax.lax.Precision.HIGHEST


def awq_ratios(n_grid: int = 20) -> jax.Array:
    """The exponents llm-awq tries: ``k / n_grid`` for k = 0..n_grid−1, float32 ``(n_grid,)``."""
    return jnp.arange(n_grid, dtype=jnp.float32) / n_grid


def awq_scales(act_mean: jax.Array, ratio: jax.Array | float) -> jax.Array:
    """Per-input-channel scales ``s = max(a^r, 1e-4) / sqrt(max(s)·min(s))``.

    Args:
      act_mean: mean absolute input per channel ``a``, ``(d_in,)``.
      ratio: the exponent ``r`` (scalar).

    Returns:
      float32 ``(d_in,)``, positive.
    """
    s = jnp.maximum(act_mean.astype(jnp.float32) ** ratio, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def scaled_fake_quant(w: jax.Array, s: jax.Array, spec: QuantSpec) -> jax.Array:
    """``RTN(W·diag(s)) / s`` as a float32 kernel: what the layer computes with the scale folded.

    Args:
      w: kernel ``(d_in, d_out)``; s: ``(d_in,)``; spec: the grid.
    """
    s = s.astype(jnp.float32)[:, None]
    return _rtn(w.astype(jnp.float32) * s, spec).dequantize().astype(jnp.float32) / s


def clip_kernel(w: jax.Array, max_val: jax.Array, spec: QuantSpec) -> jax.Array:
    """Clamps every (group, output channel) of ``w (d_in, d_out)`` to ``±max_val (n_groups, d_out)``."""
    d_in, d_out = w.shape
    g = spec.group_len(d_in)
    wg = w.reshape(d_in // g, g, d_out)
    m = max_val[:, None, :].astype(w.dtype)
    return jnp.clip(wg, -m, m).reshape(d_in, d_out)


def group_grams(x: jax.Array, weight: jax.Array, spec: QuantSpec) -> jax.Array:
    """The diagonal blocks of ``Σ_n weight_n x_nᵀx_n`` for the kernel's input groups.

    Args:
      x: rows ``(N, d_in)``; weight: ``(N,)`` (0 drops a row); spec: the grid.

    Returns:
      float32 ``(n_groups, g, g)``.
    """
    n, d_in = x.shape
    g = spec.group_len(d_in)
    xg = x.astype(jnp.float32).reshape(n, d_in // g, g)
    return jnp.einsum("ngi,ngj->gij", xg * weight.astype(jnp.float32)[:, None, None], xg,
                      precision=_HI)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def clip_search(w: jax.Array, grams: jax.Array, n_rows: jax.Array, spec: QuantSpec, *,
                n_grid: int = 20, max_shrink: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """llm-awq's ``auto_clip_layer``: the best clipping range per (group, output channel).

    The error of a candidate for output channel c and group g is the mean over the sampled
    rows of ``(x_g·(Q(clip(w))_gc − w_gc))²``, i.e. ``Δ_gcᵀ G_g Δ_gc / n_rows`` with ``G_g`` the
    group's block of the sampled rows' Gram matrix (:func:`group_grams`). The first shrink with
    the smallest error wins (llm-awq keeps the earlier candidate on ties).

    Args:
      w: kernel ``(d_in, d_out)`` (already scaled, as it will be quantized).
      grams: ``(n_groups, g, g)`` from the sampled input rows (scaled like ``w``'s inputs).
      n_rows: number of sampled rows (scalar; only scales the reported error).
      spec: the grid.
      n_grid, max_shrink: candidates ``1 − k/n_grid`` for ``k < max_shrink·n_grid``.

    Returns:
      ``(max_val, err)``, float32 ``(n_groups, d_out)``: the clipping bound and its error.
    """
    w = w.astype(jnp.float32)
    d_in, d_out = w.shape
    g = spec.group_len(d_in)
    org_max = jnp.max(jnp.abs(w.reshape(d_in // g, g, d_out)), axis=1)       # (G, d_out)
    grams = grams.astype(jnp.float32)

    def err_at(shrink):
        max_val = org_max * (1.0 - shrink)
        d = (_rtn(clip_kernel(w, max_val, spec), spec).dequantize().astype(jnp.float32) - w)
        d = d.reshape(d_in // g, g, d_out)
        return jnp.einsum("gic,gij,gjc->gc", d, grams, d, precision=_HI)

    shrinks = jnp.arange(max(1, int(max_shrink * n_grid)), dtype=jnp.float32) / n_grid
    errs = jax.lax.map(err_at, shrinks) / jnp.maximum(n_rows, 1.0)         # (n_shrink, G, d_out)
    best = jnp.argmin(errs, axis=0)
    return org_max * (1.0 - shrinks[best]), jnp.take_along_axis(errs, best[None], 0)[0]


def sample_stride(n_rows: int, n_sample: int) -> int:
    """llm-awq's token sampling for the clip search: every ``⌊n_rows / n_sample⌋``-th row (at least every row)."""
    return max(1, int(n_rows) // int(n_sample))


def quantize_clipped(w: jax.Array, max_val: jax.Array | None, spec: QuantSpec,
                     dtype=None) -> QuantizedWeight:
    """RTN of ``w`` after clamping to ``max_val`` (None: no clipping); ``dtype``: the kernel dtype to record."""
    w32 = w.astype(jnp.float32)
    if max_val is not None:
        w32 = clip_kernel(w32, max_val, spec)
    return dataclasses.replace(_rtn(w32, spec), dtype=jnp.dtype(dtype or w.dtype).name)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "clip", "clip_grid", "max_shrink"))
def _awq(w, rows, weight, sel, *, spec, n_grid, clip, clip_grid, max_shrink):
    w = w.astype(jnp.float32)
    n = jnp.sum(weight)
    act_mean = jnp.matmul(weight, jnp.abs(rows), precision=_HI) / n
    h = jnp.matmul((rows * weight[:, None]).T, rows, precision=_HI)
    ratios = awq_ratios(n_grid)

    def loss(r):   # llm-awq: mean over all output entries of the layer's own output error
        d = scaled_fake_quant(w, awq_scales(act_mean, r), spec) - w
        return jnp.sum(d * jnp.matmul(h, d, precision=_HI)) / (n * w.shape[1])

    losses = jax.lax.map(loss, ratios)
    best = jnp.argmin(losses)
    s = awq_scales(act_mean, ratios[best])
    ws = w * s[:, None]
    max_val = None
    if clip:
        grams = group_grams(rows / s, sel, spec)
        max_val, _ = clip_search(ws, grams, jnp.sum(sel), spec, n_grid=clip_grid, max_shrink=max_shrink)
    return ws, max_val, s, {"ratio": ratios[best], "losses": losses}


def awq(w: jax.Array, x: jax.Array, spec: QuantSpec, *, weight: jax.Array | None = None,
        n_grid: int = 20, clip: bool = True, clip_grid: int = 20, max_shrink: float = 0.5,
        n_sample: int = 512, return_info: bool = False):
    """AWQ of one linear layer whose input can be rescaled upstream, judged on its own output.

    Searches ``s`` (:func:`awq_scales`) on ``mean‖x(Q(W·s)/s − W)‖²``, then the clipping
    (:func:`clip_search`, on every ``⌊N/n_sample⌋``-th row of ``x / s``), then RTN of ``W·s``.
    The caller folds ``1/s`` into the operation producing ``x`` (a norm's scale and bias, or the
    output channels of the previous linear layer), so the deployed layer computes
    ``(x / s) @ dequant(codes)`` with an ordinary packed kernel.

    Args:
      w: float kernel ``(d_in, d_out)``.
      x: calibration inputs ``(..., d_in)`` (all leading axes are rows).
      spec: the grid.
      weight: optional row weights broadcastable to ``x.shape[:-1]`` (0 drops a padding row).
      n_grid: scale exponents tried (``k / n_grid``).
      clip: run the clipping search (llm-awq skips it for q and k).
      clip_grid, max_shrink: clipping candidates ``1 − k/clip_grid``, ``k < max_shrink·clip_grid``.
      n_sample: about how many rows the clipping search uses.
      return_info: also return ``{"ratio", "losses" (n_grid,)}``.

    Returns:
      ``(q, s)``: the :class:`QuantizedWeight` of the scaled, clipped kernel (its
      ``dequantize()`` is ``≈ W·diag(s)``) and ``s`` float32 ``(d_in,)``; plus the info dict
      with ``return_info``.

    Raises:
      ValueError: bad kernel (see :func:`epmq_jax.quant.rtn`), ``x`` or ``weight`` of the wrong shape.
    """
    check_kernel(w, spec)
    d_in = w.shape[0]
    if getattr(x, "ndim", 0) < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x: expected shape (..., {d_in}) for a kernel of shape {tuple(w.shape)}, "
                         f"got {getattr(x, 'shape', None)}")
    if n_grid < 1 or clip_grid < 1 or n_sample < 1:
        raise ValueError(f"n_grid, clip_grid and n_sample must be >= 1, got {n_grid}, {clip_grid}, {n_sample}")
    rows = jnp.asarray(x, jnp.float32).reshape(-1, d_in)
    if weight is None:
        wt = jnp.ones(rows.shape[0], jnp.float32)
    else:
        try:
            wt = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), x.shape[:-1]).reshape(-1)
        except ValueError:
            raise ValueError(f"weight: shape {jnp.shape(weight)} does not broadcast to x's rows "
                             f"{tuple(x.shape[:-1])}") from None
    valid = wt > 0
    idx = jnp.cumsum(valid) - 1
    stride = sample_stride(int(jnp.sum(valid)), n_sample)
    sel = (valid & (idx % stride == 0)).astype(jnp.float32)
    ws, max_val, s, info = _awq(jnp.asarray(w), rows, wt, sel, spec=spec, n_grid=n_grid, clip=clip,
                                clip_grid=clip_grid, max_shrink=max_shrink)
    q = quantize_clipped(ws, max_val, spec, dtype=w.dtype)
    return (q, s, info) if return_info else (q, s)

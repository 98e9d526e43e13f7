"""AWQ: activation-aware per-input-channel scaling, optional weight clipping, then RTN.

As in the reference (mit-han-lab/llm-awq, ``auto_scale`` and ``auto_clip``), for a Flax kernel
``W (d_in, d_out)`` whose inputs have mean magnitude ``a_i = mean|x_i|``:

1. **scale search**: for each ratio ``r = k / n_grid`` (k = 0..n_grid−1) take
   ``s = a^r`` (clamped ≥ 1e-4), normalised by ``sqrt(max(s)·min(s))``; quantize ``W·s``
   (rows scaled) with RTN and measure the output error of ``(x / s) @ Q(W·s)`` against
   ``x @ W``; keep the best ``s`` (``r = 0``, i.e. plain RTN, is in the grid);
2. **clip search** (optional): for every (group, output channel) of the scaled kernel, shrink
   its range to ``[−ρ·max|w|, ρ·max|w|]`` with ``ρ = 1 − k / clip_grid`` for
   ``k < max_shrink·clip_grid``, keeping the ρ with the smallest error of that group's partial
   output;
3. RTN of the clipped, scaled kernel.

Output errors are computed from the layer's input statistics, ``‖X Δ‖² = tr(ΔᵀHΔ)`` with
``H = XᵀX`` (the group blocks of H for the clip search), so no activations are kept.

**Deployment**: the scale is carried explicitly as ``QuantizedWeight.input_scale`` (not folded
into the preceding LayerNorm or linear layer): the effective kernel is
``dequant(codes)[i, :] / s_i``, i.e. the deployed layer computes ``(x / s) @ dequant(codes)``
with plain packed kernels. Carrying the scale per layer means every layer searches its own
``s`` (the reference shares one ``s`` between layers that read the same input, because it
folds it into their common predecessor).
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


def _out_err(delta: jax.Array, h: jax.Array) -> jax.Array:
    """tr(ΔᵀHΔ)."""
    return jnp.sum(delta * jnp.matmul(h, delta, precision=_HI))


def _clip_rtn(w: jax.Array, ratio: jax.Array, spec: QuantSpec) -> jax.Array:
    """RTN of ``w`` with every (group, column) clipped to ``±ratio·max|w|`` of that group; ``ratio (G, d_out)``."""
    d_in, d_out = w.shape
    g = spec.group_len(d_in)
    wg = w.reshape(d_in // g, g, d_out)
    m = jnp.max(jnp.abs(wg), axis=1, keepdims=True) * ratio[:, None, :]
    return jnp.clip(wg, -m, m).reshape(d_in, d_out)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "clip", "clip_grid", "max_shrink"))
def _awq(w, hessian, act_mean, *, spec: QuantSpec, n_grid: int, clip: bool, clip_grid: int,
         max_shrink: float):
    w = w.astype(jnp.float32)
    h = hessian.astype(jnp.float32)
    a = act_mean.astype(jnp.float32)
    d_in, d_out = w.shape

    def scales_for(r):
        s = jnp.maximum(a ** r, 1e-4)
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def scale_loss(r):
        s = scales_for(r)
        deq = _rtn(w * s[:, None], spec).dequantize() / s[:, None]
        return _out_err(deq - w, h)

    ratios = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    losses = jax.lax.map(scale_loss, ratios)
    best = jnp.argmin(losses)
    s = scales_for(ratios[best])
    ws = w * s[:, None]
    g = spec.group_len(d_in)
    n_groups = d_in // g
    ratio = jnp.ones((n_groups, d_out), jnp.float32)
    if clip:
        hs = h / (s[:, None] * s[None, :])          # statistics of the scaled inputs x / s
        blocks = jnp.stack([hs[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(n_groups)])

        def group_err(rho):
            q = _rtn(_clip_rtn(ws, jnp.full((n_groups, d_out), rho), spec), spec).dequantize()
            dg = (q - ws).reshape(n_groups, g, d_out)
            return jnp.einsum("gic,gij,gjc->gc", dg, blocks, dg, precision=_HI)

        rhos = 1.0 - jnp.arange(max(1, int(max_shrink * clip_grid)), dtype=jnp.float32) / clip_grid
        errs = jax.lax.map(group_err, rhos)                 # (n_rho, G, d_out)
        ratio = rhos[jnp.argmin(errs, axis=0)]
    qw = _rtn(_clip_rtn(ws, ratio, spec), spec)
    qw = dataclasses.replace(qw, input_scale=s)
    return qw, {"ratio": ratios[best], "scale_losses": losses,
                "objective": _out_err(qw.dequantize() - w, h)}


def awq_search(w: jax.Array, hessian: jax.Array, act_mean: jax.Array, spec: QuantSpec, *,
               n_grid: int = 20, clip: bool = True, clip_grid: int = 20, max_shrink: float = 0.5,
               return_info: bool = False):
    """AWQ from the layer's input statistics.

    Args:
      w: float kernel ``(d_in, d_out)`` (Flax layout); may be sharded over ``d_out``.
      hessian: ``XᵀX`` of the layer's inputs, ``(d_in, d_in)``.
      act_mean: mean absolute input per channel, ``(d_in,)``.
      spec: the grid.
      n_grid: number of scale exponents tried (r = 0, 1/n_grid, …).
      clip: also search a clipping ratio per (group, output channel).
      clip_grid, max_shrink: clipping ratios ``1 − k/clip_grid`` for ``k < max_shrink·clip_grid``.
      return_info: also return ``{"ratio": chosen exponent, "scale_losses": (n_grid,),
        "objective": tr(ΔᵀHΔ) of the result}``.

    Returns:
      A :class:`QuantizedWeight` with ``input_scale = s`` (``(QuantizedWeight, info)`` with
      ``return_info``).

    Raises:
      ValueError: bad kernel (see :func:`epmq_jax.quant.rtn`) or statistics of the wrong shape.
    """
    check_kernel(w, spec)
    d_in = w.shape[0]
    if tuple(hessian.shape) != (d_in, d_in):
        raise ValueError(f"hessian: expected shape ({d_in}, {d_in}) for a kernel of shape "
                         f"{tuple(w.shape)}, got {tuple(hessian.shape)}")
    if tuple(act_mean.shape) != (d_in,):
        raise ValueError(f"act_mean: expected shape ({d_in},), got {tuple(act_mean.shape)}")
    if n_grid < 1 or clip_grid < 1:
        raise ValueError(f"n_grid and clip_grid must be >= 1, got {n_grid}, {clip_grid}")
    qw, info = _awq(jnp.asarray(w), jnp.asarray(hessian), jnp.asarray(act_mean), spec=spec,
                    n_grid=n_grid, clip=clip, clip_grid=clip_grid, max_shrink=max_shrink)
    return (qw, info) if return_info else qw


def awq(w: jax.Array, x: jax.Array, spec: QuantSpec, **options) -> QuantizedWeight:
    """AWQ of a kernel from its calibration inputs ``x (..., d_in)`` (all leading axes are rows).

    Computes ``H = xᵀx`` and ``mean|x|`` and calls :func:`awq_search` (same keyword options).
    """
    rows = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    h = jnp.matmul(rows.T, rows, precision=_HI)
    return awq_search(w, h, jnp.mean(jnp.abs(rows), axis=0), spec, **options)

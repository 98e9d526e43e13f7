"""GPTQ rounding of a Flax kernel given the Hessian of its layer's inputs (METHOD.md §5).

This is the reference implementation's algorithm (IST-DASLab ``gptq.py``,
``GPTQ.fasterquant``) in Flax layout: the kernel ``W`` is ``(d_in, d_out)`` and the input
rows are quantized one at a time, in order (or by descending ``diag(H)`` with act-order);
after each row the rounding error is spread over the rows still to come through the upper
Cholesky factor of ``H^-1``, with lazy updates in blocks of ``block_size`` rows.

Details that follow the reference exactly:
- dead inputs (``H_ii = 0``): ``H_ii := 1`` and that row of ``W`` is zeroed;
- damping ``damp * mean(diag H)`` on the diagonal (after the dead-input fix);
- ``group_size=-1``: one scale/zero per output channel, fitted on the kernel as given;
- dynamic groups: a group's scale/zero are fitted when its first row comes up, on the
  kernel as it stood at the start of the current block (the reference fits on ``W``, which
  receives the lazy updates only between blocks);
- static groups: all groups fitted up front on the (dead-zeroed) kernel in input order;
- act-order: rows processed by descending ``diag(H)``; codes returned in input order with
  ``g_idx`` mapping rows to groups.

Beyond the reference: if the Cholesky factorisation fails (``H`` not positive definite in
float32) the damping is multiplied by 10 (at least 0.001) and retried, up to 8 times,
inside the compiled function; the damping used is reported. The whole algorithm is one
``jit`` per (shape, spec, options); the loops are ``lax.fori_loop`` s.

Columns (output channels) are independent given ``H``, so ``W`` may be sharded over its
last axis on a mesh; every step is column-local except products with ``H``-derived
matrices, which are replicated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from epmq_jax.quant._grid import (
    QuantSpec,
    check_kernel,
    fit_scale_zero,
    group_params,
    is_concrete,
    quantize_codes,
)
from epmq_jax.quant._packing import QuantizedWeight

_MAX_DAMP_RETRIES = 8


class GPTQInfo(NamedTuple):
    """What :func:`gptq` reports about one layer (scalars, jax arrays).

    Attributes:
      damp_used: the relative damping actually used (``damp`` unless the Cholesky failed).
      objective: the rounding objective ``tr(ΔᵀHΔ)``, ``Δ = dequantize(Q) - W``, with the
        undamped ``H`` as given (computed only when info is requested: it costs a
        ``d_in x d_in x d_out`` matmul).
      cholesky_ok: False if even the largest damping tried left ``H`` non-factorable.
      n_dead: number of dead inputs (``H_ii == 0``).
    """

    damp_used: jax.Array
    objective: jax.Array
    cholesky_ok: jax.Array
    n_dead: jax.Array


def _upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
    """Upper-triangular ``U`` with ``UᵀU = h^-1`` (NaN if ``h`` is not positive definite).

    With ``J`` the reversal permutation and ``J h J = M Mᵀ`` (lower Cholesky), ``h = R Rᵀ`` for
    the upper-triangular ``R = J M J``, hence ``h^-1 = (R^-1)ᵀ R^-1`` and ``U = J M^-1 J``:
    one factorisation and one triangular inverse instead of the reference's three steps.
    """
    m = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    return jax.scipy.linalg.solve_triangular(m, eye, lower=True)[::-1, ::-1]


def damped_inverse_factor(h: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Factor of ``(h + damp * mean(diag h) I)^-1``, raising ``damp`` until it factors."""
    mean_diag = jnp.mean(jnp.diag(h))
    eye = jnp.eye(h.shape[0], dtype=h.dtype)

    def attempt(d):
        u = _upper_cholesky_of_inverse(h + (d * mean_diag) * eye)
        return u, jnp.all(jnp.isfinite(u))

    def retry(state):
        d, _, _, _, k = state
        u, ok = attempt(d)
        return jnp.maximum(10.0 * d, 1e-3).astype(d.dtype), d, u, ok, k + 1

    _, damp, u, ok, _ = lax.while_loop(
        lambda s: ~s[3] & (s[4] <= _MAX_DAMP_RETRIES), retry,
        (damp, damp, jnp.zeros_like(h), jnp.array(False), 0))
    return u, damp, ok


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "act_order", "static_groups",
                                             "with_objective"))
def _gptq(w, hessian, damp, *, spec: QuantSpec, block_size: int, act_order: bool,
          static_groups: bool, with_objective: bool):
    n, m = w.shape
    ct = jnp.promote_types(w.dtype, jnp.float32)
    w0 = w.astype(ct)
    h0 = hessian.astype(ct)
    maxq = spec.maxq
    g = spec.group_len(n)
    n_groups = n // g
    rows = jnp.arange(n)

    diag = jnp.diag(h0)
    dead = diag == 0
    h = h0.at[rows, rows].set(jnp.where(dead, 1.0, diag))
    wd = jnp.where(dead[:, None], 0.0, w0)

    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else rows
    dynamic = spec.group_size != -1 and not static_groups
    if spec.group_size == -1:        # the reference fits these before zeroing dead inputs
        scales, zeros = (x[None] for x in fit_scale_zero(w0, spec, axis=0))
        col_group = jnp.zeros(n, jnp.int32)
    elif static_groups:              # fitted in input order, before the permutation
        scales, zeros = group_params(wd, spec)
        col_group = (perm // g).astype(jnp.int32)
    else:
        scales = zeros = jnp.zeros((n_groups, m), ct)
        col_group = (rows // g).astype(jnp.int32)
    if act_order:
        h = h[perm][:, perm]
        wd = wd[perm]
    g_idx = (jnp.argsort(perm) // g if dynamic else rows // g).astype(jnp.int32)

    u, damp_used, chol_ok = damped_inverse_factor(h, damp.astype(ct))

    # Pad to whole blocks; padded rows are decoupled (identity in U) and dropped at the end.
    bs = min(block_size, n)
    n_blocks = -(-n // bs)
    pad = n_blocks * bs - n
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n + pad) >= n).astype(ct)
    wp = jnp.pad(wd, ((0, pad), (0, 0)))
    col_group = jnp.pad(col_group, (0, pad), mode="edge")

    def block(k, carry):
        wcur, codes, scales, zeros = carry
        i1 = k * bs
        w1 = lax.dynamic_slice_in_dim(wcur, i1, bs, 0)
        u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))

        def column(i, c):
            w1, q1, err1, scales, zeros = c
            col = i1 + i
            if dynamic:
                def refit(sz):
                    s, z = fit_scale_zero(lax.dynamic_slice_in_dim(wcur, col, g, 0), spec)
                    return sz[0].at[col // g].set(s), sz[1].at[col // g].set(z)
                scales, zeros = lax.cond((col % g == 0) & (col < n), refit, lambda sz: sz,
                                         (scales, zeros))
            s, z = scales[col_group[col]], zeros[col_group[col]]
            wi = w1[i]
            qi = quantize_codes(wi, s, z, maxq)
            erri = (wi - s * (qi - z)) / u1[i, i]
            w1 = w1 - u1[i][:, None] * erri[None, :]     # U upper: rows < i unchanged
            return w1, q1.at[i].set(qi.astype(jnp.uint8)), err1.at[i].set(erri), scales, zeros

        zeros_tile = jnp.zeros((bs, m), ct)
        _, q1, err1, scales, zeros = lax.fori_loop(
            0, bs, column, (w1, jnp.zeros((bs, m), jnp.uint8), zeros_tile, scales, zeros))
        codes = lax.dynamic_update_slice_in_dim(codes, q1, i1, 0)
        # Lazy update of the later blocks, one (bs, bs) x (bs, m) product each.
        def later_block(j, wcur):
            u_kj = lax.dynamic_slice(u, (i1, j * bs), (bs, bs))
            w_j = lax.dynamic_slice_in_dim(wcur, j * bs, bs, 0)
            return lax.dynamic_update_slice_in_dim(wcur, w_j - u_kj.T @ err1, j * bs, 0)

        wcur = lax.fori_loop(k + 1, n_blocks, later_block, wcur)
        return wcur, codes, scales, zeros

    _, codes, scales, zeros = lax.fori_loop(
        0, n_blocks, block, (wp, jnp.zeros((n + pad, m), jnp.uint8), scales, zeros))
    codes = codes[:n]
    if act_order:
        codes = codes[jnp.argsort(perm)]

    if with_objective:
        delta = scales[g_idx] * (codes.astype(ct) - zeros[g_idx]) - w0
        objective = jnp.sum(delta * (h0 @ delta))
    else:
        objective = jnp.asarray(jnp.nan, ct)
    qw = QuantizedWeight.from_codes(codes, scales, zeros, g_idx, spec, dtype=w.dtype)
    return qw, GPTQInfo(damp_used, objective, chol_ok, jnp.sum(dead))


def gptq(w: jax.Array, hessian: jax.Array, spec: QuantSpec, *, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False, static_groups: bool = False,
         return_info: bool = False) -> QuantizedWeight | tuple[QuantizedWeight, GPTQInfo]:
    """GPTQ-rounds a kernel to the grid of ``spec`` minimising ``tr((Q-W)ᵀ H (Q-W))``.

    Args:
      w: float kernel ``(d_in, d_out)`` in Flax layout (rows are inputs); may be sharded over
        ``d_out`` on a mesh.
      hessian: ``(d_in, d_in)``, proportional to ``XᵀX`` of the layer's inputs ``X (n, d_in)``.
      spec: the grid; ``spec.group_size`` must divide ``d_in``.
      damp: relative damping δ: ``δ · mean(diag H)`` is added to the diagonal. Raised
        (×10, at least 0.001, up to 8 times) if the Cholesky factorisation fails.
      block_size: rows per lazy-update block (the reference's 128).
      act_order: process inputs by descending ``diag(H)``.
      static_groups: fit every group's scale/zero up front instead of when the group starts.
      return_info: also return a :class:`GPTQInfo`.

    Returns:
      The :class:`QuantizedWeight`, or ``(QuantizedWeight, GPTQInfo)`` if ``return_info``.

    Raises:
      ValueError: bad shapes, NaN/inf in ``w`` or ``hessian``, a group size that does not
        divide ``d_in``, or a Hessian that no damping tried makes factorable (the last two
        checks need concrete arrays, i.e. they are skipped under an outer ``jit``).
    """
    check_kernel(w, spec)
    d_in = w.shape[0]
    if getattr(hessian, "shape", None) != (d_in, d_in):
        raise ValueError(
            f"hessian: expected shape ({d_in}, {d_in}) for a kernel of shape {tuple(w.shape)}, "
            f"got {getattr(hessian, 'shape', None)}")
    if is_concrete(hessian) and not bool(jnp.isfinite(hessian).all()):
        raise ValueError(f"hessian: matrix of shape {tuple(hessian.shape)} contains NaN or inf")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if is_concrete(damp) and float(damp) < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    qw, info = _gptq(jnp.asarray(w), jnp.asarray(hessian), jnp.asarray(damp, jnp.float32),
                     spec=spec, block_size=block_size, act_order=act_order,
                     static_groups=static_groups, with_objective=return_info)
    if is_concrete(info.cholesky_ok) and not bool(info.cholesky_ok):
        raise ValueError(
            f"hessian of shape {tuple(hessian.shape)} is not positive definite even with "
            f"damping {float(info.damp_used):g} x mean(diag H)")
    return (qw, info) if return_info else qw

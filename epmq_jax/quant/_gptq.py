"""GPTQ rounding of a Flax kernel given the Hessian of its layer's inputs (METHOD.md §5).

This is the reference implementation's algorithm (IST-DASLab ``gptq.py``,
``GPTQ.fasterquant``) in Flax layout: the kernel ``W`` is ``(d_in, d_out)`` and the input
rows are quantized one at a time, in order (or by descending ``diag(H)`` with act-order),
each after the rounding errors of all earlier rows have been spread over it.

Details that follow the reference exactly:
- dead inputs (``H_ii = 0``): ``H_ii := 1`` and that row of ``W`` is zeroed;
- damping ``damp * mean(diag H)`` on the diagonal (after the dead-input fix); only the lower
  triangle of ``H`` is read, as by the reference's Cholesky;
- ``group_size=-1``: one scale/zero per output channel, fitted on the kernel as given;
- dynamic groups: a group's scale/zero are fitted when its first row comes up, on the
  kernel as it stood at the start of the current block of ``block_size`` rows (the
  reference fits on ``W``, which receives its lazy updates only between blocks);
- static groups: all groups fitted up front on the (dead-zeroed) kernel in input order;
- act-order: rows processed by descending ``diag(H)``; codes returned in input order with
  ``g_idx`` mapping rows to groups.

How it is computed (the same numbers in exact arithmetic, less work): the reference factors
``H`` three times (Cholesky, its inverse, the Cholesky of that) to get the upper factor
``U`` of ``H^-1 = UᵀU`` and updates a row by ``-U_ij/U_ii`` times the rounding error of the
updated row ``i``. With ``R = U^-1`` (upper, ``H = RRᵀ``: one Cholesky of ``H`` with its
index order reversed) and ``S = Rᵀ diag(R)^-1`` (unit lower triangular), the row that row
``j`` is rounded from is ``W_j + Σ_{i<j} S_ji (W_i - Q_i)``: a sum over the differences of
*original* and rounded rows. That sum is computed left-looking: once per block with one
matmul over all earlier rows, then within the block in tiles of ``_TILE`` rows (a matmul
over the block's earlier rows, then the tile row by row). The kernel the reference fits a
dynamic group on is recovered exactly from the same sums through the inverse of ``S``'s
diagonal window (``W + S_ww^-1 A`` with ``A`` the block's correction), so no inverse of the
whole ``H`` is ever formed.

Beyond the reference: if the Cholesky factorisation fails (``H`` not positive definite in
float32) the damping is multiplied by 10 (at least 0.001) and retried, up to 8 times,
inside the compiled function; the damping used is reported. The whole algorithm is one
``jit`` per (shape, spec, options); the loops are ``lax.fori_loop`` s. Every matmul runs at
``Precision.HIGHEST`` (float32 accumulation on every backend); a bf16/f16 kernel is rounded
in float32 and its ``QuantizedWeight`` dequantizes to the kernel's dtype.

Columns (output channels) are independent given ``H``, so ``W`` may be sharded over its
last axis on a mesh; every step is column-local except products with ``H``-derived
matrices, which are replicated.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
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
_HI = lax.Precision.HIGHEST
# Rows rounded one after another (rank-1 updates of a (_TILE, d_out) tile) before a matmul
# over the block's finished rows brings the next tile up to date; halved until it divides
# block_size. 8 and 16 measured alike; 128 (the reference's in-block loop) is 2-3x slower.
_TILE = 8
# The blocks are split into up to this many consecutive ranges of at least 3 blocks. A
# block's lazy update contracts over the rows before the last block of its range (a static
# size; the rows not yet rounded hold zeros), so the matmuls do about (1 + 1/ranges) times
# the exact work, and the block body is compiled once per range. d_in = 768 (6 blocks of
# 128) gets 2 ranges; d_in >= 1536 gets 4, which matters where the lazy update dominates
# (LLM widths), at about 0.5 s more compilation.
_SEGMENTS = 4


class GPTQInfo(NamedTuple):
    """What :func:`gptq` reports about one layer (scalars, jax arrays).

    Attributes:
      damp_used: the relative damping actually used (``damp`` unless the Cholesky failed).
      objective: the rounding objective ``tr(ΔᵀHΔ)``, ``Δ = dequantize(Q) - W``, with the
        undamped ``H`` as given: from the rounding errors GPTQ has anyway (with the damped
        factor ``R Rᵀ``, ``tr(ΔᵀRRᵀΔ) = Σ_j R_jj² ‖e_j‖²``, ``e_j`` = row ``j`` as rounded minus
        its rounded value), less the damping's ``Σ_i δ_i ‖Δ_i‖²``; no ``d_in² x d_out`` matmul.
        Equal to the direct trace up to float rounding (the tests hold it to 1e-4 relative).
      cholesky_ok: False if even the largest damping tried left ``H`` non-factorable.
      n_dead: number of dead inputs (``H_ii == 0``).
    """

    damp_used: jax.Array
    objective: jax.Array
    cholesky_ok: jax.Array
    n_dead: jax.Array


def _reversed_cholesky(h: jax.Array, shift: jax.Array) -> jax.Array:
    """Upper-triangular ``R`` with ``R Rᵀ = h + diag(shift)`` (NaN if not positive definite).

    ``shift``: a scalar (``h + shift·I``) or one value per row. With ``J`` the reversal
    permutation and ``J h J = M Mᵀ`` (lower Cholesky), ``R = J M J``. Reads the lower triangle
    of ``h`` only.
    """
    idx = jnp.arange(h.shape[0])
    m = lax.linalg.cholesky(h.at[idx, idx].add(shift)[::-1, ::-1].T, symmetrize_input=False)
    return m[::-1, ::-1]


def _damped(factor: Callable[[jax.Array, jax.Array], jax.Array], h: jax.Array,
            damp: jax.Array, ridge: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``factor(h, δ·ridge)`` for ``δ = damp``, raising δ while the factor is not finite
    (``ridge``: per row, or None for ``mean(diag h)`` on every row).

    The first try runs outside any loop (a loop would copy the ``(n, n)`` factor); only if it
    fails is δ multiplied by 10 (at least 0.001), up to ``_MAX_DAMP_RETRIES`` times.

    Returns:
      ``(factor, δ used, ok)``.
    """
    ridge = jnp.mean(jnp.diag(h)) if ridge is None else ridge

    def attempt(d):
        f = factor(h, d * ridge)
        return f, jnp.all(jnp.isfinite(jnp.diagonal(f)))   # a failed Cholesky is NaN throughout

    def retry(state):
        d, _, _, k = state
        d = jnp.maximum(10.0 * d, 1e-3).astype(d.dtype)
        return (d, *attempt(d), k + 1)

    def retry_loop():
        d, f_d, ok_d, _ = lax.while_loop(lambda s: ~s[2] & (s[3] < _MAX_DAMP_RETRIES), retry,
                                         (damp, f, ok, 0))
        return f_d, d, ok_d

    f, ok = attempt(damp)
    return lax.cond(ok, lambda: (f, damp, ok), retry_loop)


def damped_factor(h: jax.Array, damp: jax.Array, ridge: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Upper ``R`` with ``R Rᵀ = h + δ·diag(ridge)``, raising δ until it factors.

    The factor GPTQ works with (``ridge`` None: ``mean(diag h)`` on every row). A caller that
    also solves with ``h`` (E-PMQ's anchored solve, :mod:`epmq_jax.calib.solve`) factors once
    and passes the result to :func:`gptq` as ``factor``. A ``ridge`` that differs from GPTQ's
    only on rows decoupled from all others (zero off-diagonal, e.g. dead inputs given a
    diagonal of their own) rounds as GPTQ's would: such a row is rounded on its own either way.

    Args:
      h: ``(n, n)`` symmetric (only the lower triangle is read), no zero diagonal entry.
      damp: the relative damping δ to try first.
      ridge: ``(n,)`` per-row scale of the damping, or None.

    Returns:
      ``(R, δ used, ok)``.
    """
    return _damped(_reversed_cholesky, h, damp, ridge)


def _group_starts(n: int, bs: int, g: int) -> list[list[int]]:
    """For each block of ``bs`` rows, the first rows of the groups of ``g`` rows starting in it."""
    return [[c for c in range(0, n, g) if k <= c < min(k + bs, n)] for k in range(0, n, bs)]


def _round_rows(x, w0, s, z, c, maxq):
    """Rounds the ``b`` rows of a tile in order.

    ``x`` (b, m): the rows with every earlier tile's correction; ``w0``: the original rows;
    ``s``, ``z``: each row's scales and zeros; ``c`` (b, b) unit lower triangular: row ``k``
    picks up ``c[k, r] * d_r`` from row ``r < k`` (``d_r = w0_r - dequant(q_r)``).

    Returns:
      ``(q, d)``, each (b, m): float codes and the differences ``w0 - dequant(q)``.
    """
    def row(r, carry):
        x, q, d, d_prev = carry
        # Row r-1's update is applied here, from the carried d_prev: applied in the iteration
        # that computes it, XLA fuses the rounding of row r-1 into the (b, m) update and
        # recomputes it b times. Rows < r are finished; d_prev = 0 at r = 0.
        x = x + c[:, r - 1][:, None] * d_prev[None, :]
        qr = quantize_codes(x[r], s[r], z[r], maxq)
        dr = w0[r] - s[r] * (qr - z[r])
        return x, q.at[r].set(qr), d.at[r].set(dr), dr

    zeros = jnp.zeros_like(x)
    _, q, d, _ = lax.fori_loop(0, x.shape[0], row, (x, zeros, zeros, zeros[0]))
    return q, d


def _round_block(xb, wb, sb, zb, stb, rwb, maxq, with_loss: bool = True):
    """Rounds one block of ``bs`` rows, tile by tile.

    ``xb`` (bs, m): the rows with every earlier block's correction; ``wb``: the original
    rows; ``sb``, ``zb``: each row's scales and zeros; ``stb`` (bs, bs): the block's diagonal
    window of ``S``; ``rwb`` (bs,): each row's ``R_jj²`` (0 for padding rows); ``with_loss``
    False: the loss is not computed (zeros).

    Returns:
      ``(q, d, loss)``: ``q``, ``d`` each (bs, m), as :func:`_round_rows`, and per column
      ``Σ_j R_jj² e_j²`` over the block's rows (m,), ``e_j`` = the row as it was rounded minus
      its rounded value (the reference's ``Losses`` times 2). A tile's ``e`` is its rows'
      corrections from earlier tiles plus ``C d`` (``C`` its unit lower window of ``S``): a
      (b, b) by (b, m) product, nothing inside the row loop.
    """
    bs = xb.shape[0]
    b = _TILE
    while bs % b:
        b //= 2

    def tile(t, carry):
        qb, db, loss = carry
        o = t * b
        rows = functools.partial(lax.dynamic_slice_in_dim, start_index=o, slice_size=b, axis=0)
        st = rows(stb)                                                     # (b, bs)
        xt = rows(xb) + jnp.dot(st, db, precision=_HI)                     # unfinished rows of db are 0
        wt = rows(wb)
        c = lax.dynamic_slice_in_dim(st, o, b, 1)
        q, d = _round_rows(xt, wt, rows(sb), rows(zb), c, maxq)
        if with_loss:
            e = xt - wt + jnp.dot(c, d, precision=_HI)
            loss = loss + jnp.sum(rows(rwb)[:, None] * (e * e), axis=0)
        return (lax.dynamic_update_slice_in_dim(qb, q, o, 0),
                lax.dynamic_update_slice_in_dim(db, d, o, 0), loss)

    zeros = jnp.zeros_like(xb)
    return lax.fori_loop(0, bs // b, tile, (zeros, zeros, jnp.zeros(xb.shape[1], xb.dtype)))


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "act_order", "static_groups",
                                             "with_objective"))
def _gptq(w, hessian, damp, factor=None, *, spec: QuantSpec, block_size: int, act_order: bool,
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
    wd = jnp.where(dead[:, None], 0.0, w0)
    perm = jnp.argsort(-jnp.where(dead, 1.0, diag), stable=True) if act_order else rows
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
    h = h0
    if act_order:
        h = h0[perm[:, None], perm[None, :]]
        wd = wd[perm]
        dead = dead[perm]
    h = h + jnp.diag(dead.astype(ct))                # dead inputs: H_ii := 1
    g_idx = (jnp.argsort(perm) // g if dynamic else rows // g).astype(jnp.int32)

    if factor is None:
        r, damp_used, chol_ok = damped_factor(h, damp.astype(ct))
    else:             # the caller's damped_factor(hessian, damp): same H (no dead input), no permutation
        r, damp_used, chol_ok = factor
        r = r.astype(ct)

    # Blocks of bs rows; with dynamic groups each block sees a window of win >= bs rows (every
    # group starting in the block). Rows past n are padding, decoupled from the rest.
    bs = min(block_size, n)
    starts = _group_starts(n, bs, g) if dynamic else []
    n_blocks = -(-n // bs)
    n_fit = max((len(s) for s in starts), default=0)
    win = max([bs] + [s[-1] + g - k * bs for k, s in enumerate(starts) if s])
    n_pad = (n_blocks - 1) * bs + win
    st = (r / jnp.diag(r)[None, :]).T               # S: unit lower triangular
    rw = jnp.diag(r) ** 2                           # R_jj²: each row's weight in the loss
    wp = wd
    if n_pad > n:
        pad = n_pad - n
        st = jnp.pad(st, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n_pad) >= n).astype(ct)
        wp = jnp.pad(wd, ((0, pad), (0, 0)))
        rw = jnp.pad(rw, (0, pad))
        col_group = jnp.pad(col_group, (0, pad), mode="edge")
    if dynamic:   # inverses of S's diagonal windows: the reference's view of the block
        idx = (jnp.arange(n_blocks) * bs)[:, None] + jnp.arange(win)[None, :]
        eye = jnp.broadcast_to(jnp.eye(win, dtype=ct), (n_blocks, win, win))
        st_inv = jax.scipy.linalg.solve_triangular(
            st[idx[:, :, None], idx[:, None, :]], eye, lower=True, unit_diagonal=True)

    def block(k, carry, k_rows):
        d, codes, scales, zeros, loss = carry
        i1 = k * bs
        ww = lax.dynamic_slice_in_dim(wp, i1, win, 0)
        corr = jnp.zeros_like(ww)
        if k_rows:    # rows >= i1 of d are still 0
            corr = jnp.dot(lax.dynamic_slice(st, (i1, 0), (win, k_rows)), d[:k_rows],
                           precision=_HI)
        if dynamic:   # fit the groups starting in this block on the reference's kernel
            ref_w = ww + jnp.dot(st_inv[k], corr, precision=_HI)
            first = (i1 + g - 1) // g
            for t in range(n_fit):
                j = first + t
                s, z = fit_scale_zero(lax.dynamic_slice_in_dim(ref_w, j * g - i1, g, 0), spec)
                jj = jnp.minimum(j, n_groups - 1)
                valid = j * g < jnp.minimum(i1 + bs, n)
                scales = scales.at[jj].set(jnp.where(valid, s, scales[jj]))
                zeros = zeros.at[jj].set(jnp.where(valid, z, zeros[jj]))
        cg = lax.dynamic_slice_in_dim(col_group, i1, bs)
        q, db, lb = _round_block((ww + corr)[:bs], ww[:bs], scales[cg], zeros[cg],
                                 lax.dynamic_slice(st, (i1, i1), (bs, bs)),
                                 lax.dynamic_slice_in_dim(rw, i1, bs), maxq, with_objective)
        codes = lax.dynamic_update_slice_in_dim(codes, q.astype(jnp.uint8), i1, 0)
        d = lax.dynamic_update_slice_in_dim(d, db, i1, 0)
        return d, codes, scales, zeros, loss + lb

    carry = (jnp.zeros((n_pad, m), ct), jnp.zeros((n_pad, m), jnp.uint8), scales, zeros,
             jnp.zeros(m, ct))
    n_seg = min(_SEGMENTS, max(1, n_blocks // 3))
    bounds = [round(p * n_blocks / n_seg) for p in range(n_seg + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        carry = lax.fori_loop(lo, hi, functools.partial(block, k_rows=(hi - 1) * bs), carry)
    d, codes, scales, zeros, loss = carry
    codes = codes[:n]
    if act_order:
        codes = codes[jnp.argsort(perm)]

    if with_objective:
        # tr(dᵀ R Rᵀ d) = Σ_j R_jj² ‖e_j‖² (d = W − Q = Uᵀ·err, U = R⁻¹: the reference's
        # Losses), less the diagonal R Rᵀ adds to H (the damping; 1 on dead rows, whose
        # off-diagonal H is zero): tr(ΔᵀHΔ) for the undamped H without a d_in² x d_out matmul
        added = jnp.sum(r * r, axis=1) - diag[perm]
        columns = loss - jnp.sum(added[:, None] * (d[:n] * d[:n]), axis=0)     # (m,)
    else:
        columns = jnp.full(m, jnp.nan, ct)
    qw = QuantizedWeight.from_codes(codes, scales, zeros, g_idx, spec, dtype=w.dtype)
    return qw, GPTQInfo(damp_used, jnp.sum(columns), chol_ok, jnp.sum(dead)), columns


def gptq(w: jax.Array, hessian: jax.Array, spec: QuantSpec, *, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False, static_groups: bool = False,
         return_info: bool = False, factor: tuple[jax.Array, jax.Array, jax.Array] | None = None
         ) -> QuantizedWeight | tuple[QuantizedWeight, GPTQInfo]:
    """GPTQ-rounds a kernel to the grid of ``spec`` minimising ``tr((Q-W)ᵀ H (Q-W))``.

    Args:
      w: float kernel ``(d_in, d_out)`` in Flax layout (rows are inputs); may be sharded over
        ``d_out`` on a mesh. bf16/f16 kernels are rounded in float32.
      hessian: ``(d_in, d_in)``, proportional to ``XᵀX`` of the layer's inputs ``X (n, d_in)``;
        only its lower triangle is read.
      spec: the grid; ``spec.group_size`` must divide ``d_in``.
      damp: relative damping δ: ``δ · mean(diag H)`` is added to the diagonal. Raised
        (×10, at least 0.001, up to 8 times) if the Cholesky factorisation fails; a warning
        says so when it ends more than 10x above ``damp``.
      block_size: rows per lazy-update block (the reference's 128).
      act_order: process inputs by descending ``diag(H)``.
      static_groups: fit every group's scale/zero up front instead of when the group starts.
      return_info: also return a :class:`GPTQInfo`.
      factor: ``damped_factor(hessian, damp)`` when the caller has it already (it factored
        ``hessian`` for a solve of its own): GPTQ then does no factorisation, and reports that
        factor's damping and success. ``hessian`` must have no zero diagonal entry; not with
        ``act_order`` (which factors the permuted ``H``).

    Returns:
      The :class:`QuantizedWeight` (dequantizing to ``w.dtype``), or
      ``(QuantizedWeight, GPTQInfo)`` if ``return_info``.

    Raises:
      ValueError: bad shapes, NaN/inf in ``w`` or ``hessian``, a group size that does not
        divide ``d_in``, an all-zero ``hessian`` diagonal (every input dead: nothing to
        calibrate on), or a Hessian that no damping tried makes factorable (the value checks
        need concrete arrays, i.e. they are skipped under an outer ``jit``).
    """
    _check_args(w, hessian, spec, damp, block_size, act_order, factor)
    qw, info, _ = _gptq(jnp.asarray(w), jnp.asarray(hessian), jnp.asarray(damp, jnp.float32), factor,
                        spec=spec, block_size=block_size, act_order=act_order,
                        static_groups=static_groups, with_objective=return_info)
    if is_concrete(info.cholesky_ok):
        if not bool(info.cholesky_ok):
            raise ValueError(
                f"hessian of shape {tuple(hessian.shape)} is not positive definite even with "
                f"damping {float(info.damp_used):g} x mean(diag H)")
        used, asked = float(info.damp_used), float(damp)
        if used > 10 * asked * (1 + 1e-4):     # the retries step by exactly 10x
            warnings.warn(
                f"gptq: the hessian of shape {tuple(hessian.shape)} did not factor with damping "
                f"{asked:g} x mean(diag H); it took {used:g} (more than 10x the damping asked "
                "for), which pulls the rounding toward plain RTN: check the calibration "
                "statistics", stacklevel=2)
    return (qw, info) if return_info else qw


def gptq_with_columns(w: jax.Array, hessian: jax.Array, spec: QuantSpec, *, damp, block_size: int = 128,
                      act_order: bool = False, static_groups: bool = False,
                      factor: tuple[jax.Array, jax.Array, jax.Array] | None = None
                      ) -> tuple[QuantizedWeight, GPTQInfo, jax.Array]:
    """:func:`gptq` with ``return_info=True`` and the objective per output column as well
    (``(d_out,)``, summing to ``info.objective``), for callers that add sums over split columns
    in a fixed order; for use under ``jit`` (no warnings or errors from the values: check
    ``info.cholesky_ok`` and ``info.damp_used``)."""
    _check_args(w, hessian, spec, damp, block_size, act_order, factor)
    return _gptq(jnp.asarray(w), jnp.asarray(hessian), jnp.asarray(damp, jnp.float32), factor,
                 spec=spec, block_size=block_size, act_order=act_order,
                 static_groups=static_groups, with_objective=True)


def _check_args(w, hessian, spec, damp, block_size, act_order, factor) -> None:
    """:func:`gptq`'s argument checks (the value checks only on concrete arrays)."""
    check_kernel(w, spec)
    d_in = w.shape[0]
    if getattr(hessian, "shape", None) != (d_in, d_in):
        raise ValueError(
            f"hessian: expected shape ({d_in}, {d_in}) for a kernel of shape {tuple(w.shape)}, "
            f"got {getattr(hessian, 'shape', None)}")
    if is_concrete(hessian):
        if not bool(jnp.isfinite(hessian).all()):
            raise ValueError(f"hessian: matrix of shape {tuple(hessian.shape)} contains NaN or inf")
        if not bool(jnp.any(jnp.diagonal(hessian) != 0)):
            raise ValueError(
                f"hessian: the diagonal of the ({d_in}, {d_in}) matrix is all zero: every input "
                "is dead (no calibration signal reached this layer), GPTQ would return an "
                "all-zero kernel")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if is_concrete(damp) and float(damp) < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if factor is not None:
        if act_order:
            raise ValueError("factor: act_order=True factors the permuted hessian; pass factor=None")
        r_shape = getattr(factor[0], "shape", None) if len(factor) == 3 else None
        if r_shape != (d_in, d_in):
            raise ValueError(f"factor: expected damped_factor(hessian, damp) = (R of shape ({d_in}, "
                             f"{d_in}), damp used, ok), got {len(factor)} items, R of shape {r_shape}")

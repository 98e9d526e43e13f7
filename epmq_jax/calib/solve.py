"""The anchored least-squares solve W* = H⁻¹B and the rounders that turn (W*, H) into codes.

**Dead inputs** (diag H = 0: the input is zero on every calibration row) keep their merged row:
the solve sets H_ii = μ (μ = mean of the live diagonal) and B_i = μ·W_m,i, so W*_i = W_m,i, and
the rounder sees the same fixed H, so the rounded row is that row of W_m rounded on its own (an
all-zero input therefore returns the merge's rows, rounded). The ``gptq`` objective (GPTQ on the
merge) keeps the reference's policy instead: a dead row is zeroed (:func:`epmq_jax.quant.gptq`).

**Damping** is a second anchor, separate from the objective's λ: its size δ (``damp``) and its
centre (``damp_center``) are options. δμ is added to the live diagonal (μ as above); with centre
``merged`` the right-hand side gets δμ·W_m, so we solve (H + δμI)W = B + δμW_m: a tiny weight
anchor toward the merge (W* = W_m exactly when B = HW_m, whatever δ); with centre ``zero`` the
plain ridge (H + δμI)W = B of GPTQ. The factorisation is GPTQ's own
(:func:`epmq_jax.quant.damped_factor`: H + δμ·diag(live) = RRᵀ with R upper, then two
triangular solves), so GPTQ rounding with the same δ reuses it instead of factoring H again
(it differs from GPTQ's H + δμI only on dead rows, which are decoupled from the rest and
rounded on their own either way). While it fails (H indefinite in float32), δ is raised tenfold
(at least to 0.001), up to 8 times, as :func:`epmq_jax.quant.gptq` does; the δ actually used is
reported. With δ = 0 on a positive-definite H the solve is exactly H⁻¹B (the unanchored solve
when λ = 0 too).

Rounders: ``gptq`` (``epmq_jax.quant.gptq(W*, H)``), ``rtn`` (``epmq_jax.quant.rtn(W*)``) or
``none`` (W* itself, float). Every rounder returns the kernel in W_m's dtype (float32 inside). ``awq`` is a rounding of the driver but not of one layer: its
scales are shared by the layers reading one input and folded into the op before them, so it
works on whole blocks (:mod:`epmq_jax.calib.awq`).

:func:`solve_layer` runs objective → solve → rounder → report for one layer as one compiled
program; :func:`layer_step` is the same without any host round trip (the driver fetches a whole
block's statistics at once and hands them to :func:`finish_stats`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from epmq_jax.calib._placement import fixed_total
from epmq_jax.calib.objectives import Objective, system_and_merged, value_from_product
from epmq_jax.calib.stats import Moments
from epmq_jax.quant import QuantSpec, damped_factor, gptq, rtn
from epmq_jax.quant._gptq import gptq_with_columns

Rounding = Literal["gptq", "rtn", "awq", "none"]
ROUNDINGS = ("gptq", "rtn", "awq", "none")
DampCenter = Literal["merged", "zero"]
DAMP_CENTERS = ("merged", "zero")
_HI = jax.lax.Precision.HIGHEST
_WARN_DAMP_FACTOR = 10.0   # damping raised beyond this factor is reported in words


def stat_float(v) -> float:
    """A float32 scalar as the Python float of its shortest repr (0.01, not 0.009999999776), for
    the solver statistics."""
    return float(str(np.float32(v)))


def check_damping(damp: Any, damp_center: Any, *, name: str = "damp") -> None:
    """Raises ValueError unless ``damp`` is a finite number >= 0 and the centre is known."""
    try:
        ok = bool(np.isfinite(float(damp))) and float(damp) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number >= 0, got {damp!r}")
    if damp_center not in DAMP_CENTERS:
        raise ValueError(f"damp_center must be one of {DAMP_CENTERS}, got {damp_center!r}")


def _fix_dead(h: jax.Array, b: jax.Array, center: jax.Array):
    """Dead inputs (diag H = 0): H_ii = μ and B_i = μ·center_i, so W*_i = center_i.

    Returns ``(h, b, live (d_in,) bool, μ)`` with μ the mean of the live diagonal (1 if none).
    """
    d = jnp.diag(h)
    live = d != 0
    n_live = jnp.sum(live)
    mu = jnp.where(n_live > 0, jnp.sum(jnp.where(live, d, 0.0)) / jnp.maximum(n_live, 1), 1.0)
    dead = (~live).astype(h.dtype)
    h = h + jnp.diag(dead * mu)
    b = jnp.where(live[:, None], b, mu * center)
    return h, b, live, mu


def _solve(h, b, center, damp, damp_center: str, columns=None):
    """The damped solve; returns ``(W*, H·W*, H with dead inputs fixed, factor, info)`` (H·W*
    for the undamped H, without a matmul; ``factor`` = ``quant.damped_factor`` of the fixed H,
    which GPTQ rounding with the same δ reuses)."""
    h = h.astype(jnp.float32)
    b = b.astype(jnp.float32)
    center = center.astype(jnp.float32)
    hf, bf, live, mu = _fix_dead(h, b, center)
    ridge = jnp.where(live, mu, 0.0)
    r, d, ok = damped_factor(hf, jnp.asarray(damp, jnp.float32), ridge)   # R Rᵀ = H_fix + δ·ridge
    reg = (d * ridge)[:, None]
    rhs = bf + reg * center if damp_center == "merged" else bf

    def tri(r, rhs):     # (R Rᵀ)⁻¹ rhs: two triangular solves
        z = jax.scipy.linalg.solve_triangular(r, rhs, lower=False)
        return jax.scipy.linalg.solve_triangular(r, z, lower=False, trans="T")

    if columns is not None:     # (mesh, axis): every device solves its own output channels
        mesh, axis = columns
        tri = jax.shard_map(tri, mesh=mesh, in_specs=(P(), P(None, axis)), out_specs=P(None, axis))
    w = jnp.where(live[:, None], tri(r, rhs), center)    # dead rows: exactly center_i
    # (H_fix + reg) W = rhs  =>  H W = rhs − reg·W on live rows; dead rows of H are zero
    hw = jnp.where(live[:, None], rhs - reg * w, 0.0)
    dr = jnp.diag(r)
    info = {"damp": d, "cond": (jnp.max(dr) / jnp.min(dr)) ** 2, "ok": ok,
            "n_dead": jnp.sum(~live).astype(jnp.int32)}
    return w, hw, hf, (r, d, ok), info


@functools.partial(jax.jit, static_argnames="damp_center")
def solve(h: jax.Array, b: jax.Array, center: jax.Array, damp: float = 0.01, *,
          damp_center: DampCenter = "merged") -> tuple[jax.Array, dict]:
    """W* = H⁻¹B by Cholesky, damped (see the module docstring).

    Args:
      h: ``(d_in, d_in)``, symmetric positive semi-definite.
      b: ``(d_in, d_out)``.
      center: ``(d_in, d_out)``, the kernel dead inputs keep and (centre ``merged``) the damping
        pulls toward (W_m).
      damp: δ, relative to the mean live diagonal of H.
      damp_center: ``merged`` or ``zero``.

    Returns:
      ``(W*, info)`` with ``info`` = ``{"damp": δ used, "cond": (max diag R / min diag R)² for
      the triangular factor R of the damped H (a cheap lower bound on its κ₂), "ok": bool,
      "n_dead": number of dead inputs}``.
    """
    w, _, _, _, info = _solve(h, b, center, damp, damp_center)
    return w, info


def _check_layer_rounding(rounding: str) -> None:
    if rounding == "awq":
        raise ValueError("rounding='awq' quantizes whole blocks (scales shared by the layers that "
                         "read one input, folded into the op before them): use calib.calibrate with "
                         "an adapter that has awq_groups, or epmq_jax.calib.awq.calibrate_block")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def round_weight(w_star: jax.Array, h: jax.Array, spec, rounding: Rounding = "gptq", *,
                 damp: float = 0.01, factor: tuple | None = None, **options: Any):
    """Rounds a relaxed kernel: ``gptq(W*, H)``, ``rtn(W*)`` or ``none`` (W* as float).

    Args:
      w_star: ``(d_in, d_out)`` float kernel.
      h: ``(d_in, d_in)`` Hessian of the objective (used by ``gptq`` and ``awq``).
      spec: :class:`epmq_jax.quant.QuantSpec` (unused for ``none``).
      rounding: ``gptq``, ``rtn`` or ``none``.
      damp: GPTQ damping δ.
      factor: for ``gptq``, ``quant.damped_factor(h, damp)`` if the caller has it (the solve's).
      **options: keyword options of :func:`epmq_jax.quant.gptq` (``block_size``, ``act_order``,
        ``static_groups``).

    Returns:
      ``(q, info)``: a :class:`epmq_jax.quant.QuantizedWeight` (the float array for ``none``)
      and a dict, ``{"gptq_damp": δ GPTQ used, "gptq_ok": factorable}`` for ``gptq``, else empty.

    Raises:
      ValueError: ``rounding="awq"`` (block-level: :func:`epmq_jax.calib.awq.calibrate_block`)
        or an unknown rounding.
    """
    _check_layer_rounding(rounding)
    if rounding == "none":
        return w_star, {}
    check_spec(spec, rounding)
    if rounding == "rtn":
        return rtn(w_star, spec), {}
    q, info = gptq(w_star, h, spec, damp=damp, return_info=True, factor=factor, **options)
    return q, {"gptq_damp": info.damp_used, "gptq_ok": info.cholesky_ok}


def check_spec(spec, rounding: str) -> None:
    """Raises ValueError unless ``spec`` is a QuantSpec (any value will do for ``none``)."""
    if rounding != "none" and not isinstance(spec, QuantSpec):
        raise ValueError(f"spec: rounding={rounding!r} needs an epmq_jax.quant.QuantSpec, got "
                         f"{type(spec).__name__}")


def effective_kernel(q) -> jax.Array:
    """The float kernel a rounded weight stands for (``q`` itself when it is an array)."""
    return q.dequantize() if hasattr(q, "dequantize") else q


def _in_dtype(q, dtype):
    """The rounded weight ``q`` (computed in float32) in the kernel's own dtype."""
    if hasattr(q, "dequantize"):
        return dataclasses.replace(q, dtype=np.dtype(dtype).name)
    return q.astype(dtype)


@functools.partial(jax.jit, static_argnames=("objective", "damp_center", "columns"))
def _relax(lam, m: Moments, w_merged, damp, *, objective: Objective, damp_center: str, columns):
    """System and solve: ``(W*, H, H for the rounder, HW* − B or None, L(W_m), L(W*), factor,
    info)``.

    The rounder's H has the dead inputs fixed as in the solve, so a dead row is W_m's, rounded;
    ``factor`` is the solve's ``quant.damped_factor`` of it (None for ``gptq``: no solve).
    """
    w_m = w_merged.astype(jnp.float32)
    if objective.kind == "gptq":   # B = H W_m: W* = W_m, L(W_m) = L(W*) = 0, no solve
        zero = jnp.zeros((), jnp.float32)
        return w_m, m.h, m.h, None, zero, zero, None, _merge_info(m.h)
    total = fixed_total(columns)
    system, hwm = system_and_merged(objective, m, w_m, lam, total=total)
    w_star, hw_star, h_round, factor, info = _solve(system.h, system.b, w_m, damp, damp_center, columns)
    return (w_star, system.h, h_round, hw_star - system.b,
            value_from_product(system, w_m, hwm, total=total),
            value_from_product(system, w_star, hw_star, total=total), factor, info)


@jax.jit
def _merge_info(h):
    """The solve's statistics for the ``gptq`` objective (no solve: W* = W_m)."""
    return {"damp": jnp.float32(jnp.nan), "cond": jnp.float32(jnp.nan), "ok": jnp.array(True),
            "n_dead": jnp.sum(jnp.diag(h) == 0).astype(jnp.int32)}


@functools.partial(jax.jit, static_argnames=("spec", "rounding", "options", "dtype"))
def _round(w_star, h_round, damp, factor=None, *, spec, rounding: str, options: tuple, dtype: str):
    """The rounder, compiled once per (shape, spec, rounder) whatever the objective (and once
    more for GPTQ given the solve's factor). Returns ``(q, effective kernel, info, per-column
    tr(ΔᵀH_roundΔ) or None)``: GPTQ has that objective from its own rounding errors
    (:func:`epmq_jax.quant.gptq`'s ``GPTQInfo.objective``), for a float32 kernel (a bf16 one
    is stored with an extra rounding that only the matmul in :func:`_report` sees)."""
    if rounding != "gptq" or np.dtype(dtype) != np.float32:
        q, info = round_weight(w_star, h_round, spec, rounding, damp=damp, factor=factor, **dict(options))
        q = _in_dtype(q, dtype)
        return q, effective_kernel(q), info, None
    check_spec(spec, rounding)
    q, ginfo, cols = gptq_with_columns(w_star, h_round, spec, damp=damp, factor=factor, **dict(options))
    return q, q.dequantize(), {"gptq_damp": ginfo.damp_used, "gptq_ok": ginfo.cholesky_ok}, cols


@functools.partial(jax.jit, static_argnames="columns")
def _report(h, w_merged, w_star, eff, resid, obj_relaxed, rounded=None, h_round=None, *, columns=None):
    """rel_dist and L(Q) = L(W*) + tr(ΔᵀHΔ) + 2tr(Δᵀ(HW* − B)), Δ = Q − W*: one matmul, or
    none when the rounder gives tr(ΔᵀH_roundΔ) per column (``rounded``; ``h_round`` differs
    from H only on its diagonal, at dead inputs). Sums over split columns are added in a fixed
    order (:func:`fixed_total`)."""
    total = fixed_total(columns)
    w_m = w_merged.astype(jnp.float32)
    delta = eff.astype(jnp.float32) - w_star
    if rounded is None:
        quad = total(delta * jnp.matmul(h, delta, precision=_HI))
    else:
        extra = (jnp.diag(h_round) - jnp.diag(h))[:, None]
        quad = total(rounded[None, :] - jnp.sum(extra * delta * delta, axis=0, keepdims=True))
    obj = obj_relaxed + quad
    if resid is not None:
        obj = obj + 2.0 * total(delta * resid)
    norm = lambda x: jnp.sqrt(total(x * x))   # noqa: E731
    return {"rel_dist": norm(w_star - w_m) / jnp.maximum(norm(w_m), 1e-30), "obj_rounded": obj}


def layer_step(objective: Objective, m: Moments, w_merged: jax.Array, spec, *,
               rounding: Rounding = "gptq", damp: float = 0.01, damp_center: DampCenter = "merged",
               gptq_damp: float | None = None, columns: tuple | None = None,
               **options: Any) -> tuple[Any, jax.Array, dict]:
    """Objective → (W*, H) → rounder → report for one layer, without any host round trip.

    Arguments as :func:`solve_layer`; ``columns`` = ``(mesh, axis)`` solves each device's output
    channels where it lies (``B`` and W_m split over ``axis``).

    GPTQ rounding with the solve's δ (``gptq_damp`` None or equal, no ``act_order``) reuses the
    solve's factorisation of H instead of factoring it again, and its objective comes from
    GPTQ's own rounding errors (no ``d_in² x d_out`` matmul for the report). The ``gptq``
    objective (W* = W_m) runs no solve program at all.

    Returns:
      ``(q, effective kernel in W_m's dtype, {name: device scalar})``: pass the (fetched)
      statistics to :func:`finish_stats`.
    """
    if objective.kind == "gptq":      # W* = W_m, H = H_d, L(W_m) = L(W*) = 0: nothing to solve
        w_star = w_merged.astype(jnp.float32)
        h = h_round = m.h
        resid = factor = None
        obj_merged = obj_relaxed = jnp.zeros((), jnp.float32)
        info = _merge_info(m.h)
    else:
        w_star, h, h_round, resid, obj_merged, obj_relaxed, factor, info = _relax(
            jnp.float32(objective.lam), m, w_merged, jnp.float32(damp),
            objective=dataclasses.replace(objective, lam=0.0), damp_center=damp_center,
            columns=columns)
    shared = (rounding == "gptq" and not options.get("act_order", False)
              and (gptq_damp is None or gptq_damp == damp))
    q, eff, rinfo, rounded = _round(w_star, h_round, jnp.float32(damp if gptq_damp is None else gptq_damp),
                                    factor if shared else None, spec=spec, rounding=rounding,
                                    options=tuple(sorted(options.items())),
                                    dtype=np.dtype(w_merged.dtype).name)
    stats = {**_report(h, w_merged, w_star, eff, resid, obj_relaxed, rounded,
                       None if rounded is None else h_round, columns=columns),
             "obj_merged": obj_merged,
             "obj_relaxed": obj_relaxed, **info, **rinfo}
    return q, eff, stats


def finish_stats(raw: Mapping[str, Any], *, path: str, shape: tuple, objective: Objective,
                 rounding: str, damp: float, damp_center: str,
                 gptq_damp: float | None = None) -> dict:
    """Host side of :func:`layer_step`: checks the flags and makes the JSON-able statistics.

    Raises:
      ValueError: H not positive definite even after raising the damping (solve or GPTQ).

    Warns:
      UserWarning: the damping had to be raised more than tenfold (H indefinite).
    """
    gptq_damp = damp if gptq_damp is None else gptq_damp
    solved = objective.kind != "gptq"
    if not bool(raw["ok"]) or not bool(raw.get("gptq_ok", True)):
        which, used = (("solve", raw["damp"]) if not bool(raw["ok"]) else ("GPTQ", raw["gptq_damp"]))
        raise ValueError(f"{path}: the {which}'s H {shape} is not positive definite even with "
                         f"damping {float(used):.3g} x mean diag H (non-finite or indefinite "
                         "statistics?)")
    out = {"path": path, "rounding": rounding, "damp_center": damp_center if solved else None,
           "damp_requested": damp if solved else None}
    for k, v in raw.items():
        if k in ("ok", "gptq_ok"):
            continue
        out[k] = int(v) if k == "n_dead" else float(str(np.float32(v)))   # shortest repr: 0.01
    if not solved:
        out["damp"] = out["cond"] = None
    raised = []
    if solved and out["damp"] > _WARN_DAMP_FACTOR * max(damp, 1e-4):
        raised.append(("the solve's", damp, out["damp"]))
    if "gptq_damp" in out and out["gptq_damp"] > _WARN_DAMP_FACTOR * max(gptq_damp, 1e-4):
        raised.append(("GPTQ's", gptq_damp, out["gptq_damp"]))
    out["damp_raised"] = bool(raised)
    for who, asked, used in raised:
        warnings.warn(f"{path}: H is not positive definite in float32; {who} damping was raised "
                      f"from {asked:.3g} to {used:.3g} x mean diag H (indefinite or rank-deficient "
                      "statistics: more calibration data, or a larger damp, would help)",
                      stacklevel=3)
    return out


def solve_layer(objective: Objective, m: Moments, w_merged: jax.Array, spec, *,
                rounding: Rounding = "gptq", damp: float = 0.01, damp_center: DampCenter = "merged",
                gptq_damp: float | None = None, path: str = "", **options: Any) -> tuple[Any, dict]:
    """Objective → (W*, H) → rounder, for one layer, with its solver statistics.

    Args:
      objective: the layer objective.
      m: the layer's ω-weighted :class:`~epmq_jax.calib.stats.Moments`.
      w_merged: merged kernel W_m ``(d_in, d_out)``; its dtype is the result's.
      spec: quantization spec (unused for ``rounding="none"``).
      rounding: ``gptq``, ``rtn`` or ``none`` (``awq`` raises: it is block-level).
      damp: the solve's damping size δ (relative to the mean live diagonal of H); 0 = none
        unless H is not positive definite.
      damp_center: ``merged`` (pull toward W_m) or ``zero`` (plain ridge).
      gptq_damp: GPTQ rounding's δ (default: ``damp``).
      path: the layer's leaf path, for messages and the statistics.
      **options: passed to the rounder (see :func:`round_weight`).

    Returns:
      ``(q, stats)``: the rounded weight (``QuantizedWeight`` or float W*, in W_m's dtype) and a
      JSON-able dict ``{path, rel_dist, cond, damp, damp_requested, damp_center, damp_raised,
      n_dead, obj_merged, obj_relaxed, obj_rounded, rounding, time_s}`` (+ ``gptq_damp`` for
      GPTQ rounding): ``damp`` is the δ the solve used; ``cond``, ``damp``,
      ``damp_requested`` and ``damp_center`` are None for the ``gptq`` objective, whose
      W* = W_m needs no solve; objective values are L(W_m), L(W*) and L(Q) of the undamped
      objective.

    Raises:
      ValueError: shapes disagree, a bad switch, or H is not positive definite even after damping.
    """
    _check_layer_rounding(rounding)
    check_spec(spec, rounding)
    check_damping(damp, damp_center)
    if gptq_damp is not None:
        check_damping(gptq_damp, damp_center, name="gptq_damp")
    d_in, d_out = w_merged.shape
    if m.h.shape != (d_in, d_in):
        raise ValueError(f"{path}: H has shape {m.h.shape}, expected {(d_in, d_in)} for a kernel "
                         f"of shape {(d_in, d_out)}")
    if objective.needs_targets and (m.b is None or m.b.shape != (d_in, d_out)):
        raise ValueError(f"{path}: B has shape {None if m.b is None else m.b.shape}, expected "
                         f"{(d_in, d_out)}")
    t0 = time.perf_counter()
    q, _, raw = layer_step(objective, m, w_merged, spec, rounding=rounding, damp=damp,
                           damp_center=damp_center, gptq_damp=gptq_damp, **options)
    stats = finish_stats(jax.device_get(raw), path=path, shape=(d_in, d_in), objective=objective,
                         rounding=rounding, damp=damp, damp_center=damp_center, gptq_damp=gptq_damp)
    jax.block_until_ready(q)
    stats["time_s"] = time.perf_counter() - t0
    return q, stats

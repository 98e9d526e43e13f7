"""The anchored least-squares solve W* = H⁻¹B and the rounders that turn (W*, H) into codes.

Damping is GPTQ's policy, through GPTQ's own factorisation (``epmq_jax.quant._gptq``,
METHOD.md §5): a dead input (diag H = 0) gets H_ii = 1, then δ·mean(diag H) is added to the
diagonal (δ = ``damp``), and δ is raised tenfold while the Cholesky factorisation fails; the
δ actually used is reported. In the solve the damping is
centred on the merged kernel: we solve (H + δμI)W = B + δμW_m (μ = mean diag H), i.e. δ acts
as a tiny weight anchor toward W_m rather than a pull toward 0. Hence W* = W_m exactly when
B = HW_m (GPTQ's objective, or a single expert equal to the merge), whatever δ; a dead input
keeps its W_m row; and with δ = 0 on a positive-definite H the solve is the exact H⁻¹B.

Rounders: ``gptq`` (``epmq_jax.quant.gptq(W*, H)``), ``rtn`` (``epmq_jax.quant.rtn(W*)``) or
``none`` (W* itself, float). ``awq`` is a rounding of the driver but not of one layer: its
scales are shared by the layers reading one input and folded into the op before them, so it
works on whole blocks (:mod:`epmq_jax.calib.awq`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp

from epmq_jax.calib.objectives import Objective, System, layer_system, objective_value
from epmq_jax.calib.stats import Moments
from epmq_jax.quant._gptq import damped_inverse_factor

Rounding = Literal["gptq", "rtn", "awq", "none"]
ROUNDINGS = ("gptq", "rtn", "awq", "none")
_HI = jax.lax.Precision.HIGHEST


def _fix_dead(h: jax.Array, b: jax.Array, center: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dead inputs (diag H = 0): H_ii = 1 and B_i = center_i, so W*_i = center_i."""
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    b = jnp.where(dead[:, None], center, b)
    return h, b


@jax.jit
def solve(h: jax.Array, b: jax.Array, center: jax.Array, damp: float = 0.01) -> tuple[jax.Array, dict]:
    """W* = H⁻¹B by Cholesky, damped toward ``center`` (see the module docstring).

    Args:
      h: ``(d_in, d_in)``, symmetric positive semi-definite.
      b: ``(d_in, d_out)``; may be sharded over its columns (output channels): every column
        is an independent solve and the result keeps that sharding.
      center: ``(d_in, d_out)``, the kernel the damping pulls toward (W_m).
      damp: δ.

    Returns:
      ``(W*, info)`` with ``info`` = ``{"damp": δ used, "cond": (max diag U / min diag U)²
      for the triangular factor U of the damped H⁻¹ (a cheap lower bound on its κ₂), "ok": bool}``.
    """
    h = h.astype(jnp.float32)
    b = b.astype(jnp.float32)
    center = center.astype(jnp.float32)
    h, b = _fix_dead(h, b, center)
    u, d, ok = damped_inverse_factor(h, jnp.asarray(damp, jnp.float32))   # UᵀU = (H + dμI)⁻¹
    mu = jnp.mean(jnp.diag(h))
    w = jnp.matmul(u.T, jnp.matmul(u, b + d * mu * center, precision=_HI), precision=_HI)
    du = jnp.diag(u)
    return w, {"damp": d, "cond": (jnp.max(du) / jnp.min(du)) ** 2, "ok": ok}


def _check_layer_rounding(rounding: str) -> None:
    if rounding == "awq":
        raise ValueError("rounding='awq' quantizes whole blocks (scales shared by the layers that "
                         "read one input, folded into the op before them): use calib.calibrate with "
                         "an adapter that has awq_groups, or epmq_jax.calib.awq.calibrate_block")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def round_weight(w_star: jax.Array, h: jax.Array, spec, rounding: Rounding = "gptq", *,
                 damp: float = 0.01, **options: Any):
    """Rounds a relaxed kernel: ``gptq(W*, H)``, ``rtn(W*)`` or ``none`` (W* as float).

    Args:
      w_star: ``(d_in, d_out)`` float kernel.
      h: ``(d_in, d_in)`` Hessian of the objective (used by ``gptq``).
      spec: :class:`epmq_jax.quant.QuantSpec`.
      rounding: ``gptq``, ``rtn`` or ``none``.
      damp: GPTQ damping δ.
      **options: keyword options of :func:`epmq_jax.quant.gptq` (``block_size``, ``act_order``,
        ``static_groups``).

    Returns:
      ``(q, info)``: a :class:`epmq_jax.quant.QuantizedWeight` (the float array for ``none``)
      and a dict, ``{"gptq_damp": δ GPTQ used}`` for ``gptq``, else empty.

    Raises:
      ValueError: ``rounding="awq"`` (block-level: :func:`epmq_jax.calib.awq.calibrate_block`)
        or an unknown rounding.
    """
    from epmq_jax import quant

    _check_layer_rounding(rounding)
    if rounding == "none":
        return w_star, {}
    if rounding == "rtn":
        return quant.rtn(w_star, spec), {}
    q, info = quant.gptq(w_star, h, spec, damp=damp, return_info=True, **options)
    return q, {"gptq_damp": info.damp_used}


def effective_kernel(q) -> jax.Array:
    """The float kernel a rounded weight stands for (``q`` itself when it is an array)."""
    return q.dequantize() if hasattr(q, "dequantize") else q


@jax.jit
def _report(system: System, w_merged: jax.Array, w_star: jax.Array, q: jax.Array) -> dict:
    wm = w_merged.astype(jnp.float32)
    return {
        "rel_dist": jnp.linalg.norm(w_star - wm) / jnp.maximum(jnp.linalg.norm(wm), 1e-30),
        "obj_merged": objective_value(system, wm),
        "obj_relaxed": objective_value(system, w_star),
        "obj_rounded": objective_value(system, q),
    }


@functools.partial(jax.jit, static_argnums=0)
def _system_jit(objective: Objective, lam: jax.Array, m: Moments, w_merged: jax.Array) -> System:
    """layer_system with λ traced, so a λ sweep compiles once."""
    return layer_system(objective, m, w_merged, lam=lam)


def solve_layer(objective: Objective, m: Moments, w_merged: jax.Array, spec, *,
                rounding: Rounding = "gptq", damp: float = 0.01, path: str = "",
                **options: Any) -> tuple[Any, dict]:
    """Objective → (W*, H) → rounder, for one layer, with its solver statistics.

    Args:
      objective: the layer objective.
      m: the layer's ω-weighted :class:`~epmq_jax.calib.stats.Moments`.
      w_merged: merged kernel W_m ``(d_in, d_out)``.
      spec: quantization spec (unused for ``rounding="none"``).
      rounding: ``gptq``, ``rtn`` or ``none`` (``awq`` raises: it is block-level).
      damp: δ of both the solve and GPTQ.
      path: the layer's leaf path, for messages and the statistics.
      **options: passed to the rounder (see :func:`round_weight`).

    Returns:
      ``(q, stats)``: the rounded weight (``QuantizedWeight`` or float W*) and a JSON-able dict
      ``{path, rel_dist, cond, damp, obj_merged, obj_relaxed, obj_rounded, rounding, time_s}``
      (+ ``gptq_damp`` for GPTQ rounding); ``cond`` is None for the
      ``gptq`` objective, whose W* = W_m needs no solve;
      objective values are L(W_m), L(W*) and L(Q) of the undamped objective.

    Raises:
      ValueError: shapes disagree, or H is not positive definite even after damping.
    """
    _check_layer_rounding(rounding)
    d_in, d_out = w_merged.shape
    if m.h.shape != (d_in, d_in):
        raise ValueError(f"{path}: H has shape {m.h.shape}, expected {(d_in, d_in)} for a kernel "
                         f"of shape {(d_in, d_out)}")
    if m.b is not None and objective.needs_targets and m.b.shape != (d_in, d_out):
        raise ValueError(f"{path}: B has shape {m.b.shape}, expected {(d_in, d_out)}")
    t0 = time.perf_counter()
    system = _system_jit(dataclasses.replace(objective, lam=0.0), jnp.float32(objective.lam), m,
                         w_merged)
    if objective.kind == "gptq":   # B = H W_m: the solve is the identity
        w_star, info = w_merged.astype(jnp.float32), {"damp": damp, "cond": None, "ok": True}
    else:
        w_star, info = solve(system.h, system.b, w_merged, damp)
    if not bool(info["ok"]):
        raise ValueError(f"{path}: H {system.h.shape} is not positive definite even with damping "
                         f"{float(info['damp']):.3g} (non-finite statistics?)")
    q, rinfo = round_weight(w_star, system.h, spec, rounding, damp=damp, **options)
    rep = jax.device_get({**_report(system, w_merged, w_star, effective_kernel(q)), **rinfo})
    stats = {"path": path, **{k: float(v) for k, v in rep.items()},
             "cond": None if info["cond"] is None else float(info["cond"]),
             "damp": float(info["damp"]), "rounding": rounding}
    jax.block_until_ready(q)
    stats["time_s"] = time.perf_counter() - t0
    return q, stats

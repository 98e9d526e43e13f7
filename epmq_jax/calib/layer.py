"""The one-layer public API: E-PMQ on a single linear layer from its inputs (METHOD.md §4).

Users and outside checks call :func:`epmq_layer`; the sequential driver uses the same pieces
(statistics → objective → solve → rounder) over a whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from epmq_jax.calib.objectives import Objective
from epmq_jax.calib.solve import DampCenter, Rounding, check_damping, check_spec, solve_layer
from epmq_jax.calib.stats import TaskWeighting, accumulate

_HI = jax.lax.Precision.HIGHEST


def _as_arrays(name: str, xs: Any) -> list[jax.Array]:
    """A sequence of per-task arrays (lists of numbers allowed) as a list of jax arrays."""
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence):
        raise ValueError(f"{name}: expected a list with one array per task, got {type(xs).__name__}")
    out = []
    for t, x in enumerate(xs):
        try:
            out.append(jnp.asarray(x))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}[{t}]: not an array ({type(x).__name__}): {e}") from None
    return out


def _check_layer_inputs(w_merged, expert_kernels, xs, xs_target) -> None:
    if getattr(w_merged, "ndim", None) != 2:
        raise ValueError(f"w_merged: expected a (d_in, d_out) kernel, got shape {getattr(w_merged, 'shape', None)}")
    d_in, d_out = w_merged.shape
    if len(expert_kernels) == 0:
        raise ValueError("expert_kernels is empty: E-PMQ needs at least one expert")
    if len(xs) != len(expert_kernels):
        raise ValueError(f"xs has {len(xs)} tasks but expert_kernels has {len(expert_kernels)}")
    if xs_target is not None and len(xs_target) != len(xs):
        raise ValueError(f"xs_target has {len(xs_target)} tasks, expected {len(xs)} as in xs")
    for t, w in enumerate(expert_kernels):
        if tuple(w.shape) != (d_in, d_out):
            raise ValueError(f"expert_kernels[{t}] has shape {tuple(w.shape)}, expected {(d_in, d_out)}")
    for t, x in enumerate(xs):
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"xs[{t}] has shape {tuple(x.shape)}, expected (n_{t}, {d_in})")
        if xs_target is not None and tuple(xs_target[t].shape) != tuple(x.shape):
            raise ValueError(f"xs_target[{t}] has shape {tuple(xs_target[t].shape)}, expected "
                             f"{tuple(x.shape)} as xs[{t}]")
    named = [("w_merged", w_merged)] + [(f"expert_kernels[{t}]", w) for t, w in enumerate(expert_kernels)]
    named += [(f"xs[{t}]", x) for t, x in enumerate(xs)]
    named += [(f"xs_target[{t}]", x) for t, x in enumerate(xs_target or [])]
    for name, a in named:
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a float array, got dtype {a.dtype}")
    finite = jax.device_get(_all_finite([a for _, a in named]))
    for (name, a), ok in zip(named, finite):
        if not ok:
            raise ValueError(f"{name} (shape {tuple(a.shape)}) contains NaN or inf")


@jax.jit
def _all_finite(arrays: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(a)) for a in arrays]


def epmq_layer(w_merged: jax.Array, expert_kernels: Sequence[jax.Array], xs: Sequence[jax.Array],
               spec, *, xs_target: Sequence[jax.Array] | None = None, lam: float = 0.1,
               anchor: Literal["weight", "output"] = "output",
               task_weights: TaskWeighting = "frobenius", rounding: Rounding = "gptq",
               damp: float = 0.01, damp_center: DampCenter = "merged",
               gptq_damp: float | None = None, return_stats: bool = False):
    """E-PMQ for one linear layer: match the experts, anchored to the merge, then round.

    With H_d = Σ_t ω_t X_tᵀX_t and B_d = Σ_t ω_t X_tᵀ(X̃_t W_t):
    ``weight`` anchor: H = H_d + λcI, B = B_d + λcW_m (c = mean diag H_d);
    ``output`` anchor: H = (1+λ)H_d, B = B_d + λH_d W_m. Then W* = H⁻¹B (Cholesky, damped, see
    :mod:`epmq_jax.calib.solve`) and ``gptq(W*, H)``, ``rtn(W*)`` or W* itself. Inputs that are
    zero on every row keep their merged rows (rounded), and ``stats["n_dead"]`` counts them.

    Args:
      w_merged: merged kernel W_m, ``(d_in, d_out)`` (Flax layout); float32, bfloat16 or
        float16 (the result has its dtype; computation is float32).
      expert_kernels: T expert kernels W_t, each ``(d_in, d_out)``.
      xs: T arrays ``(n_t, d_in)`` (or nested lists): task t's inputs to this layer on the
        quantized path.
      spec: :class:`epmq_jax.quant.QuantSpec` (may be None for ``rounding="none"``).
      xs_target: T arrays of the same shapes as ``xs`` (the target-side inputs X̃_t), or None
        for X̃_t = X_t.
      lam: anchor strength λ, a finite number ≥ 0.
      anchor: ``output`` or ``weight``.
      task_weights: ω_t: ``uniform`` (1), ``tokens`` (1/n_t) or ``frobenius`` (1/‖X_tᵀX_t‖_F).
      rounding: ``gptq``, ``rtn``, ``awq`` or ``none`` (return W* as a float array).
      damp: size δ of the solve's damping (relative to the mean diagonal of H).
      damp_center: ``merged`` (the damping pulls toward W_m) or ``zero`` (plain ridge).
      gptq_damp: GPTQ rounding's δ (default: ``damp``).
      return_stats: also return the solver statistics (see :func:`epmq_jax.calib.solve_layer`).

    Returns:
      A :class:`epmq_jax.quant.QuantizedWeight` (float ``(d_in, d_out)`` W* for ``none``), or
      ``(that, stats)`` with ``return_stats``.

    Raises:
      ValueError: on mismatched shapes or counts, NaN/inf in an input (named), an unknown
        switch, a missing spec, or an H that no damping makes positive definite.
    """
    xs = _as_arrays("xs", xs)
    expert_kernels = _as_arrays("expert_kernels", expert_kernels)
    xs_target = None if xs_target is None else _as_arrays("xs_target", xs_target)
    w_merged = jnp.asarray(w_merged)
    _check_layer_inputs(w_merged, expert_kernels, xs, xs_target)
    objective = Objective(kind="epmq", lam=lam, anchor=anchor,
                          target="merged" if xs_target is None else "expert",
                          task_weights=task_weights)
    check_spec(spec, rounding)
    check_damping(damp, damp_center)
    targets = xs if xs_target is None else xs_target
    tasks = [[(x, jnp.matmul(xt.astype(jnp.float32), w.astype(jnp.float32), precision=_HI))]
             for x, xt, w in zip(xs, targets, expert_kernels)]
    m, _ = accumulate(tasks, task_weights)
    q, stats = solve_layer(objective, m, w_merged, spec, rounding=rounding, damp=damp,
                           damp_center=damp_center, gptq_damp=gptq_damp, path="epmq_layer")
    return (q, stats) if return_stats else q

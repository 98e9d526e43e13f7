"""The one-layer public API: E-PMQ on a single linear layer from its inputs (METHOD.md §4).

Users and outside checks call :func:`epmq_layer`; the sequential driver uses the same pieces
(statistics → objective → solve → rounder) over a whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from epmq_jax.calib.objectives import Objective
from epmq_jax.calib.solve import Rounding, solve_layer
from epmq_jax.calib.stats import TaskWeighting, accumulate

_HI = jax.lax.Precision.HIGHEST


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


def epmq_layer(w_merged: jax.Array, expert_kernels: Sequence[jax.Array], xs: Sequence[jax.Array],
               spec, *, xs_target: Sequence[jax.Array] | None = None, lam: float = 0.1,
               anchor: Literal["weight", "output"] = "output",
               task_weights: TaskWeighting = "frobenius", rounding: Rounding = "gptq",
               damp: float = 0.01):
    """E-PMQ for one linear layer: match the experts, anchored to the merge, then round.

    With H_d = Σ_t ω_t X_tᵀX_t and B_d = Σ_t ω_t X_tᵀ(X̃_t W_t):
    ``weight`` anchor: H = H_d + λcI, B = B_d + λcW_m (c = mean diag H_d);
    ``output`` anchor: H = (1+λ)H_d, B = B_d + λH_d W_m. Then W* = H⁻¹B (Cholesky, damped toward
    W_m, see :mod:`epmq_jax.calib.solve`) and ``gptq(W*, H)``, ``rtn(W*)`` or W* itself.

    Args:
      w_merged: merged kernel W_m, ``(d_in, d_out)`` (Flax layout).
      expert_kernels: T expert kernels W_t, each ``(d_in, d_out)``.
      xs: T arrays ``(n_t, d_in)``: task t's inputs to this layer on the quantized path.
      spec: :class:`epmq_jax.quant.QuantSpec`.
      xs_target: T arrays of the same shapes as ``xs`` (the target-side inputs X̃_t), or None
        for X̃_t = X_t.
      lam: anchor strength λ ≥ 0.
      anchor: ``output`` or ``weight``.
      task_weights: ω_t: ``uniform`` (1), ``tokens`` (1/n_t) or ``frobenius`` (1/‖X_tᵀX_t‖_F).
      rounding: ``gptq``, ``rtn``, or ``none`` (return W* as a float array).
      damp: δ of the solve and of GPTQ (relative to mean diag H).

    Returns:
      A :class:`epmq_jax.quant.QuantizedWeight` (float ``(d_in, d_out)`` W* for ``none``).

    Raises:
      ValueError: on mismatched shapes or counts, or an unknown switch.
    """
    _check_layer_inputs(w_merged, expert_kernels, xs, xs_target)
    objective = Objective(kind="epmq", lam=lam, anchor=anchor,
                          target="merged" if xs_target is None else "expert",
                          task_weights=task_weights)
    targets = xs if xs_target is None else xs_target
    tasks = [[(x, jnp.matmul(xt, w, precision=_HI))]
             for x, xt, w in zip(xs, targets, expert_kernels)]
    m, _ = accumulate(tasks, task_weights)
    q, _ = solve_layer(objective, m, jnp.asarray(w_merged), spec, rounding=rounding, damp=damp,
                       path="epmq_layer")
    return q

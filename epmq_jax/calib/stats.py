"""Per-layer calibration statistics: the Gram matrix H and the cross term B, streamed.

For one linear layer (Flax kernel ``(d_in, d_out)``) and T tasks, the layer objectives of
:mod:`epmq_jax.calib.objectives` need only

    H = Σ_t ω_t X_tᵀX_t          (d_in, d_in)
    B = Σ_t ω_t X_tᵀY_t          (d_in, d_out)

where X_t ``(n_t, d_in)`` are the layer's inputs on task t's data and Y_t ``(n_t, d_out)``
the target outputs. They are accumulated batch by batch (:func:`moments`, :func:`add`) and
task by task (:func:`fold_task`): a task's own sums are completed first, because its weight
ω_t (``frobenius``: 1/‖X_tᵀX_t‖_F) depends on all of its data, then added into the running
total. Memory is two accumulators, independent of T.

Everything is float32 with ``Precision.HIGHEST`` (TPUs would otherwise use bf16 passes).
Data parallelism is a property of the arrays: with ``x`` sharded over its rows across a
``Mesh``, the jitted contractions reduce across devices and give the single-device result.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

TaskWeighting = Literal["uniform", "tokens", "frobenius"]
TASK_WEIGHTINGS = ("uniform", "tokens", "frobenius")
_HI = jax.lax.Precision.HIGHEST


class Moments(NamedTuple):
    """Sums over the rows of a layer's inputs (one batch, one task, or ω-weighted over tasks).

    Attributes:
      h: ``Σ w_i x_iᵀx_i``, float32 ``(d_in, d_in)``.
      b: ``Σ w_i x_iᵀy_i``, float32 ``(d_in, d_out)``, or None when no targets were given.
      yy: ``Σ w_i ‖y_i‖²``, float32 scalar (0 without targets): the constant of the objective.
      n: ``Σ w_i``, the number of (weighted) rows, float32 scalar; never task-weighted.
      abs_sum: ``Σ w_i |x_i|``, float32 ``(d_in,)``, never task-weighted (AWQ's activation
        scale is ``abs_sum / n``).
    """

    h: jax.Array
    b: jax.Array | None
    yy: jax.Array
    n: jax.Array
    abs_sum: jax.Array


def flatten_rows(x: jax.Array, weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Flattens ``x (..., d)`` to rows ``(N, d)`` and ``weight`` (broadcastable to ``x.shape[:-1]``) to ``(N,)``."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if weight is None:
        w = jnp.ones(rows.shape[0], jnp.float32)
    else:
        w = jnp.broadcast_to(weight, x.shape[:-1]).reshape(-1).astype(jnp.float32)
    return rows, w


def moments(x: jax.Array, y: jax.Array | None = None, weight: jax.Array | None = None) -> Moments:
    """The sums of one batch.

    Args:
      x: layer inputs ``(..., d_in)``; all leading axes are rows.
      y: target outputs ``(..., d_out)`` with the same leading axes, or None.
      weight: per-row weights broadcastable to ``x.shape[:-1]`` (0 drops a padding row), or None.

    Returns:
      :class:`Moments` of the batch (``b`` is None when ``y`` is None).
    """
    rows, w = flatten_rows(x, weight)
    h = jnp.matmul((rows * w[:, None]).T, rows, precision=_HI)
    b, yy = (None, jnp.zeros((), jnp.float32)) if y is None else cross_moments(x, y, weight)
    return Moments(h, b, yy, jnp.sum(w), jnp.matmul(w, jnp.abs(rows), precision=_HI))


def cross_moments(x: jax.Array, y: jax.Array, weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(Σ w_i x_iᵀy_i (d_in, d_out), Σ w_i ‖y_i‖²)`` of one batch (shapes as :func:`moments`)."""
    if y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"targets y {y.shape} and inputs x {x.shape} must share leading axes")
    rows, w = flatten_rows(x, weight)
    yr = y.reshape(-1, y.shape[-1]).astype(jnp.float32)
    return jnp.matmul((rows * w[:, None]).T, yr, precision=_HI), jnp.sum(w * jnp.sum(yr * yr, axis=1))


def add(a: Moments | None, b: Moments) -> Moments:
    """Sums two :class:`Moments` (``a`` may be None: the empty sum)."""
    if a is None:
        return b
    if (a.b is None) != (b.b is None):
        raise ValueError("cannot add moments with targets to moments without targets")
    return Moments(a.h + b.h, None if a.b is None else a.b + b.b, a.yy + b.yy, a.n + b.n,
                   a.abs_sum + b.abs_sum)


def task_weight(m: Moments, weighting: TaskWeighting, *, h_sq_sum: jax.Array | None = None
                ) -> jax.Array:
    """ω_t of one task from its complete moments.

    ``uniform``: 1; ``tokens``: 1/n_t; ``frobenius``: 1/‖X_tᵀX_t‖_F. A task whose inputs are
    all zero gets ω_t = 0 (it contributes nothing either way) rather than inf. ``h_sq_sum``:
    ΣH²ᵢⱼ when ``m.h`` holds only part of H (split over devices), else computed from ``m.h``.
    """
    if weighting == "uniform":
        return jnp.ones((), jnp.float32)
    if weighting == "tokens":
        denom = m.n
    elif weighting == "frobenius":
        denom = jnp.sqrt(jnp.sum(m.h * m.h) if h_sq_sum is None else h_sq_sum)
    else:
        raise ValueError(f"task_weights must be one of {TASK_WEIGHTINGS}, got {weighting!r}")
    return jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)


def fold_task(total: Moments | None, task: Moments, weighting: TaskWeighting, *,
              h_sq_sum: jax.Array | None = None) -> tuple[Moments, jax.Array]:
    """Adds one task's complete moments, scaled by its ω_t, into the running total.

    Args:
      total: the ω-weighted sum over the tasks folded so far, or None.
      task: the task's own (unweighted) moments over all of its batches.
      weighting: ``uniform``, ``tokens`` or ``frobenius``.
      h_sq_sum: see :func:`task_weight`.

    Returns:
      ``(new_total, ω_t)``. ``n`` and ``abs_sum`` are summed without ω_t.
    """
    w = task_weight(task, weighting, h_sq_sum=h_sq_sum)
    scaled = Moments(w * task.h, None if task.b is None else w * task.b, w * task.yy, task.n,
                     task.abs_sum)
    return add(total, scaled), w


def accumulate(tasks, weighting: TaskWeighting = "uniform") -> tuple[Moments, list[jax.Array]]:
    """Streams H and B over tasks and batches.

    Args:
      tasks: an iterable over tasks, each an iterable of batches ``(x, y)`` or
        ``(x, y, weight)`` (``y`` may be None; shapes as in :func:`moments`).
      weighting: task weights ω_t, see :func:`task_weight`.

    Returns:
      ``(moments, [ω_t, ...])`` with ``moments.h = Σ_t ω_t X_tᵀX_t`` and
      ``moments.b = Σ_t ω_t X_tᵀY_t``.
    """
    if weighting not in TASK_WEIGHTINGS:
        raise ValueError(f"task_weights must be one of {TASK_WEIGHTINGS}, got {weighting!r}")
    total, omegas = None, []
    for batches in tasks:
        task = None
        for batch in batches:
            task = add(task, _moments_jit(*batch))
        if task is None:
            raise ValueError("a task has no calibration batches")
        total, w = _fold_jit(total, task, weighting)
        omegas.append(w)
    if total is None:
        raise ValueError("no tasks to accumulate statistics over")
    return total, omegas


_moments_jit = jax.jit(moments)
_fold_jit = jax.jit(fold_task, static_argnums=2)

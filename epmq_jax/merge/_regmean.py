"""RegMean merging (Jin et al., 2023) from per-layer Gram matrices (METHOD.md §2).

For every linear kernel with Gram matrices G_t = X_tᵀX_t (X_t: the layer's inputs in expert
t on task t's data), the merge is the least-squares fit to all experts' outputs,

    W = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t,     G̃_t = α·G_t + (1 − α)·diag(G_t),

with α the reference's ``reduce_non_diagonal_ratio`` (α = 1: plain RegMean). It is the λ = 0
relaxation of E-PMQ and uses the same solve (:func:`epmq_jax.calib.solve`). The statistics
come from the caller (each expert's own forward pass on its own data); the calibration driver's
``Objective(kind="regmean")`` is a different, sequential variant on the merged path.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from epmq_jax._tree import PathFilter
from epmq_jax.merge._validate import check_expert_list, check_number, compute_dtype, flatten_inputs

PyTree = Any
_HI = jax.lax.Precision.HIGHEST


def _reduce_non_diagonal(g: jax.Array, alpha: float) -> jax.Array:
    return alpha * g + (1.0 - alpha) * jnp.diag(jnp.diag(g))


def regmean(base: PyTree, experts: Sequence[PyTree], grams: Sequence[Mapping[str, jax.Array]], *,
            filter: PathFilter = None, reduce_non_diagonal: float = 1.0, damp: float = 0.0,
            validate: bool = True) -> PyTree:
    """RegMean: per-layer least-squares merge of the experts' kernels.

    Args:
      base: θ₀; leaves outside ``filter`` are copied from it.
      experts: T expert trees, same structure, shapes and dtypes as ``base``.
      grams: T mappings ``{leaf path: G_t (d_in, d_in)}``, one per expert; the paths
        (``"a/b/kernel"``) name Flax kernels ``(d_in, d_out)``. Every expert must give the
        same paths.
      filter: which leaves are merged (regex / pattern / predicate on the path, None = all).
        Selected leaves with Gram matrices get RegMean; the other selected leaves the simple
        average of the experts (as the reference does for non-linear parameters).
      reduce_non_diagonal: α ∈ [0, 1], the scale of the off-diagonal Gram entries.
      damp: relative damping δ of the solve (δ·mean diag, pulling toward the experts'
        average; raised automatically if the sum is singular).
      validate: check shapes, dtypes and NaN/inf eagerly.

    Returns:
      The merged tree.

    Raises:
      ValueError: no experts; ``grams`` not one mapping per expert or with differing paths; a
        Gram path that is not a selected 2-D leaf of ``base``; a Gram of the wrong shape, with
        NaN/inf or a negative diagonal entry (not a Gram matrix), or whose sum no damping makes
        positive definite (the leaf is named); ``reduce_non_diagonal`` or ``damp`` out of range.

    Warns:
      UserWarning: a leaf's damping had to be raised more than tenfold (an indefinite sum).
    """
    from epmq_jax.calib.solve import solve

    check_expert_list(experts)
    if len(grams) != len(experts):
        raise ValueError(f"grams has {len(grams)} entries, expected one mapping per expert ({len(experts)}).")
    if not 0.0 <= reduce_non_diagonal <= 1.0:
        raise ValueError(f"reduce_non_diagonal must be in [0, 1], got {reduce_non_diagonal}")
    check_number("damp", damp, low=0.0)
    keys = set(grams[0])
    for t, g in enumerate(grams):
        if set(g) != keys:
            raise ValueError(f"grams[{t}] has paths {sorted(set(g) ^ keys)[:1]} that grams[0] "
                             "does not share; every expert needs the same Gram paths.")
    flat = flatten_inputs(base, experts, filter=filter, validate=validate)
    index = {p: i for i, p in enumerate(flat.paths)}
    for p in sorted(keys):
        i = index.get(p)
        if i is None or not flat.selected[i]:
            raise ValueError(f"Gram path '{p}' is not a merged leaf of base (not in the tree or "
                             "excluded by the filter / dtype).")
        shape = jnp.shape(flat.ref[i])
        if len(shape) != 2:
            raise ValueError(f"Leaf '{p}': RegMean needs a 2-D kernel (d_in, d_out), got shape {shape}.")
        for t, g in enumerate(grams):
            if jnp.shape(g[p]) != (shape[0], shape[0]):
                raise ValueError(f"Leaf '{p}': grams[{t}] has shape {jnp.shape(g[p])}, expected "
                                 f"{(shape[0], shape[0])} for a kernel of shape {shape}.")
    if validate:
        _check_grams(sorted(keys), grams)
    merged, pending = [], []
    for i, (p, ref) in enumerate(zip(flat.paths, flat.ref)):
        if not flat.selected[i]:
            continue
        ct = compute_dtype(ref)
        ws = [jnp.asarray(e[i], ct) for e in flat.experts]
        avg = sum(ws) / len(ws)
        if p in keys:
            gs = [_reduce_non_diagonal(jnp.asarray(g[p], jnp.float32), reduce_non_diagonal) for g in grams]
            b = sum(jnp.matmul(g, w, precision=_HI) for g, w in zip(gs, ws))
            avg, info = solve(sum(gs), b, avg, damp)
            pending.append((p, info))
        merged.append(avg.astype(jnp.asarray(ref).dtype))
    for (p, _), info in zip(pending, jax.device_get([info for _, info in pending])):
        if not bool(info["ok"]):
            raise ValueError(f"Leaf '{p}': the sum of the Gram matrices is not positive definite "
                             f"even with damping {float(info['damp']):.3g} x mean diag "
                             "(indefinite or non-finite Grams?).")
        if float(info["damp"]) > 10.0 * max(float(damp), 1e-4):
            warnings.warn(f"Leaf '{p}': the sum of the Gram matrices is not positive definite in "
                          f"float32; damping was raised from {float(damp):.3g} to "
                          f"{float(info['damp']):.3g} x mean diag.", stacklevel=2)
    return flat.unflatten(merged)


@jax.jit
def _gram_flags(gs: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    return [(jnp.all(jnp.isfinite(g)), jnp.all(jnp.diag(g) >= 0)) for g in gs]


def _check_grams(paths: list[str], grams: Sequence[Mapping[str, jax.Array]]) -> None:
    """NaN/inf or a negative diagonal entry in any Gram matrix -> ValueError naming leaf and expert."""
    named = [(p, t, g[p]) for p in paths for t, g in enumerate(grams)]
    flags = jax.device_get(_gram_flags([jnp.asarray(g) for _, _, g in named]))
    for (p, t, g), (finite, diag_ok) in zip(named, flags):
        if not finite:
            raise ValueError(f"Leaf '{p}': grams[{t}] (shape {jnp.shape(g)}) contains NaN or inf.")
        if not diag_ok:
            raise ValueError(f"Leaf '{p}': grams[{t}] has a negative diagonal entry: not a Gram "
                             "matrix XᵀX (which is positive semi-definite).")

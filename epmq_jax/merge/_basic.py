"""Task vectors, Task Arithmetic and simple averaging (METHOD.md §2).

All functions are pure maps over pytrees (linen param dicts, ``nnx.State``, nested dicts) and
can be traced by ``jax.jit`` (pass the keyword settings with ``functools.partial``).
Arithmetic runs in at least float32 and results are cast back to each leaf's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from epmq_jax._tree import PathFilter
from epmq_jax.merge._validate import (
    FlatInputs,
    check_expert_list,
    check_number,
    compute_dtype,
    flatten_inputs,
)

PyTree = Any
Scaling = float | Sequence[float] | jax.Array


def per_expert_scaling(scaling: Scaling, n_experts: int) -> jax.Array:
    """Returns one scaling factor per expert, ``(T,)``, from a scalar or a length-T sequence.

    Raises:
      ValueError: a NaN or infinite factor, or a sequence of the wrong length.
    """
    check_number("scaling", scaling)
    if isinstance(scaling, Sequence) or (hasattr(scaling, "ndim") and scaling.ndim == 1):
        if len(scaling) != n_experts:
            raise ValueError(f"scaling has {len(scaling)} entries, expected one per expert "
                             f"({n_experts}).")
        return jnp.asarray(scaling, jnp.float32)
    return jnp.full((n_experts,), scaling, jnp.float32)


def selected_leaves(flat: FlatInputs) -> tuple[list[Any], list[list[Any]]]:
    """``(bases, experts)``: the merged leaves of the reference and of each expert, in order."""
    bases = [b for b, s in zip(flat.ref, flat.selected) if s]
    experts = [[e for e, s in zip(leaves, flat.selected) if s] for leaves in flat.experts]
    return bases, experts


def task_vectors(bases: Sequence[Any], experts: Sequence[Sequence[Any]]) -> list[list[jax.Array]]:
    """``tvs[t][j]`` = ``experts[t][j] - bases[j]`` in compute dtype (>= float32)."""
    return [[jnp.asarray(e, compute_dtype(b)) - jnp.asarray(b, compute_dtype(b))
             for b, e in zip(bases, leaves)] for leaves in experts]


def add_deltas(bases: Sequence[Any], deltas: Sequence[jax.Array]) -> list[jax.Array]:
    """``base + delta`` per leaf, computed in compute dtype and cast back to the base dtype."""
    return [(jnp.asarray(b, compute_dtype(b)) + d).astype(jnp.asarray(b).dtype)
            for b, d in zip(bases, deltas)]


def weighted_sum(tvs: Sequence[Sequence[jax.Array]], lam: jax.Array) -> list[jax.Array]:
    """Σ_t λ_t τ_t leaf by leaf (``tvs[t][j]``: leaf ``j`` of task vector ``t``; ``lam``: (T,))."""
    return [sum(lam[t].astype(tvs[t][j].dtype) * tvs[t][j] for t in range(len(tvs)))
            for j in range(len(tvs[0]))]


@jax.jit
def _task_arithmetic_leaf(base: jax.Array, experts: tuple[jax.Array, ...],
                          lam: jax.Array) -> jax.Array:
    # One leaf at a time: peak memory is the inputs plus a few leaf-sized temporaries.
    return add_deltas([base], weighted_sum(task_vectors([base], [[e] for e in experts]), lam))[0]


@jax.jit
def _mean_leaf(leaves: tuple[jax.Array, ...]) -> jax.Array:
    ct = compute_dtype(leaves[0])
    return (sum(jnp.asarray(x, ct) for x in leaves) / len(leaves)).astype(leaves[0].dtype)


def task_vector(base: PyTree, expert: PyTree, *, validate: bool = True) -> PyTree:
    """The task vector τ = expert − base, leaf by leaf.

    Args:
      base: the pretrained parameters θ₀ (any pytree of arrays).
      expert: the fine-tuned parameters θ_t, same structure, shapes and dtypes as ``base``.
      validate: run the shape/dtype/NaN checks (see :func:`task_arithmetic`).

    Returns:
      A tree with ``base``'s structure; floating-point leaves hold ``expert - base`` (computed in
      at least float32, cast to the leaf dtype); other leaves (integer counters, ...) are copied
      from ``base``, as in every merge function.
    """
    flat = flatten_inputs(base, [expert], validate=validate)
    bases, experts = selected_leaves(flat)
    return flat.unflatten([d.astype(jnp.asarray(b).dtype)
                           for b, d in zip(bases, task_vectors(bases, experts)[0])])


def task_arithmetic(base: PyTree, experts: Sequence[PyTree], *, scaling: Scaling = 0.3,
                    filter: PathFilter = None, validate: bool = True) -> PyTree:
    """Task Arithmetic: θ_m = θ₀ + λ Σ_t (θ_t − θ₀) (Ilharco et al., 2023).

    Args:
      base: the pretrained parameters θ₀.
      experts: the fine-tuned trees θ_1..θ_T, each with ``base``'s structure, shapes and dtypes
        (container classes may differ, e.g. ``nnx.State`` vs dict, if the leaf paths agree).
      scaling: λ, a scalar or one value per expert.
      filter: which leaves are merged: a regex matched with ``re.search`` against the leaf path
        (``"encoder/layers/0/mlp/fc1/kernel"``, the same for an ``nnx.State``), a
        compiled pattern, or a predicate on the path. None merges every floating-point leaf.
        **Every leaf that is not merged is taken from ``base``** (heads, integer counters).
      validate: check the inputs eagerly (structure, shapes, dtypes, NaN/inf). Turn off only in
        hot loops over inputs already checked. Inside ``jax.jit`` the NaN/inf check is skipped.

    Returns:
      The merged tree, with ``base``'s structure and dtypes.

    Raises:
      ValueError: no experts; an expert's structure, shape or dtype differs from ``base`` (the
        first offending leaf path and both values are named); NaN or inf in an input; a NaN or
        infinite ``scaling`` or a per-expert one of the wrong length; a ``filter`` that
        selects no floating-point leaf.
    """
    check_expert_list(experts)
    flat = flatten_inputs(base, experts, filter=filter, validate=validate)
    lam = per_expert_scaling(scaling, len(experts))
    bases, leaves = selected_leaves(flat)
    return flat.unflatten([_task_arithmetic_leaf(b, tuple(e[j] for e in leaves), lam)
                           for j, b in enumerate(bases)])


def average(experts: Sequence[PyTree], *, filter: PathFilter = None,
            validate: bool = True) -> PyTree:
    """Simple averaging: θ_m = (1/T) Σ_t θ_t.

    There is no base argument: **leaves that are not merged are taken from ``experts[0]``**
    (and the output has ``experts[0]``'s tree structure). ``experts[1:]`` are checked against
    ``experts[0]``.

    Args:
      experts: T ≥ 1 trees with the same structure, shapes and dtypes.
      filter: path filter as in :func:`task_arithmetic`; None averages every float leaf.
      validate: run the input checks (see :func:`task_arithmetic`).

    Returns:
      The averaged tree, with ``experts[0]``'s structure and dtypes.

    Raises:
      ValueError: as :func:`task_arithmetic`, with ``experts[0]`` as the reference.
    """
    check_expert_list(experts)
    flat = flatten_inputs(experts[0], list(experts[1:]), filter=filter, validate=validate,
                          ref_name="experts[0]", expert_offset=1)
    firsts, rest = selected_leaves(flat)
    return flat.unflatten([_mean_leaf((x, *(e[j] for e in rest))) for j, x in enumerate(firsts)])

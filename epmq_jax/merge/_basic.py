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
from epmq_jax.merge._validate import check_expert_list, compute_dtype, flatten_inputs

PyTree = Any
Scaling = float | Sequence[float] | jax.Array


def per_expert_scaling(scaling: Scaling, n_experts: int) -> list[Any]:
    """Returns one scaling factor per expert from a scalar or a length-``n_experts`` sequence."""
    if isinstance(scaling, Sequence) or (hasattr(scaling, "ndim") and scaling.ndim == 1):
        if len(scaling) != n_experts:
            raise ValueError(f"scaling has {len(scaling)} entries, expected one per expert "
                             f"({n_experts}).")
        return [scaling[t] for t in range(n_experts)]
    return [scaling] * n_experts


def task_vector_leaves(flat: Any) -> list[list[jax.Array]]:
    """``tvs[t][j]`` = expert ``t`` minus base on the ``j``-th selected leaf, in compute dtype."""
    out = []
    for leaves in flat.experts:
        out.append([jnp.asarray(e, compute_dtype(b)) - jnp.asarray(b, compute_dtype(b))
                    for b, e, s in zip(flat.ref, leaves, flat.selected) if s])
    return out


def weighted_sum(tvs: Sequence[Sequence[jax.Array]], lam: Sequence[Any]) -> list[jax.Array]:
    """Σ_t λ_t τ_t leaf by leaf (``tvs[t][j]``: leaf ``j`` of task vector ``t``)."""
    return [sum(lam[t] * tvs[t][j] for t in range(len(tvs))) for j in range(len(tvs[0]))]


def add_to_base(flat: Any, deltas: Sequence[jax.Array]) -> PyTree:
    """Builds ``base + delta`` on the selected leaves (cast to base dtype), base elsewhere."""
    bases = [b for b, s in zip(flat.ref, flat.selected) if s]
    merged = [(jnp.asarray(b, compute_dtype(b)) + d).astype(jnp.asarray(b).dtype)
              for b, d in zip(bases, deltas)]
    return flat.unflatten(merged)


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
    bases = [b for b, s in zip(flat.ref, flat.selected) if s]
    return flat.unflatten([d.astype(jnp.asarray(b).dtype)
                           for b, d in zip(bases, task_vector_leaves(flat)[0])])


def task_arithmetic(base: PyTree, experts: Sequence[PyTree], *, scaling: Scaling = 0.3,
                    filter: PathFilter = None, validate: bool = True) -> PyTree:
    """Task Arithmetic: θ_m = θ₀ + λ Σ_t (θ_t − θ₀) (Ilharco et al., 2023).

    Args:
      base: the pretrained parameters θ₀.
      experts: the fine-tuned trees θ_1..θ_T, each with ``base``'s structure, shapes and dtypes
        (container classes may differ, e.g. ``nnx.State`` vs dict, if the leaf paths agree).
      scaling: λ, a scalar or one value per expert.
      filter: which leaves are merged: a regex matched with ``re.search`` against the leaf path
        (``"encoder/layers/0/mlp/fc1/kernel"``; for ``nnx.State`` paths end in ``"/value"``), a
        compiled pattern, or a predicate on the path. None merges every floating-point leaf.
        **Every leaf that is not merged is taken from ``base``** (heads, integer counters).
      validate: check the inputs eagerly (structure, shapes, dtypes, NaN/inf). Turn off only in
        hot loops over inputs already checked. Inside ``jax.jit`` the NaN/inf check is skipped.

    Returns:
      The merged tree, with ``base``'s structure and dtypes.

    Raises:
      ValueError: no experts; an expert's structure, shape or dtype differs from ``base`` (the
        first offending leaf path and both values are named); NaN or inf in an input; a
        per-expert ``scaling`` of the wrong length.
    """
    check_expert_list(experts)
    flat = flatten_inputs(base, experts, filter=filter, validate=validate)
    return add_to_base(flat, weighted_sum(task_vector_leaves(flat),
                                          per_expert_scaling(scaling, len(experts))))


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
    n = len(experts)
    merged = []
    for i, (r, s) in enumerate(zip(flat.ref, flat.selected)):
        if s:
            ct = compute_dtype(r)
            total = sum((jnp.asarray(leaves[i], ct) for leaves in flat.experts),
                        jnp.asarray(r, ct))
            merged.append((total / n).astype(jnp.asarray(r).dtype))
    return flat.unflatten(merged)

"""DARE (Yu et al., 2024): randomly drop task-vector entries, rescale, then merge (METHOD.md §2).

Each entry of each task vector is dropped independently with probability ``drop``; survivors
are multiplied by 1/(1 − drop) so the expected task vector is unchanged. The sparsified task
vectors are then merged by Task Arithmetic or TIES (as FusionBench's ``DareTiesMerging``: the
TIES trim then runs on the DARE-sparsified vectors; pass ``density=1.0`` for sign election and
disjoint merge only).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from epmq_jax._tree import PathFilter
from epmq_jax.merge._basic import (
    PyTree,
    add_deltas,
    per_expert_scaling,
    selected_leaves,
    task_vectors,
    weighted_sum,
)
from epmq_jax.merge._ties import check_ties_args, ties_deltas
from epmq_jax.merge._validate import check_expert_list, check_number, flatten_inputs


@functools.partial(jax.jit, static_argnames="rescale")
def drop_and_rescale(key: jax.Array, tvs: Sequence[Sequence[jax.Array]], drop: float | jax.Array,
                     rescale: bool) -> list[list[jax.Array]]:
    """Drops each task-vector entry with probability ``drop``; rescales survivors by 1/(1 − drop).

    Args:
      key: PRNG key. Task vector ``t`` keeps the entries where
        ``jax.random.bernoulli(fold_in(key, t), 1 - drop, (n,))`` is True, ``n`` being its
        number of entries over all leaves, laid out leaf after leaf in ``tvs[t]``'s order (one
        random draw per expert: cheap to compile for trees with many leaves).
      tvs: ``tvs[t][j]``, leaf ``j`` of task vector ``t``.
      drop: drop probability p.
      rescale: divide survivors by 1 − p.

    Returns:
      The sparsified task vectors, same layout as ``tvs``.
    """
    sizes = [int(x.size) for x in tvs[0]]
    keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(len(tvs)))
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - drop, (sum(sizes),)))(keys)
    out = []
    for t, tv in enumerate(tvs):
        masks = jnp.split(keep[t], np.cumsum(sizes)[:-1].tolist())
        leaves = [jnp.where(m.reshape(x.shape), x, jnp.zeros_like(x)) for m, x in zip(masks, tv)]
        out.append([x / (1.0 - drop) for x in leaves] if rescale else leaves)
    return out


def dare(base: PyTree, experts: Sequence[PyTree], *, key: jax.Array, drop: float = 0.9,
         rescale: bool = True, merge: Literal["task_arithmetic", "ties"] = "task_arithmetic",
         scaling: float | Sequence[float] = 0.3, filter: PathFilter = None,
         validate: bool = True, **merge_kwargs: Any) -> PyTree:
    """DARE sparsification of every task vector, then Task Arithmetic or TIES.

    Args:
      base: the pretrained parameters θ₀.
      experts: the fine-tuned trees θ_1..θ_T (same structure, shapes, dtypes as ``base``).
      key: a ``jax.random`` key; the result is a deterministic function of it (expert ``t``
        draws from ``fold_in(key, t)``, see :func:`drop_and_rescale`). Which entries are dropped
        depends on the set of merged leaves, so changing ``filter`` changes the draws.
      drop: probability p of dropping an entry, in [0, 1).
      rescale: multiply surviving entries by 1/(1 − p) (keeps the expectation).
      merge: ``"task_arithmetic"`` or ``"ties"``.
      scaling: λ (per expert allowed for task arithmetic).
      filter: path filter (see ``task_arithmetic``); leaves not merged come from ``base``.
      validate: run the input checks (see ``task_arithmetic``).
      **merge_kwargs: TIES settings ``density``, ``trim``, ``merge_func`` (``merge="ties"`` only).

    Returns:
      The merged tree, with ``base``'s structure and dtypes.

    Raises:
      ValueError: bad inputs as in ``task_arithmetic``; ``drop`` outside [0, 1); unknown
        ``merge``; TIES settings given with ``merge="task_arithmetic"``, or invalid ones.
    """
    check_number("drop", drop)
    if not 0.0 <= float(drop) < 1.0:
        raise ValueError(f"drop is a probability in [0, 1), got {drop}.")
    ties_kw: dict[str, Any] = {}
    if merge == "ties":
        ties_kw = {"density": 0.2, "trim": "global", "merge_func": "mean"}
        unknown = set(merge_kwargs) - set(ties_kw)
        if unknown:
            raise ValueError(f"Unknown TIES settings {sorted(unknown)}; expected a subset of "
                             f"{sorted(ties_kw)}.")
        ties_kw.update(merge_kwargs)
        check_ties_args(**ties_kw)
        ties_kw["density"] = float(ties_kw["density"])
    elif merge == "task_arithmetic":
        if merge_kwargs:
            raise ValueError(f"merge='task_arithmetic' takes no extra settings, got "
                             f"{sorted(merge_kwargs)}.")
    else:
        raise ValueError(f"merge must be 'task_arithmetic' or 'ties', got {merge!r}.")
    check_expert_list(experts)
    flat = flatten_inputs(base, experts, filter=filter, validate=validate)
    bases, leaves = selected_leaves(flat)
    if merge == "ties":
        if not isinstance(scaling, (int, float)) and getattr(scaling, "ndim", 0) != 0:
            raise ValueError("merge='ties' takes one scalar scaling, not one per expert.")
        check_number("scaling", scaling)
        lam = jnp.asarray(scaling, jnp.float32)
    else:
        lam = per_expert_scaling(scaling, len(experts))
    return flat.unflatten(_dare_merge(bases, leaves, key, drop, lam, rescale=rescale,
                                      ties_kw=tuple(sorted(ties_kw.items())) if ties_kw else None))


@functools.partial(jax.jit, static_argnames=("rescale", "ties_kw"))
def _dare_merge(bases: list[jax.Array], experts: list[list[jax.Array]], key: jax.Array,
                drop: float, lam: jax.Array, *, rescale: bool,
                ties_kw: tuple[tuple[str, Any], ...] | None) -> list[jax.Array]:
    tvs = drop_and_rescale(key, task_vectors(bases, experts), drop, rescale)
    if ties_kw is not None:
        return add_deltas(bases, [lam * d for d in ties_deltas(tvs, **dict(ties_kw))])
    return add_deltas(bases, weighted_sum(tvs, lam))

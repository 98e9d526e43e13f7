"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge (METHOD.md §2).

Follows the reference implementation (``ties_minimal.ipynb``; FusionBench's
``ties_merging_utils``) step by step:

1. **Trim.** For each task vector, let ``d`` be its number of entries (over all merged leaves
   for ``trim="global"``, per leaf for ``trim="per_tensor"``) and ``k = d - int(d * density)``.
   Entries whose magnitude is ``>=`` the k-th smallest magnitude are kept, the rest zeroed. Like
   the reference, this keeps ``int(d * density) + 1`` entries when magnitudes are distinct (and
   all tied ones); ``density >= 1`` keeps everything.
2. **Elect.** γ = sign(Σ_t trimmed τ_t) per entry; entries where that is 0 get the majority
   sign sign(Σ γ), summed over the same scope as the trim (all merged leaves, or the leaf).
3. **Disjoint merge.** Per entry, keep the trimmed τ_t that are > 0 where γ > 0, < 0
   otherwise; combine them with ``mean`` (sum / number of kept non-zeros, at least 1), ``sum``,
   or ``max`` (largest kept magnitude times γ).

Then θ_m = θ₀ + λ τ_m. The k-th smallest magnitude is found by bisection on the float bit
pattern (exact, no sort, one pass over the data per bit), so the global trim is jit-able and
needs no concatenated copy of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from epmq_jax._tree import PathFilter
from epmq_jax.merge._basic import PyTree, add_deltas, selected_leaves, task_vectors
from epmq_jax.merge._validate import check_expert_list, check_number, flatten_inputs

Trim = Literal["global", "per_tensor"]
MergeFunc = Literal["mean", "sum", "max"]
_TRIMS = ("global", "per_tensor")
_MERGE_FUNCS = ("mean", "sum", "max")


def check_ties_args(density: float, trim: str, merge_func: str) -> None:
    """Raises ValueError for a density outside (0, 1] or an unknown trim / merge_func."""
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density is the fraction of entries kept and must be in (0, 1], "
                         f"got {density}.")
    if trim not in _TRIMS:
        raise ValueError(f"trim must be one of {_TRIMS}, got {trim!r}.")
    if merge_func not in _MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {_MERGE_FUNCS}, got {merge_func!r}.")


def _abs_bits(x: jax.Array) -> jax.Array:
    """|x| as a signed integer whose order equals the order of |x| (IEEE floats, no NaN)."""
    itype = {4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(jnp.abs(x), itype)


def _kth_smallest_bits(bits: Sequence[jax.Array], groups: Sequence[int],
                       k: Sequence[int]) -> jax.Array:
    """Bit patterns of the k-th smallest (1-indexed) magnitudes, per expert and group.

    Args:
      bits: ``bits[j]`` of shape ``(T, *leaf_j)``: :func:`_abs_bits` of leaf ``j`` of T vectors.
      groups: ``groups[j]`` is the group (0..G-1) that leaf ``j`` belongs to.
      k: ``k[g]``, the rank sought in group ``g``, over all entries of its leaves (per expert).

    Returns:
      ``(T, G)`` integer bit patterns, found by bisection: one counting pass per bit.
    """
    itype = bits[0].dtype
    count_t = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    sizes = np.zeros(len(k), np.int64)
    for b, g in zip(bits, groups):
        sizes[g] += b[0].size
    if sizes.max() > np.iinfo(count_t).max:
        raise ValueError(f"TIES trim over {sizes.max()} entries needs 64-bit counts: enable "
                         f"jax_enable_x64 or use trim='per_tensor'.")
    ftype = np.float32 if np.dtype(itype).itemsize == 4 else np.float64
    hi0 = int(np.array(np.inf, ftype).view(np.dtype(itype)))  # bits of +inf bound every |x|
    n_t, n_g = bits[0].shape[0], len(k)
    kk = jnp.asarray(np.asarray(k), count_t)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        per_group = [jnp.zeros((n_t,), count_t)] * n_g
        for b, g in zip(bits, groups):
            below = b <= mid[:, g].reshape((n_t,) + (1,) * (b.ndim - 1))
            per_group[g] = per_group[g] + jnp.sum(below.reshape(n_t, -1), axis=1, dtype=count_t)
        ok = jnp.stack(per_group, axis=1) >= kk
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    init = (jnp.zeros((n_t, n_g), itype), jnp.full((n_t, n_g), hi0, itype))
    lo, _ = jax.lax.fori_loop(0, hi0.bit_length(), body, init)
    return lo


def _trim(stacks: list[jax.Array], density: float, trim: str) -> list[jax.Array]:
    """Zeroes all but the largest-magnitude entries of each task vector (see module doc).

    ``stacks[j]`` has shape ``(T, *leaf_j)``: leaf ``j`` of the T task vectors.
    """
    if density >= 1.0:
        return stacks
    groups = [0] * len(stacks) if trim == "global" else list(range(len(stacks)))
    sizes = np.zeros(max(groups) + 1, np.int64)
    for st, g in zip(stacks, groups):
        sizes[g] += st[0].size
    k = [int(d) - int(int(d) * density) for d in sizes]
    ct = jnp.result_type(*stacks)  # one bit layout per group, even with mixed f32/f64 leaves
    bits = [_abs_bits(st.astype(ct)) for st in stacks]
    thr = _kth_smallest_bits(bits, groups, k)
    return [keep_above(st, b, thr[:, g]) for st, b, g in zip(stacks, bits, groups)]


def keep_above(stack: jax.Array, bits: jax.Array, thr: jax.Array) -> jax.Array:
    """``stack (T, ...)`` with the entries whose magnitude bits (:func:`_abs_bits`) are below
    ``thr[t]`` zeroed (the trim, given each expert's threshold ``thr (T,)``)."""
    return jnp.where(bits >= thr.reshape((-1,) + (1,) * (bits.ndim - 1)), stack,
                     jnp.zeros_like(stack))


def disjoint_merge(stack: jax.Array, majority: jax.Array, merge_func: str) -> jax.Array:
    """Elect and disjoint merge of one leaf's trimmed task vectors ``stack (T, ...)``.

    γ = sign(Σ_t stack_t), ``majority`` where that is 0; the entries agreeing with γ are
    combined by ``merge_func`` (see the module doc).
    """
    s = jnp.sign(jnp.sum(stack, axis=0))
    s = jnp.where(s == 0, majority.astype(s.dtype), s)
    sel = jnp.where(jnp.where(s > 0, stack > 0, stack < 0), stack, jnp.zeros_like(stack))
    if merge_func == "mean":
        return jnp.sum(sel, 0) / jnp.maximum(jnp.sum(sel != 0, 0), 1).astype(stack.dtype)
    if merge_func == "sum":
        return jnp.sum(sel, 0)
    return jnp.max(jnp.abs(sel), 0) * s


def sign_votes(stack: jax.Array) -> jax.Array:
    """Σ over entries of sign(Σ_t stack_t): the vote that sets the majority sign (int32)."""
    return jnp.sum(jnp.sign(jnp.sum(stack, axis=0)).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("density", "trim", "merge_func"))
def ties_deltas(tvs: Sequence[Sequence[jax.Array]], *, density: float, trim: str,
                merge_func: str) -> list[jax.Array]:
    """The merged TIES task vector τ_m from per-expert task-vector leaves.

    Args:
      tvs: ``tvs[t][j]`` is leaf ``j`` of task vector ``t`` (all experts have the same leaves).
      density, trim, merge_func: see :func:`ties_merging`.

    Returns:
      ``τ_m`` leaf by leaf (not yet scaled by λ).
    """
    stacks = _trim([jnp.stack([tv[j] for tv in tvs]) for j in range(len(tvs[0]))],
                   density, trim)
    votes = [sign_votes(st) for st in stacks]
    if trim == "global":
        majority = [jnp.sign(sum(votes, jnp.zeros((), jnp.int32)))] * len(stacks)
    else:
        majority = [jnp.sign(v) for v in votes]
    return [disjoint_merge(st, m, merge_func) for st, m in zip(stacks, majority)]


@functools.partial(jax.jit, static_argnames=("density", "trim", "merge_func"))
def _ties_merge(bases: list[jax.Array], experts: list[list[jax.Array]], scaling: float, *,
                density: float, trim: str, merge_func: str) -> list[jax.Array]:
    # Task vectors are formed inside the jit, so XLA need not keep T eager copies of the model.
    tau = ties_deltas(task_vectors(bases, experts), density=density, trim=trim,
                      merge_func=merge_func)
    return add_deltas(bases, [scaling * d for d in tau])


def ties_merging(base: PyTree, experts: Sequence[PyTree], *, scaling: float = 0.3,
                 density: float = 0.2, trim: Trim = "global", merge_func: MergeFunc = "mean",
                 filter: PathFilter = None, validate: bool = True) -> PyTree:
    """TIES-Merging: θ_m = θ₀ + λ · disjoint_merge(elect(trim(τ_1..τ_T))).

    Args:
      base: the pretrained parameters θ₀ (any pytree of arrays).
      experts: the fine-tuned trees θ_1..θ_T (same structure, shapes, dtypes as ``base``).
      scaling: λ, applied to the merged task vector.
      density: fraction of each task vector's entries kept by the trim, in (0, 1].
      trim: ``"global"``: top entries over the task vector's whole flattened set of merged
        leaves (reference code, FusionBench); ``"per_tensor"``: per leaf (mergekit). The
        majority sign for zero-sum entries is taken over the same scope.
      merge_func: ``"mean"``, ``"sum"`` or ``"max"`` (the reference's disjoint merge).
      filter: path filter (see :func:`task_arithmetic`); leaves not merged come from ``base``.
        The global trim runs over the merged leaves only.
      validate: run the input checks (see :func:`task_arithmetic`).

    Returns:
      The merged tree, with ``base``'s structure and dtypes.

    Raises:
      ValueError: bad inputs as in :func:`task_arithmetic`; density outside (0, 1]; a NaN or
        infinite ``scaling``; unknown ``trim`` or ``merge_func``.
    """
    check_ties_args(density, trim, merge_func)
    check_number("scaling", scaling)
    check_expert_list(experts)
    flat = flatten_inputs(base, experts, filter=filter, validate=validate)
    bases, leaves = selected_leaves(flat)
    return flat.unflatten(_ties_merge(bases, leaves, scaling, density=float(density), trim=trim,
                                      merge_func=merge_func))


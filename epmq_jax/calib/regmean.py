"""RegMean as published (Jin et al., 2023; FusionBench), over a whole model through an adapter.

For every linear kernel the calibration adapter names, expert t's Gram matrix
G_t = X_tᵀX_t is taken from **expert t's own forward pass on task t's data** (plain sums over
tokens; padding tokens weigh 0), and the merge is

    W = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t,    G̃_t = α·G_t + (1 − α)·diag(G_t),

with α scaling the off-diagonal entries (FusionBench's CLIP setting: 0.6). Every other leaf
(biases, norms, embeddings, kernels the adapter does not name) is the experts' simple average.
There is no sequential propagation: each expert runs its own full-precision model.

Because G̃_t is linear in G_t, the sums S = Σ_t G_t, SW = Σ_t G_t W_t and DW = Σ_t diag(G_t) W_t
are all that is kept (per layer; never one Gram matrix per expert), and every α of a
validation grid is solved from them: H = α·S + (1 − α)·diag(S), B = α·SW + (1 − α)·DW.
Blocks are processed one at a time with the T expert activations carried beside each other, so
memory is one block's statistics plus T sets of activations.

:func:`epmq_jax.merge.regmean` is the same merge from per-expert Gram matrices a user has.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from epmq_jax._tree import PathFilter, compile_filter, map_with_path
from epmq_jax.calib._placement import Layout, place
from epmq_jax.calib.adapter import CalibAdapter, get_path, key_path, set_path
from epmq_jax.calib.driver import _batches, _embed_all, _rows_weight
from epmq_jax.calib.solve import solve
from epmq_jax.merge._validate import flatten_inputs
from epmq_jax.models import streamed

PyTree = Any
_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block_grams(adapter, kind, groups, block, carry, mask):
    """A task's batches ``(n_batches, batch, ...)`` through one expert block, in one scan:
    ``(carry out, [Σ_rows w·xᵀx per group])``."""
    def one(grams, cm):
        c, m = cm
        out, caps = adapter.run_block(kind, block, c)
        new = []
        for group, g in zip(groups, grams):
            if group[0] not in caps:
                raise ValueError(f"run_block captured no input for '{group[0]}' (captured: {sorted(caps)})")
            x, w = _rows_weight(caps[group[0]], m)
            rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            wr = w.reshape(-1).astype(jnp.float32)
            new.append(g + jnp.matmul((rows * wr[:, None]).T, rows, precision=_HI))
        return new, out

    d_ins = [get_path(block, key_path(group[0])).shape[0] for group in groups]
    grams, out = jax.lax.scan(one, [jnp.zeros((d, d), jnp.float32) for d in d_ins], (carry, mask))
    return out, grams


@jax.jit
def _accumulate(s, sw, dw, g, w_t):
    w_t = w_t.astype(jnp.float32)
    return (s + g, sw + jnp.matmul(g, w_t, precision=_HI), dw + jnp.diag(g)[:, None] * w_t)


@jax.jit
def _regmean_solve(s, sw, dw, center, alpha, damp):
    h = alpha * s + (1.0 - alpha) * jnp.diag(jnp.diag(s))
    b = alpha * sw + (1.0 - alpha) * dw
    return solve(h, b, center, damp)


def _average_start(base: PyTree, experts: Sequence[PyTree], filter: PathFilter) -> PyTree:
    """Leaves the filter selects: the experts' average (float32 inside, cast back); the rest: base.

    One leaf at a time: a streamed expert reads that one tensor."""
    keep = compile_filter(filter or None)

    def expert_leaf(t, path):
        try:
            return get_path(experts[t], key_path(path))
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"experts[{t}] has no leaf at path '{path}' that base has") from None

    def leaf(path, b):
        if not keep(path) or not jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating):
            return b
        total = sum(jnp.asarray(expert_leaf(t, path), jnp.float32) for t in range(len(experts)))
        return (total / len(experts)).astype(jnp.asarray(b).dtype)

    return map_with_path(leaf, base)


def regmean_merge(adapter: CalibAdapter, base: PyTree, experts: Sequence[PyTree],
                  task_inputs: Sequence[PyTree], alphas: Sequence[float] = (0.6,), *,
                  filter: PathFilter = None, damp: float = 0.0, batch_size: int = 32,
                  mesh: jax.sharding.Mesh | None = None, axis: str | None = None,
                  progress: bool = False) -> tuple[dict[float, PyTree], list[dict[str, Any]]]:
    """RegMean merges of ``experts`` for each off-diagonal scale α (see the module docstring).

    Args:
      adapter: the model family's calibration adapter (it names the linear kernels and runs
        blocks; see docs/internals.md).
      base: θ₀ (leaves outside ``filter`` are copied from it).
      experts: T expert param trees (pure nested dicts), same structure as ``base``, in memory or
        streamed from disk (:class:`epmq_jax.models.streamed.CheckpointTree`): a streamed expert
        is read one leaf at a time for the average and one block at a time for the statistics.
      task_inputs: T model-input pytrees, task t's calibration data (leading axis = samples);
        task t runs through expert t.
      alphas: the α values to solve for (each in [0, 1]).
      filter: which leaves are merged (regex on leaf paths; None / "" = all). Kernels the
        adapter names must be selected.
      damp: relative damping of the solve (δ·mean diag H, centred on the experts' average);
        raised automatically when H is singular, and reported.
      batch_size: samples per forward pass.
      mesh, axis: optional mesh; batches are split over ``axis`` (default: its first axis).
      progress: a progress bar over blocks.

    Returns:
      ``({α: merged tree}, stats)`` with one stats dict per kernel: ``path``, ``alpha``,
      ``damp`` (the damping used), ``rel_dist_to_average``.

    Raises:
      ValueError: no experts, counts that disagree, experts whose leaves differ from ``base``'s
        (paths, shapes, dtypes) or hold NaN/inf, an α outside [0, 1], non-finite statistics,
        or a kernel the adapter names that ``filter`` excludes.
    """
    T = len(experts)
    if T == 0 or len(task_inputs) != T:
        raise ValueError(f"regmean_merge needs one input set per expert: {T} experts, "
                         f"{len(task_inputs)} task_inputs")
    alphas = [float(a) for a in alphas]
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if not alphas or bad:
        raise ValueError(f"alphas must be a non-empty list of values in [0, 1], got {alphas}")
    flatten_inputs(base, [streamed.abstract(e) if streamed.is_lazy(e) else e for e in experts],
                   validate=True)       # structure, shapes, dtypes (streamed: from the headers)
    keep = compile_filter(filter or None)
    axis = None if mesh is None else (axis or mesh.axis_names[0])
    with jax.default_matmul_precision("highest"):   # the experts' forward passes too
        return _regmean_merge(adapter, base, experts, task_inputs, alphas, keep, filter, damp,
                              batch_size, mesh, axis, progress)


def _regmean_merge(adapter, base, experts, task_inputs, alphas, keep, filter, damp, batch_size,
                   mesh, axis, progress):
    T = len(experts)
    sharding = None
    if mesh is not None:
        k = mesh.shape[axis]
        batch_size = -(-batch_size // k) * k
        sharding = NamedSharding(mesh, P(axis))
    start = _average_start(base, experts, filter)
    outs = {a: start for a in alphas}
    stats: list[dict[str, Any]] = []
    batches = [_batches(x, batch_size, f"task_inputs[{t}]", sharding) for t, x in enumerate(task_inputs)]
    carries = [_embed_all(adapter, experts[t], b) for t, (b, _) in enumerate(batches)]
    masks = [m for _, m in batches]
    del batches
    blocks = list(adapter.block_paths(base))
    bar = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="RegMean statistics", leave=False)
    for k in bar:
        bpath = blocks[k]
        kind = adapter.block_kind(k)
        groups = tuple(tuple(g) for g in adapter.linear_groups(kind))
        where = "/".join(str(p) for p in bpath)
        acc: dict[str, tuple] = {}
        for t in range(T):
            eblock = place(streamed.materialize(get_path(experts[t], bpath)),
                           None if mesh is None else Layout(mesh, axis))
            carries[t], task_grams = _block_grams(adapter, kind, groups, eblock, carries[t], masks[t])
            for group, g in zip(groups, task_grams):
                for rel in group:
                    w_t = get_path(eblock, key_path(rel))
                    s, sw, dw = acc.get(rel) or (jnp.zeros_like(g), jnp.zeros(w_t.shape, jnp.float32),
                                                 jnp.zeros(w_t.shape, jnp.float32))
                    acc[rel] = _accumulate(s, sw, dw, g, w_t)
        for rel, (s, sw, dw) in acc.items():
            full = f"{where}/{rel}"
            if not keep(full):
                raise ValueError(f"merge filter excludes '{full}', a kernel RegMean merges; widen the filter")
            keypath = [*bpath, *key_path(rel)]
            center = get_path(start, keypath)
            for a in alphas:
                w, info = _regmean_solve(s, sw, dw, center, jnp.float32(a), jnp.float32(damp))
                if not bool(info["ok"]) or not bool(jnp.all(jnp.isfinite(w))):
                    raise ValueError(f"RegMean '{full}' (alpha {a:g}): the summed Gram matrix "
                                     f"{tuple(s.shape)} is not positive definite even with damping "
                                     f"{float(info['damp']):.3g} (non-finite activations?)")
                rel_dist = jnp.linalg.norm(w - center.astype(jnp.float32)) / jnp.maximum(
                    jnp.linalg.norm(center.astype(jnp.float32)), 1e-30)
                outs[a] = set_path(outs[a], keypath, w.astype(center.dtype))
                stats.append({"path": full, "alpha": a, "damp": float(info["damp"]),
                              "rel_dist_to_average": float(rel_dist)})
    return outs, stats

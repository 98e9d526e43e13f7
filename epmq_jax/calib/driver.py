"""The sequential calibration driver: quantize (or re-merge) a model block by block (METHOD.md §6).

For block k, in forward order:

1. for every group of linear layers of the block (layers that read the same input, groups in
   execution order: true-sequential), each task's calibration batches run through the block
   as it stands (earlier blocks and earlier groups already calibrated) and, when the objective
   uses expert-side inputs, through expert t's own block; the group's statistics H and B are
   accumulated (:mod:`epmq_jax.calib.stats`), each layer's objective is solved and rounded
   (:func:`epmq_jax.calib.solve_layer`) and its effective kernel written into the block;
2. the calibrated block's outputs become block k+1's inputs; the expert paths advance beside it
   (task t's data through expert t).

Model knowledge comes only from the adapter (:mod:`epmq_jax.calib.adapter`). The per-group
statistics and the block forward are jitted with the adapter as a static argument, so every
block of one kind, every later run and every variant (λ, bits, rounder) reuses the compiled
code. Batches are padded to a fixed size (padding rows masked out) for the same reason.

Sharding: with a ``mesh``, the calibration batches are split over the mesh axis along the
sample axis (the jitted statistics reduce across devices) and each layer's solve and rounding
run with the kernel and B split over output channels (H replicated). Nothing sharded is
gathered to a host: only per-layer scalar statistics are fetched.

Resumable: with ``checkpoint_dir`` the state is saved (orbax, atomically) after every block; a
rerun with the same arguments replays the finished blocks' forward passes and continues,
giving the result of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from epmq_jax.calib import awq
from epmq_jax.calib import stats as st
from epmq_jax.calib.adapter import CalibAdapter, get_path
from epmq_jax.calib.objectives import Objective, target_input
from epmq_jax.calib.solve import ROUNDINGS, effective_kernel, solve_layer
from epmq_jax.quant import QuantSpec

PyTree = Any
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """What the driver computes.

    Attributes:
      objective: the layer objective (:class:`~epmq_jax.calib.Objective`): ``gptq`` for
        RTN/GPTQ/AWQ on the merge, ``epmq``, or ``regmean``.
      rounding: ``gptq``, ``rtn``, ``awq`` (llm-awq, whole blocks at a time: scales shared by
        the layers reading one input and folded into the op before them, clipping, RTN; see
        :mod:`epmq_jax.calib.awq`; the adapter needs ``awq_groups``) or ``none`` (keep W* in float).
      spec: the quantization grid.
      damp: relative damping δ of the solve and of GPTQ.
      block_size, act_order, static_groups: GPTQ options.
      awq: shorthand for ``rounding="awq"`` (overrides ``rounding``).
      awq_grid: number of AWQ scale ratios; awq_clip: AWQ's clipping search (never for q, k).
      batch_size: calibration samples per forward pass (batches are padded to it).
      propagate: what feeds the next block: ``quantized`` (the calibrated block, GPTQ / E-PMQ's
        sequential mode) or ``float`` (the merged block, as the AWQ reference does). Default:
        ``float`` for AWQ, else ``quantized``.
    """

    objective: Objective = Objective()
    rounding: Literal["gptq", "rtn", "awq", "none"] = "gptq"
    spec: QuantSpec = QuantSpec()
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    awq: bool = False
    awq_grid: int = 20
    awq_clip: bool = True
    batch_size: int = 256
    propagate: Literal["quantized", "float"] | None = None

    def __post_init__(self):
        if self.rounder not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.rounder == "awq" and self.objective.kind != "gptq":
            raise ValueError(f"rounding='awq' is llm-awq on the model being quantized: it needs "
                             f"objective kind 'gptq', got {self.objective.kind!r}")
        if self.propagate not in (None, "quantized", "float"):
            raise ValueError(f"propagate must be 'quantized' or 'float', got {self.propagate!r}")

    @property
    def rounder(self) -> str:
        return "awq" if self.awq else self.rounding

    @property
    def propagate_float(self) -> bool:
        return (self.propagate or ("float" if self.rounder == "awq" else "quantized")) == "float"

    def rounder_options(self) -> dict[str, Any]:
        if self.rounder == "gptq":
            return {"block_size": self.block_size, "act_order": self.act_order,
                    "static_groups": self.static_groups}
        if self.rounder == "awq":
            return {"n_grid": self.awq_grid, "clip": self.awq_clip}
        return {}


@dataclasses.dataclass
class CalibResult:
    """The driver's output.

    Attributes:
      params: the input params with every calibrated kernel replaced by a
        :class:`~epmq_jax.quant.QuantizedWeight` (or by the float W* for ``rounding="none"``).
      stats: one JSON-able dict per layer, in calibration order: ``path``, ``block``, ``group``,
        ``rel_dist``, ``cond``, ``damp``, ``obj_merged``, ``obj_relaxed``, ``obj_rounded``,
        ``rounding``, ``time_s`` (see :func:`~epmq_jax.calib.solve_layer`), ``n_rows``,
        ``task_weights``. RTN of the merge (``gptq`` objective, ``rtn`` rounding) needs no data
        and runs no forward pass: its entries hold only ``path``, ``block``, ``group``,
        ``rounding`` and ``time_s``.
    """

    params: PyTree
    stats: list[dict]


# ----------------------------------------------------------------------------- tree helpers


def _set_path(tree: PyTree, path: Sequence, value: Any) -> PyTree:
    """A copy of a nested dict with ``tree[p0][p1]... = value`` (only the dicts on the path are copied)."""
    if not path:
        return value
    if not isinstance(tree, Mapping):
        raise ValueError(f"cannot set key {path[0]!r}: expected a dict, got {type(tree).__name__}")
    out = dict(tree)
    out[path[0]] = _set_path(tree[path[0]], path[1:], value)
    return out


def _key_path(rel: str) -> list:
    return [int(p) if p.isdigit() else p for p in rel.split("/")]


def _full_path(block: tuple, rel: str) -> str:
    return "/".join(str(k) for k in block) + "/" + rel


def _kernel(block_params: PyTree, rel: str, where: str) -> jax.Array:
    try:
        w = get_path(block_params, _key_path(rel))
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{where}: no kernel at '{rel}' in the block params") from None
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"{where}/{rel}: expected a 2-D kernel (d_in, d_out), got shape "
                         f"{getattr(w, 'shape', None)}")
    return w


# ----------------------------------------------------------------------------- jitted pieces


def _rows_weight(cap: Any, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A capture (x or (x, w)) and the batch's sample mask -> (x, per-row weight over x.shape[:-1])."""
    x, w = cap if isinstance(cap, tuple) else (cap, None)
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
    w = m if w is None else w * m
    return x, jnp.broadcast_to(w, x.shape[:-1])


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(adapter, params, inputs):
    return adapter.embed(params, inputs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _advance(adapter, kind, block_params, carry):
    return adapter.run_block(kind, block_params, carry)[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _group_moments(adapter, kind, group, objective, block_params, carry, expert_block, expert_carry,
                   expert_kernels, mask):
    """One batch's moments for the layers of ``group``: {path: Moments} (H shared by the group)."""
    _, caps = adapter.run_block(kind, block_params, carry)
    missing = [p for p in group if p not in caps]
    if missing:
        raise ValueError(f"run_block captured no input for {missing} (captured: {sorted(caps)})")
    x, w = _rows_weight(caps[group[0]], mask)
    base = st.moments(x, None, w)
    if not objective.needs_targets:
        return {p: base for p in group}
    x_exp = None
    if objective.needs_expert_inputs:
        _, ecaps = adapter.run_block(kind, expert_block, expert_carry)
        x_exp = _rows_weight(ecaps[group[0]], mask)[0]
    xt = target_input(x, x_exp, objective)
    out = {}
    for p in group:
        m = st.moments(x, jnp.matmul(xt, expert_kernels[p].astype(jnp.float32), precision=_HI), w)
        out[p] = m._replace(h=base.h)
    return out


@functools.partial(jax.jit, static_argnums=(2,))
def _fold(total, task, weighting):
    new, omega = {}, None
    for p in task:
        new[p], omega = st.fold_task(None if total is None else total[p], task[p], weighting)
    return new, omega


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


# ----------------------------------------------------------------------------- batching


def _n_samples(inputs: PyTree, where: str) -> int:
    ns = {x.shape[0] for x in jax.tree_util.tree_leaves(inputs)}
    if len(ns) != 1:
        raise ValueError(f"{where}: every leaf needs the same leading (sample) axis, got sizes {sorted(ns)}")
    n = ns.pop()
    if n == 0:
        raise ValueError(f"{where}: no calibration samples")
    return n


def _batches(inputs: PyTree, batch_size: int, where: str, sharding) -> list[tuple[PyTree, jax.Array]]:
    """Splits a task's inputs into fixed-size batches; the last is filled by repeating real samples, masked out."""
    n = _n_samples(inputs, where)
    out = []
    for s in range(0, n, batch_size):
        idx = jnp.arange(s, s + batch_size) % n if s + batch_size > n else slice(s, s + batch_size)
        batch = jax.tree.map(lambda x, i=idx: jnp.asarray(x)[i], inputs)
        mask = (jnp.arange(s, s + batch_size) < n).astype(jnp.float32)
        if sharding is not None:
            batch, mask = jax.device_put((batch, mask), sharding)
        out.append((batch, mask))
    return out


# ----------------------------------------------------------------------------- the driver


def _place_columns(x: jax.Array, mesh, axis: str | None) -> jax.Array:
    """Splits ``(d_in, d_out)`` over output channels when the mesh axis divides d_out."""
    if mesh is None or x.shape[-1] % mesh.shape[axis]:
        return x
    return jax.device_put(x, NamedSharding(mesh, P(None, axis)))


def calibrate(adapter: CalibAdapter, params: PyTree, task_inputs: Sequence[PyTree],
              config: CalibConfig = CalibConfig(), *, experts: Sequence[PyTree] | None = None,
              mesh: jax.sharding.Mesh | None = None, axis: str | None = None,
              checkpoint_dir: str | None = None, progress: bool = False,
              on_block: Callable[[int], None] | None = None) -> CalibResult:
    """Calibrates every linear layer the adapter names, block by block (see the module docstring).

    Args:
      adapter: the model family's adapter (:class:`~epmq_jax.calib.adapter.CalibAdapter`).
      params: the model being calibrated (the merge), a pure nested-dict param tree.
      task_inputs: T model-input pytrees (leading axis = samples), task t's calibration data.
      config: the objective, rounder and options (:class:`CalibConfig`).
      experts: T expert param trees, same structure as ``params`` (needed by ``epmq`` and
        ``regmean``; task t's data runs through expert t).
      mesh: optional mesh; batches are split over ``axis`` along samples, solves over output
        channels. ``batch_size`` is rounded up to a multiple of the axis size.
      axis: mesh axis name (default: the mesh's first axis).
      checkpoint_dir: save progress there after every block and resume from it.
      progress: show a progress bar over blocks.
      on_block: called with the block index after each block is finished (calibrated, its
        outputs computed and checkpointed), e.g. for timing or logging.

    Returns:
      :class:`CalibResult` (calibrated params and per-layer statistics).

    Raises:
      ValueError: missing or mismatched experts, inputs without a common sample axis, a kernel
        path the block lacks, a capture missing, or a checkpoint of another run.
    """
    obj = config.objective
    T = len(task_inputs)
    if T == 0:
        raise ValueError("task_inputs is empty: give at least one task's calibration inputs")
    if obj.needs_targets:
        if experts is None or len(experts) != T:
            raise ValueError(f"objective {obj.kind!r} needs one expert per task: got "
                             f"{0 if experts is None else len(experts)} experts for {T} tasks")
    axis = None if mesh is None else (axis or mesh.axis_names[0])
    bs = config.batch_size
    sharding = None
    if mesh is not None:
        k = mesh.shape[axis]
        bs = -(-bs // k) * k
        sharding = NamedSharding(mesh, P(axis))
    blocks = list(adapter.block_paths(params))
    if obj.kind == "gptq" and config.rounder == "rtn":   # data-free: no forward passes at all
        return _rtn_only(adapter, params, blocks, config)

    ckpt = None
    done, restored, stats = 0, {}, []
    if checkpoint_dir is not None:
        from epmq_jax.calib._resume import BlockCheckpointer, fingerprint

        run_id = fingerprint(config, type(adapter).__qualname__,
                             trees=(params, list(task_inputs), list(experts or [])))
        ckpt = BlockCheckpointer(checkpoint_dir, run_id)
        state = ckpt.restore()
        if state is not None:
            done, restored, stats = state

    batches = [_batches(x, bs, f"task_inputs[{t}]", sharding) for t, x in enumerate(task_inputs)]
    masks = [[m for _, m in tb] for tb in batches]
    q_carry = [[_embed(adapter, params, b) for b, _ in tb] for tb in batches]
    e_carry = None
    if obj.needs_expert_inputs:
        e_carry = [[_embed(adapter, experts[t], b) for b, _ in tb] for t, tb in enumerate(batches)]
    del batches

    kernels: dict[str, Any] = dict(restored)
    out_params = params
    bar = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"calibrate {obj.kind}/{config.rounder}", leave=False)
    for k in bar:
        bpath = blocks[k]
        kind = adapter.block_kind(k)
        groups = adapter.linear_groups(kind)
        where = "/".join(str(p) for p in bpath)
        merged_block = get_path(params, bpath)
        expert_blocks = [get_path(e, bpath) for e in experts] if obj.needs_targets else None
        block = merged_block
        if config.rounder == "awq":    # whole blocks: shared scales folded into the ops before them
            if k >= done:
                changed, block_stats = awq.calibrate_block(
                    adapter, kind, merged_block, q_carry, masks, config.spec, where=where,
                    **config.rounder_options())
                kernels.update({_full_path(bpath, rel): v for rel, v in changed.items()})
                stats += [{**s, "block": k} for s in block_stats]
            if not config.propagate_float:
                prefix = _full_path(bpath, "")
                block = awq.apply_changes(merged_block, {p[len(prefix):]: v for p, v in kernels.items()
                                                         if p.startswith(prefix)})
            groups = ()
        for gi, group in enumerate(groups):
            if k < done:      # resumed: the calibrated kernels are known
                for rel in group:
                    q = kernels[_full_path(bpath, rel)]
                    block = _set_path(block, _key_path(rel), effective_kernel(q))
                continue
            block, layer_stats = _calibrate_group(
                adapter, kind, group, block, merged_block, expert_blocks, q_carry, e_carry, masks,
                config, mesh, axis, where)
            for rel, q, s in layer_stats:
                kernels[_full_path(bpath, rel)] = q
                stats.append({**s, "block": k, "group": gi})
        out_block = merged_block if config.propagate_float else block
        q_carry = [[_advance(adapter, kind, out_block, c) for c in tc] for tc in q_carry]
        if e_carry is not None:
            e_carry = [[_advance(adapter, kind, expert_blocks[t], c) for c in tc]
                       for t, tc in enumerate(e_carry)]
        if ckpt is not None and k >= done:
            ckpt.save(k + 1, {p: kernels[p] for p in kernels}, stats)
        if on_block is not None:
            jax.block_until_ready(q_carry)
            on_block(k)
    for full, q in kernels.items():
        out_params = _set_path(out_params, _key_path(full), q)
    return CalibResult(out_params, stats)


def _rtn_only(adapter, params, blocks, config: CalibConfig) -> CalibResult:
    """RTN of every kernel the adapter names (it needs no calibration data)."""
    from epmq_jax.quant import rtn

    out, stats = params, []
    for k, bpath in enumerate(blocks):
        where = "/".join(str(p) for p in bpath)
        for gi, group in enumerate(adapter.linear_groups(adapter.block_kind(k))):
            for rel in group:
                t0 = time.perf_counter()
                q = rtn(_kernel(get_path(params, bpath), rel, where), config.spec)
                jax.block_until_ready(q)
                out = _set_path(out, [*bpath, *_key_path(rel)], q)
                stats.append({"path": f"{where}/{rel}", "block": k, "group": gi, "rounding": "rtn",
                              "time_s": time.perf_counter() - t0})
    return CalibResult(out, stats)


def _calibrate_group(adapter, kind, group, block, merged_block, expert_blocks, q_carry, e_carry,
                     masks, config: CalibConfig, mesh, axis, where):
    """Statistics, solve and rounding for one group of layers; returns the updated block and [(rel, q, stats)]."""
    obj = config.objective
    # λ, the anchor and the task weights do not enter the batch statistics: one compilation for all
    static_obj = dataclasses.replace(obj, lam=0.0, anchor="output", task_weights="uniform")
    total, omegas = None, []
    for t in range(len(q_carry)):
        e_block = expert_blocks[t] if obj.needs_expert_inputs else None
        e_kern = ({p: _kernel(expert_blocks[t], p, f"experts[{t}]/{where}") for p in group}
                  if obj.needs_targets else None)
        task = None
        for i, carry in enumerate(q_carry[t]):
            m = _group_moments(adapter, kind, group, static_obj, block, carry, e_block,
                               None if e_carry is None else e_carry[t][i], e_kern, masks[t][i])
            task = m if task is None else _add(task, m)
        total, omega = _fold(total, task, obj.task_weights)
        omegas.append(omega)
    omegas = [float(o) for o in jax.device_get(omegas)]
    results = []
    for rel in group:
        w_m = _place_columns(_kernel(merged_block, rel, where), mesh, axis)
        m = total[rel]
        if m.b is not None:
            m = m._replace(b=_place_columns(m.b, mesh, axis))
        q, s = solve_layer(obj, m, w_m, config.spec, rounding=config.rounder, damp=config.damp,
                           path=f"{where}/{rel}", **config.rounder_options())
        s.update(n_rows=float(m.n), task_weights=omegas)
        block = _set_path(block, _key_path(rel), effective_kernel(q))
        results.append((rel, q, s))
    return block, results

"""The sequential calibration driver: quantize (or re-merge) a model block by block (METHOD.md §6).

For block k, in forward order:

1. when the objective uses expert-side inputs, every task's batches run once through expert t's
   own block k (all tasks in one compiled pass): this gives the target-side inputs X̃ of every
   group of the block and the expert paths' inputs to block k+1;
2. for every group of linear layers of the block (layers that read the same input, groups in
   execution order: true-sequential), all tasks' batches run through the block as it stands
   (earlier blocks and earlier groups already calibrated) and the group's statistics H and B are
   accumulated (:mod:`epmq_jax.calib.stats`): one compiled scan over the batches of all tasks,
   completing each task's sums before adding them with its weight ω_t (memory: two
   accumulators, flat in T); each layer's objective is solved, rounded and reported
   (:func:`epmq_jax.calib.solve.layer_step`, one compiled program per layer shape) and its
   effective kernel written into the block;
3. the calibrated block's outputs become block k+1's inputs.

Nothing inside a block waits for the host: the per-layer scalar statistics (and the solver's
failure flags) are fetched once per block, checked, and turned into JSON-able dicts. Model
knowledge comes only from the adapter (:mod:`epmq_jax.calib.adapter`). The compiled functions
take the adapter, the group and the objective's switches as static arguments and everything
else (λ, δ, the block's parameters) as arrays, so every block of one kind, every later run and
every variant (λ, damping, bits) reuses the compiled code: compilation is paid once per
distinct shape. Batches are padded to a fixed size (padding rows masked out) for the same reason.

Sharding: with a ``mesh``, the calibration batches are split over the mesh axis along the
sample axis (the jitted statistics reduce across devices) and each layer's solve and rounding
run with the kernel and B split over output channels (H replicated). Nothing sharded is
gathered to a host: only per-layer scalar statistics are fetched. GPTQ on a column-split kernel
gives the single-device codes bit for bit; the statistics' cross-device sums are not
order-deterministic, so a sharded E-PMQ run equals the single-device one in quality (objective
values), not bit for bit (see docs/adapters.md).

Resumable: with ``checkpoint_dir`` the state is saved (orbax, atomically) after every block; a
rerun with the same arguments replays the finished blocks' forward passes and continues,
giving the result of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from epmq_jax.calib import stats as st
from epmq_jax.calib.adapter import CalibAdapter, get_path
from epmq_jax.calib.objectives import Objective, target_input
from epmq_jax.calib.solve import (
    ROUNDINGS,
    DampCenter,
    check_damping,
    check_spec,
    effective_kernel,
    finish_stats,
    layer_step,
)
from epmq_jax.quant import QuantSpec

PyTree = Any
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """What the driver computes.

    Attributes:
      objective: the layer objective (:class:`~epmq_jax.calib.Objective`): ``gptq`` for
        RTN/GPTQ/AWQ on the merge, ``epmq``, or ``regmean``.
      rounding: ``gptq``, ``rtn``, ``awq`` (activation-aware scales + optional clipping, then
        RTN) or ``none`` (keep W* in float).
      spec: the quantization grid (may be None with ``rounding="none"``).
      damp: size δ of the solve's damping, relative to the mean diagonal of H (0: none, unless
        H is not positive definite). A second anchor beside λ: see
        :mod:`epmq_jax.calib.solve`.
      damp_center: what the solve's damping pulls toward: ``merged`` (W_m) or ``zero`` (plain
        ridge, as GPTQ's).
      gptq_damp: GPTQ rounding's δ (default None: the same as ``damp``).
      block_size, act_order, static_groups: GPTQ options.
      awq: shorthand for ``rounding="awq"`` (overrides ``rounding``).
      awq_grid: number of AWQ scale exponents; awq_clip: AWQ's clipping search.
      batch_size: calibration samples per forward pass (batches are padded to it).
      propagate: what feeds the next block: ``quantized`` (the calibrated block, GPTQ / E-PMQ's
        sequential mode) or ``float`` (the merged block, as the AWQ reference does). Default:
        ``float`` for AWQ, else ``quantized``.
    """

    objective: Objective = Objective()
    rounding: Literal["gptq", "rtn", "awq", "none"] = "gptq"
    spec: QuantSpec | None = QuantSpec()
    damp: float = 0.01
    damp_center: DampCenter = "merged"
    gptq_damp: float | None = None
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
        if not isinstance(self.objective, Objective):
            raise ValueError(f"objective must be an epmq_jax.calib.Objective, got "
                             f"{type(self.objective).__name__}")
        check_spec(self.spec, self.rounder)
        check_damping(self.damp, self.damp_center)
        if self.gptq_damp is not None:
            check_damping(self.gptq_damp, self.damp_center, name="gptq_damp")
        for name in ("batch_size", "block_size", "awq_grid"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
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
        :class:`~epmq_jax.quant.QuantizedWeight` (or by the float W* for ``rounding="none"``),
        in the kernel's own dtype.
      stats: one JSON-able dict per layer, in calibration order: ``path``, ``block``, ``group``,
        ``rel_dist``, ``cond``, ``damp`` (δ the solve used), ``damp_requested``,
        ``damp_center``, ``damp_raised``, ``n_dead``, ``obj_merged``, ``obj_relaxed``,
        ``obj_rounded``, ``rounding`` (see :func:`~epmq_jax.calib.solve_layer`; ``gptq_damp``
        with GPTQ rounding, ``awq_ratio`` with AWQ), ``n_rows``, ``task_weights`` and
        ``block_time_s`` (wall time of the whole block: layers are not timed one by one, which
        would need a host round trip each). RTN of the merge (``gptq`` objective, ``rtn``
        rounding) needs no data and runs no forward pass: its entries hold only ``path``,
        ``block``, ``group``, ``rounding`` and ``block_time_s``.
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


# ----------------------------------------------------------------------------- the batches


class _Batches(NamedTuple):
    """All tasks' calibration batches, stacked: ``N = Σ_t ceil(n_t / batch_size)`` batches.

    Attributes:
      inputs: the model inputs, every leaf ``(N, batch_size, ...)``.
      mask: ``(N, batch_size)`` float32, 0 for the padding samples of a task's last batch.
      task: ``(N,)`` int32, the task of each batch (tasks in order, batches in order).
      last: ``(N,)`` bool, True for each task's last batch.
      spans: ``[(start, stop)]`` of each task's batches.
    """

    inputs: PyTree
    mask: jax.Array
    task: jax.Array
    last: jax.Array
    spans: list[tuple[int, int]]


def _n_samples(inputs: PyTree, where: str) -> int:
    leaves = jax.tree_util.tree_leaves(inputs)
    if not leaves:
        raise ValueError(f"{where}: no arrays (expected model inputs with a leading sample axis)")
    ns = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(ns) != 1 or None in ns:
        raise ValueError(f"{where}: every leaf needs the same leading (sample) axis, got sizes "
                         f"{sorted(ns, key=str)}")
    n = ns.pop()
    if n == 0:
        raise ValueError(f"{where}: no calibration samples")
    return n


def _batches(task_inputs: Sequence[PyTree], batch_size: int, sharding) -> _Batches:
    """Stacks every task's inputs into fixed-size batches; a task's last batch is filled by
    repeating its real samples, masked out."""
    parts, masks, task, last, spans = [], [], [], [], []
    structure = jax.tree.structure(task_inputs[0])
    for t, inputs in enumerate(task_inputs):
        where = f"task_inputs[{t}]"
        if jax.tree.structure(inputs) != structure:
            raise ValueError(f"{where}: tree structure {jax.tree.structure(inputs)} differs from "
                             f"task_inputs[0]'s {structure}")
        n = _n_samples(inputs, where)
        nb = -(-n // batch_size)
        idx = np.arange(nb * batch_size) % n
        parts.append(jax.tree.map(lambda x, i=idx: np.asarray(x)[i], inputs))
        masks.append((np.arange(nb * batch_size) < n).astype(np.float32))
        spans.append((len(task), len(task) + nb))
        task += [t] * nb
        last += [False] * (nb - 1) + [True]
    stacked = jax.tree.map(lambda *xs: np.concatenate(xs).reshape(
        (-1, batch_size) + xs[0].shape[1:]), *parts)
    mask = np.concatenate(masks).reshape(-1, batch_size)
    if sharding is not None:
        stacked, mask = jax.device_put((stacked, mask), sharding)
    return _Batches(stacked, jnp.asarray(mask), jnp.asarray(task, jnp.int32),
                    jnp.asarray(last), spans)


# ----------------------------------------------------------------------------- compiled pieces


def _rows_weight(cap: Any, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A capture (x or (x, w)) and the batch's sample mask -> (x, per-row weight over x.shape[:-1])."""
    x, w = cap if isinstance(cap, tuple) else (cap, None)
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
    w = m if w is None else w * m
    return x, jnp.broadcast_to(w, x.shape[:-1])


@functools.partial(jax.jit, static_argnums=(0,))
def _embed_all(adapter, params, inputs):
    """Block 0's input carry of every batch: leaves ``(N', batch_size, ...)``."""
    return jax.lax.map(lambda b: adapter.embed(params, b), inputs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _advance_all(adapter, kind, block_params, carry):
    """Every batch through one block (no captures kept)."""
    return jax.lax.map(lambda c: adapter.run_block(kind, block_params, c)[0], carry)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _expert_pass(adapter, kind, capture, expert_blocks, carry, task):
    """Every batch through its own task's expert block, in one pass.

    Args:
      capture: the kernel paths whose inputs to keep (one per group), or ``()``.
      expert_blocks: the T expert blocks (list of trees of equal structure).
      carry: the expert paths' carries, leaves ``(N, batch_size, ...)``.
      task: ``(N,)`` task of each batch.

    Returns:
      ``(carry out, {path: input (N, batch_size, ..., d_in)})``.
    """
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *expert_blocks)

    def one(args):
        c, t = args
        out, caps = adapter.run_block(kind, jax.tree.map(lambda a: a[t], stacked), c)
        return out, {p: caps[p][0] if isinstance(caps[p], tuple) else caps[p] for p in capture}

    return jax.lax.map(one, (carry, task))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _group_stats(adapter, kind, group, objective, n_tasks, block_params, carry, batches_meta,
                 x_expert, expert_kernels):
    """The ω-weighted moments of one group over all tasks' batches, in one scan.

    Each batch runs through the block up to the group's input (the rest of the block is dead
    code to XLA); a task's sums are completed over its batches, then added with its ω_t.

    Args:
      group: the group's kernel paths (static); objective: its switches (static, λ unused).
      n_tasks: T.
      block_params: the block as it stands.
      carry: the quantized path's carries, leaves ``(N, batch_size, ...)``.
      batches_meta: ``(mask (N, batch_size), task (N,), last (N,))``.
      x_expert: the group's expert-path inputs ``(N, batch_size, ..., d_in)`` or None.
      expert_kernels: ``{path: [W_t] * T}`` or None (objectives without targets).

    Returns:
      ``({path: Moments}, ω (T,))`` (H shared by the group).
    """
    mask, task, last = batches_meta
    d_in = get_path(block_params, _key_path(group[0])).shape[0]
    kern = None
    if objective.needs_targets:
        kern = {p: jnp.stack([w.astype(jnp.float32) for w in expert_kernels[p]]) for p in group}

    def batch(i):
        _, caps = adapter.run_block(kind, block_params, jax.tree.map(lambda a: a[i], carry))
        missing = [p for p in group if p not in caps]
        if missing:
            raise ValueError(f"run_block captured no input for {missing} (captured: {sorted(caps)})")
        x, w = _rows_weight(caps[group[0]], mask[i])
        m = st.moments(x, None, w)
        out = {"h": m.h, "n": m.n, "abs": m.abs_sum, "b": {}, "yy": {}}
        if kern is not None:
            xt = target_input(x, None if x_expert is None else x_expert[i], objective)
            for p in group:
                y = jnp.matmul(xt.astype(jnp.float32), kern[p][task[i]], precision=_HI)
                out["b"][p], out["yy"][p] = st.cross_moments(x, y, w)
        return out

    def fold(acc, tot, omega, t):
        om = st.task_weight(st.Moments(acc["h"], None, acc["n"], acc["n"], acc["abs"]),
                            objective.task_weights)
        weighted = {"h": om, "n": 1.0, "abs": 1.0, "b": om, "yy": om}     # n, Σ|x| never weighted
        tot = {k: jax.tree.map(lambda a, b, k=k: a + weighted[k] * b, tot[k], acc[k]) for k in tot}
        return jax.tree.map(jnp.zeros_like, acc), tot, omega.at[t].set(om)

    def step(state, i):
        acc, tot, omega = state
        acc = jax.tree.map(jnp.add, acc, batch(i))
        return jax.lax.cond(last[i], fold, lambda *a: a[:3], acc, tot, omega, task[i]), None

    f32 = jnp.float32
    zero = {"h": jnp.zeros((d_in, d_in), f32), "n": jnp.zeros((), f32), "abs": jnp.zeros(d_in, f32),
            "b": {}, "yy": {}}
    if kern is not None:
        zero["b"] = {p: jnp.zeros((d_in, kern[p].shape[-1]), f32) for p in group}
        zero["yy"] = {p: jnp.zeros((), f32) for p in group}
    (_, tot, omega), _ = jax.lax.scan(step, (zero, zero, jnp.zeros((n_tasks,), f32)),
                                      jnp.arange(task.shape[0]))
    return {p: st.Moments(tot["h"], tot["b"].get(p), tot["yy"].get(p, jnp.zeros((), f32)),
                          tot["n"], tot["abs"]) for p in group}, omega


# ----------------------------------------------------------------------------- input checks


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _check_inputs(params: PyTree, experts: Sequence[PyTree] | None,
                  task_inputs: Sequence[PyTree]) -> None:
    """Structure, shapes, dtypes and finiteness of everything, before any work (one sync)."""
    from epmq_jax._tree import leaves_with_paths
    from epmq_jax.merge._validate import flatten_inputs

    flatten_inputs(params, list(experts or []), ref_name="params", validate=True)
    named = [(f"task_inputs[{t}]" + (f" leaf '{p}'" if p else ""), x)
             for t, tree in enumerate(task_inputs) for p, x in leaves_with_paths(tree)
             if jnp.issubdtype(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                               jnp.inexact)]
    if named:
        flags = jax.device_get(_finite_flags([jnp.asarray(x) for _, x in named]))
        for (name, x), ok in zip(named, flags):
            if not ok:
                raise ValueError(f"{name} (shape {tuple(np.shape(x))}) contains NaN or inf")


def _check_mesh(mesh, axis) -> str | None:
    if mesh is None:
        if axis is not None:
            raise ValueError(f"axis={axis!r} given without a mesh")
        return None
    if axis is None:
        return mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh (its axes: "
                         f"{tuple(mesh.axis_names)})")
    return axis


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
      params: the model being calibrated (the merge), a pure nested-dict param tree; float32,
        bfloat16 or float16 kernels (each comes back in its own dtype; statistics, solves and
        rounding run in float32).
      task_inputs: T model-input pytrees (leading axis = samples), task t's calibration data.
      config: the objective, rounder and options (:class:`CalibConfig`).
      experts: T expert param trees, same structure, shapes and dtypes as ``params`` (needed by
        ``epmq`` and ``regmean``; task t's data runs through expert t).
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
      ValueError: missing or mismatched experts (the first differing leaf path is named), NaN or
        inf in an input, inputs without a common sample axis, an axis the mesh lacks, a kernel
        path the block lacks, a capture missing, a Hessian no damping makes positive definite,
        or a checkpoint of another run.
    """
    obj = config.objective
    T = len(task_inputs)
    if T == 0:
        raise ValueError("task_inputs is empty: give at least one task's calibration inputs")
    if obj.needs_targets:
        if experts is None or len(experts) != T:
            raise ValueError(f"objective {obj.kind!r} needs one expert per task: got "
                             f"{0 if experts is None else len(experts)} experts for {T} tasks")
    else:
        experts = None
    axis = _check_mesh(mesh, axis)
    _check_inputs(params, experts, task_inputs)
    bs = config.batch_size
    sharding = None
    if mesh is not None:
        k = mesh.shape[axis]
        bs = -(-bs // k) * k
        sharding = NamedSharding(mesh, P(None, axis))
    blocks = list(adapter.block_paths(params))
    if obj.kind == "gptq" and config.rounder == "rtn":   # data-free: no forward passes at all
        return _rtn_only(adapter, params, blocks, config, on_block)

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

    data = _batches(task_inputs, bs, sharding)
    meta = (data.mask, data.task, data.last)
    q_carry = _embed_all(adapter, params, data.inputs)
    e_carry = None
    if obj.needs_expert_inputs:
        parts = [_embed_all(adapter, experts[t], jax.tree.map(lambda x, a=a, b=b: x[a:b], data.inputs))
                 for t, (a, b) in enumerate(data.spans)]
        e_carry = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    del data

    kernels: dict[str, Any] = dict(restored)
    bar = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"calibrate {obj.kind}/{config.rounder}", leave=False)
    for k in bar:
        t0 = time.perf_counter()
        bpath = blocks[k]
        kind = adapter.block_kind(k)
        groups = adapter.linear_groups(kind)
        where = "/".join(str(p) for p in bpath)
        merged_block = get_path(params, bpath)
        expert_blocks = [get_path(e, bpath) for e in experts] if experts is not None else None
        x_expert = {}
        if e_carry is not None:
            capture = tuple(g[0] for g in groups) if k >= done else ()
            e_carry, x_expert = _expert_pass(adapter, kind, capture, expert_blocks, e_carry,
                                             meta[1])
        block, pending = merged_block, []
        for gi, group in enumerate(groups):
            if k < done:      # resumed: the calibrated kernels are known
                for rel in group:
                    q = kernels[_full_path(bpath, rel)]
                    block = _set_path(block, _key_path(rel), effective_kernel(q))
                continue
            block, layers = _calibrate_group(
                adapter, kind, group, block, merged_block, expert_blocks, q_carry,
                x_expert.get(group[0]), meta, T, config, mesh, axis, where)
            pending += [(gi, *layer) for layer in layers]
        out_block = merged_block if config.propagate_float else block
        q_carry = _advance_all(adapter, kind, out_block, q_carry)
        if pending:
            stats += _finish_block(pending, k, config, bpath, kernels)
            block_time = time.perf_counter() - t0
            for s in stats[-len(pending):]:
                s["block_time_s"] = block_time
        if ckpt is not None and k >= done:
            ckpt.save(k + 1, dict(kernels), stats)
        if on_block is not None:
            jax.block_until_ready(q_carry)
            on_block(k)
    out_params = params
    for full, q in kernels.items():
        out_params = _set_path(out_params, _key_path(full), q)
    return CalibResult(out_params, stats)


def _finish_block(pending, k: int, config: CalibConfig, bpath, kernels: dict) -> list[dict]:
    """Fetches a block's statistics at once (one host round trip), checks them, records the kernels."""
    raw = jax.device_get([(r, n, om) for _, _, _, _, r, n, om in pending])
    out = []
    for (gi, rel, q, shape, _, _, _), (r, n, om) in zip(pending, raw):
        path = _full_path(bpath, rel)
        s = finish_stats(r, path=path, shape=shape, objective=config.objective,
                         rounding=config.rounder, damp=config.damp,
                         damp_center=config.damp_center, gptq_damp=config.gptq_damp)
        s.update(block=k, group=gi, n_rows=float(n), task_weights=[float(o) for o in om])
        kernels[path] = q
        out.append(s)
    return out


def _rtn_only(adapter, params, blocks, config: CalibConfig, on_block) -> CalibResult:
    """RTN of every kernel the adapter names (it needs no calibration data)."""
    from epmq_jax.quant import rtn

    out, stats = params, []
    for k, bpath in enumerate(blocks):
        t0 = time.perf_counter()
        where = "/".join(str(p) for p in bpath)
        first = len(stats)
        for gi, group in enumerate(adapter.linear_groups(adapter.block_kind(k))):
            for rel in group:
                q = rtn(_kernel(get_path(params, bpath), rel, where), config.spec)
                out = _set_path(out, [*bpath, *_key_path(rel)], q)
                stats.append({"path": f"{where}/{rel}", "block": k, "group": gi, "rounding": "rtn"})
        jax.block_until_ready(out)
        for s in stats[first:]:
            s["block_time_s"] = time.perf_counter() - t0
        if on_block is not None:
            on_block(k)
    return CalibResult(out, stats)


def _calibrate_group(adapter, kind, group, block, merged_block, expert_blocks, q_carry, x_expert,
                     meta, n_tasks: int, config: CalibConfig, mesh, axis, where):
    """Statistics, solve and rounding for one group of layers, all dispatched without waiting.

    Returns:
      ``(updated block, [(rel, q, (d_in, d_in), raw stats, n_rows, ω)])``; the raw statistics
      are device scalars for :func:`_finish_block`. (Rounders that work on a whole group or
      block, e.g. AWQ with scales shared by the layers of a group, replace the per-layer loop
      below.)
    """
    obj = config.objective
    # λ, the anchor and the damping do not enter the batch statistics: one compilation for all
    static_obj = dataclasses.replace(obj, lam=0.0, anchor="output")
    e_kern = None
    if obj.needs_targets:
        e_kern = {p: [_kernel(b, p, f"experts[{t}]/{where}") for t, b in enumerate(expert_blocks)]
                  for p in group}
    for p in group:
        _kernel(block, p, where)
    total, omega = _group_stats(adapter, kind, group, static_obj, n_tasks, block, q_carry, meta,
                                x_expert, e_kern)
    columns = None if mesh is None else (mesh, axis)
    results = []
    for rel in group:
        w_m = _kernel(merged_block, rel, where)
        m = total[rel]
        cols = columns if mesh is not None and w_m.shape[1] % mesh.shape[axis] == 0 else None
        w_m = _place_columns(w_m, mesh, axis)
        if m.b is not None:
            m = m._replace(b=_place_columns(m.b, mesh, axis))
        q, eff, raw = layer_step(obj, m, w_m, config.spec, rounding=config.rounder,
                                 damp=config.damp, damp_center=config.damp_center,
                                 gptq_damp=config.gptq_damp, columns=cols,
                                 **config.rounder_options())
        block = _set_path(block, _key_path(rel), eff)
        results.append((rel, q, (w_m.shape[0],) * 2, raw, m.n, omega))
    return block, results

"""The sequential calibration driver: quantize (or re-merge) a model block by block (METHOD.md §6).

For block k, in forward order:

1. when the objective uses expert-side inputs, task t's batches run once through expert t's own
   block k (one compiled pass per task): this gives the target-side inputs X̃ of every group of
   the block and the expert paths' inputs to block k+1;
2. for every group of linear layers of the block (layers that read the same input, groups in
   execution order: true-sequential), each task's batches run through the block as it stands
   (earlier blocks and earlier groups already calibrated) and the group's statistics H and B are
   accumulated (:mod:`epmq_jax.calib.stats`): one compiled scan over a task's batches, then the
   task's sums are added with its weight ω_t (memory: two accumulators and one expert block at
   a time, flat in T). With the ``gptq`` objective and uniform task weights (no targets, all
   rows alike) the tasks' samples are pooled into one stream of full batches instead: one pass
   per group for all T tasks (:func:`_poolable`); each layer's objective is solved, rounded and reported
   (:func:`epmq_jax.calib.solve.layer_step`, one compiled program per layer shape) and its
   effective kernel written into the block;
3. the calibrated block's outputs become block k+1's inputs.

The block's forward pass is split at its groups' inputs (:mod:`epmq_jax.calib._segments`, from
``run_block``'s jaxpr: no adapter change): group g's pass runs only the operations after group
g − 1's input, from the values the earlier passes handed on, and step 3 only those after the
last group's input, so every operation of the block runs once per block instead of once per
group. Not with AWQ or E-PMQ-full, where the split is unsafe or would hold too much, nor where
the values handed on would not fit in the ``activation_budget`` beside the activations (without
a budget: 2 GiB per device or 3x the carries, whichever is larger): there the block runs whole
for every group, as before.

Nothing inside a block waits for the host: the per-layer scalar statistics (and the solver's
failure flags) are fetched once per block, checked, and turned into JSON-able dicts. Model
knowledge comes only from the adapter (:mod:`epmq_jax.calib.adapter`). The compiled functions
take the adapter, the group and the objective's switches as static arguments and everything
else (λ, δ, the block's parameters) as arrays, so every block of one kind, every later run and
every variant (λ, damping, bits) reuses the compiled code: compilation is paid once per
distinct shape. Batches are padded to a fixed size (padding rows masked out) for the same reason.

Sharding: with a ``mesh``, the calibration batches are split over the mesh axis along the
sample axis, each block's parameters, the statistics B and each layer's solve and rounding over
output channels (H whole, or split over rows: ``h_rows_from``). Partial sums across devices are
added in a fixed device order (:mod:`epmq_jax.calib._placement`), so the same mesh gives the
same bits in one process or several (``jax.distributed``); that order is not a single device's,
so a sharded run equals the single-device one in quality (objective values), not bit for bit
(see docs/adapters.md). Only per-layer scalar statistics are fetched to the host.

At LLM size: ``experts`` may be streamed from disk (:mod:`epmq_jax.models.streamed`; expert t's
block k is read when block k is reached), and ``activation_budget`` keeps the activations in
host memory for blocks where they exceed it (docs/scale.md).

E-PMQ-full (``CalibConfig.full``, :mod:`epmq_jax.calib.full`, this project's extension) takes
new code paths behind that switch: per block its norms and groups (kernel and bias solved
together), token weights, an extrapolated anchor (``base``), and the stem and head pseudo
blocks before block 0 and after the last block; without it the driver runs as described above.

Resumable: with ``checkpoint_dir`` the state is saved (orbax, atomically) after every block; a
rerun with the same arguments replays the finished blocks' forward passes and continues,
giving the result of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from epmq_jax.calib import _segments, awq
from epmq_jax.calib import full as full_mode
from epmq_jax.calib import stats as st
from epmq_jax.calib._placement import (
    Layout,
    Stash,
    embed_params,
    fill_params,
    gather_rows,
    gather_sum,
    per_device,
    place,
    sum_replicated,
    sum_rows,
    sum_scatter,
    tree_nbytes,
)
from epmq_jax.calib.adapter import CalibAdapter, get_path, key_path, set_path
from epmq_jax.calib.objectives import Objective, target_input
from epmq_jax.calib.solve import (
    ROUNDINGS,
    DampCenter,
    check_damping,
    check_spec,
    effective_kernel,
    finish_stats,
    layer_step,
    stat_float,
)
from epmq_jax.models import streamed
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
        :mod:`epmq_jax.calib.awq`; the adapter needs ``awq_groups``; objective ``gptq`` only)
        or ``none`` (keep W* in float).
      spec: the quantization grid (may be None with ``rounding="none"``).
      damp: size δ of the solve's damping, relative to the mean diagonal of H (0: none, unless
        H is not positive definite). A second anchor beside λ: see
        :mod:`epmq_jax.calib.solve`.
      damp_center: what the solve's damping pulls toward: ``merged`` (W_m) or ``zero`` (plain
        ridge, as GPTQ's).
      gptq_damp: GPTQ rounding's δ (default None: the same as ``damp``).
      block_size, act_order, static_groups: GPTQ options.
      awq: shorthand for ``rounding="awq"`` (overrides ``rounding``).
      awq_grid: number of AWQ scale ratios; awq_clip: AWQ's clipping search (never for q, k).
      batch_size: calibration samples per forward pass at most. The largest task (pooled
        tasks, see the module docstring, count as one) is split into as few batches as this
        allows, of even size, and every task is padded to that size (padding rows weigh 0):
        a few samples are not padded up to ``batch_size``.
      propagate: what feeds the next block: ``quantized`` (the calibrated block, GPTQ / E-PMQ's
        sequential mode) or ``float`` (the merged block, as the AWQ reference does). Default:
        ``float`` for AWQ, else ``quantized``.
      full: E-PMQ-full's switches (:class:`~epmq_jax.calib.full.FullConfig`; objective ``epmq``,
        rounding ``gptq``, ``rtn`` or ``none``), or None (E-PMQ and the other methods as they are).
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
    full: full_mode.FullConfig | None = None

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
        if self.rounder == "awq" and self.objective.kind != "gptq":
            raise ValueError(f"rounding='awq' is llm-awq on the model being quantized: it needs "
                             f"objective kind 'gptq', got {self.objective.kind!r}")
        if self.propagate not in (None, "quantized", "float"):
            raise ValueError(f"propagate must be 'quantized' or 'float', got {self.propagate!r}")
        if self.full is not None and not isinstance(self.full, full_mode.FullConfig):
            raise ValueError(f"full must be an epmq_jax.calib.full.FullConfig or None, got "
                             f"{type(self.full).__name__}")

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


def _full_path(block: tuple, rel: str) -> str:
    return "/".join(str(k) for k in block) + "/" + rel


def _kernel(block_params: PyTree, rel: str, where: str) -> jax.Array:
    try:
        w = get_path(block_params, key_path(rel))
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{where}: no kernel at '{rel}' in the block params") from None
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"{where}/{rel}: expected a 2-D kernel (d_in, d_out), got shape "
                         f"{getattr(w, 'shape', None)}")
    return w


# ----------------------------------------------------------------------------- the batches


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


def _batches(inputs: PyTree, batch_size: int, where: str, sharding) -> tuple[PyTree, jax.Array]:
    """One task's inputs as fixed-size batches ``(n_batches, batch_size, ...)`` and their mask
    ``(n_batches, batch_size)``; the last batch is filled by repeating real samples, masked out."""
    n = _n_samples(inputs, where)
    nb = -(-n // batch_size)
    idx = np.arange(nb * batch_size) % n
    stacked = jax.tree.map(lambda x: np.asarray(x)[idx].reshape((nb, batch_size) + np.shape(x)[1:]),
                           inputs)
    mask = (np.arange(nb * batch_size) < n).astype(np.float32).reshape(nb, batch_size)
    if sharding is not None:
        return jax.device_put((stacked, mask), sharding)
    return stacked, jnp.asarray(mask)


# ----------------------------------------------------------------------------- compiled pieces


def _rows_weight(cap: Any, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A capture (x or (x, w)) and the batch's sample mask -> (x, per-row weight over x.shape[:-1])."""
    x, w = cap if isinstance(cap, tuple) else (cap, None)
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
    w = m if w is None else w * m
    return x, jnp.broadcast_to(w, x.shape[:-1])


def _run_block(adapter, kind, block_params, carry):
    return adapter.run_block(kind, block_params, carry)


def _embed_all(adapter, params, inputs, layout: Layout | None = None):
    """Block 0's input carry of every batch: leaves ``(N', batch_size, ...)``.

    ``params`` may be a streamed tree (:mod:`epmq_jax.models.streamed`): only the leaves
    ``adapter.embed`` reads are read and transferred, in memory or not.
    """
    fill, used = embed_params(adapter, params, inputs, layout)
    return _embed_used(adapter, fill, layout, used, inputs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _embed_used(adapter, fill, layout, used, inputs):
    def run(used, inputs):
        params = fill_params(fill, used)
        return jax.lax.map(lambda b: adapter.embed(params, b), inputs)

    return per_device(run, layout, 1, 1)(used, inputs)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("layout",))
def _advance_all(adapter, kind, block_params, carry, layout=None):
    """Every batch through one block (no captures kept)."""
    def run(block_params, carry):
        return jax.lax.map(lambda c: adapter.run_block(kind, block_params, c)[0], carry)

    return per_device(run, layout, 1, 1)(block_params, carry)


@functools.partial(jax.jit, static_argnames=("plan", "layout"))
def _advance_segment(block_params, carry, residuals, plan, layout=None):
    """Every batch through the last segment of ``plan`` (:mod:`epmq_jax.calib._segments`): the
    block's output from the residuals its earlier segments handed on."""
    def run(block_params, carry, residuals):
        return jax.lax.map(lambda cr: plan.run(plan.n_groups, block_params, *cr)[0], (carry, residuals))

    return per_device(run, layout, 1, 2)(block_params, carry, tuple(residuals))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("layout", "full"))
def _expert_pass(adapter, kind, capture, expert_block, carry, layout=None, full=False):
    """A task's batches through its expert's block: ``(carry out, {path: input (n_batches, ...)})``
    for the kernel paths in ``capture`` (one per group; with ``full``, through E-PMQ-full's
    :func:`~epmq_jax.calib.full.run_block`, whose captures also hold the norms' inputs)."""
    def one(block, c):
        out, caps = (full_mode.run_block if full else _run_block)(adapter, kind, block, c)
        return out, {p: caps[p][0] if isinstance(caps[p], tuple) else caps[p] for p in capture}

    def run(block, carry):
        return jax.lax.map(functools.partial(one, block), carry)

    return per_device(run, layout, 1, 1)(expert_block, carry)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), static_argnames=("layout", "seg"),
                   donate_argnums=(9,))
def _task_moments(adapter, kind, group, objective, block_params, carry, mask, x_expert,
                  expert_kernels, total, layout=None, seg=None, residuals=()):
    """One task's moments for the layers of a group, in one scan over its batches, added with
    the task's weight ω_t into the running total.

    Each batch runs through the block up to the group's input (the rest of the block is dead
    code to XLA): from the block's input, or, with ``seg = (plan, g)``
    (:mod:`epmq_jax.calib._segments`), only segment g from the residuals the earlier segments
    handed on (``residuals``: stacked over the batches, ``()`` for g = 0).

    Args:
      group: the group's kernel paths (static); objective: its switches (static, λ unused).
      block_params: the block as it stands.
      carry: the task's carries on the quantized path, leaves ``(n_batches, batch_size, ...)``.
      mask: ``(n_batches, batch_size)``, 0 for padding samples.
      x_expert: the group's input on the task's expert path ``(n_batches, batch_size, ..., d_in)``
        or None.
      expert_kernels: ``{path: W_t}`` of the task's expert, or None (objectives without targets).
      total: the ω-weighted ``{path: Moments}`` of the tasks before, or None (its buffers are
        reused for the result).
      layout: None, or ``(Layout, h_rows, cols)`` (static): each device scans its own samples and
        the sums are added across devices in a fixed order (:mod:`epmq_jax.calib._placement`),
        H kept split over its rows when ``h_rows``, B over its columns where ``cols[i]`` (one
        flag per layer of the group).

    Returns:
      ``({path: Moments} with this task added, ω_t, the residuals segment g hands on (stacked;
      () without ``seg``))`` (H shared by the group).
    """
    def local(block_params, expert_kernels, carry, mask, x_expert, residuals):
        def capture(i):
            c = jax.tree.map(lambda a: a[i], carry)
            if seg is not None:
                plan, g = seg
                return plan.run(g, block_params, c, tuple(r[i] for r in residuals))
            _, caps = adapter.run_block(kind, block_params, c)
            missing = [p for p in group if p not in caps]
            if missing:
                raise ValueError(f"run_block captured no input for {missing} (captured: {sorted(caps)})")
            return caps[group[0]], ()

        def batch(i):
            cap, handed = capture(i)
            x, w = _rows_weight(cap, mask[i])
            m = st.moments(x, None, w)
            out = {"h": m.h, "n": m.n, "abs": m.abs_sum, "b": {}, "yy": {}}
            if expert_kernels is not None:
                xt = target_input(x, None if x_expert is None else x_expert[i], objective)
                for p in group:
                    y = jnp.matmul(xt.astype(jnp.float32), expert_kernels[p].astype(jnp.float32),
                                   precision=_HI)
                    out["b"][p], out["yy"][p] = st.cross_moments(x, y, w)
            return out, handed

        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch, 0)[0])

        def step(acc, i):
            out, handed = batch(i)
            return jax.tree.map(jnp.add, acc, out), handed

        return jax.lax.scan(step, zero, jnp.arange(mask.shape[0]))

    args = (block_params, expert_kernels, carry, mask, x_expert, tuple(residuals), total)
    if layout is None:
        acc, handed = local(*args[:-1])
        return (*_fold(acc, group, objective.task_weights, total, None), handed)
    return _across_devices(local, group, objective.task_weights, layout,
                           expert_kernels is not None, total is not None)(*args)


def _fold(acc, group, weighting, total, h_sq):
    """A task's sums ``acc`` as Moments per layer, added with ω_t into ``total``."""
    zero = jnp.zeros((), jnp.float32)
    new, omega = {}, None
    for p in group:
        task = st.Moments(acc["h"], acc["b"].get(p), acc["yy"].get(p, zero), acc["n"], acc["abs"])
        new[p], omega = st.fold_task(None if total is None else total[p], task, weighting,
                                     h_sq_sum=h_sq)
    return new, omega


def _across_devices(local, group, weighting, layout, targets: bool, has_total: bool):
    """``local``'s per-device sums (over each device's samples) added across devices in a fixed
    order and folded into the total: a ``shard_map`` over ``(block, expert kernels, carry, mask,
    x_expert, residuals, total)`` giving ``({path: Moments}, ω_t, residuals handed on)`` with H
    whole (or split over rows), B split over columns where the axis divides d_out, and the
    residuals split over samples as the carries are."""
    lay, h_rows, cols = layout
    axis, k = lay.axis, lay.size

    def body(block_params, expert_kernels, carry, mask, x_expert, residuals, total):
        acc, handed = local(block_params, expert_kernels, carry, mask, x_expert, residuals)
        rows = sum_rows(acc["h"], axis, k)      # this device's rows of H (zero-padded)
        out = {"h": rows if h_rows else gather_rows(rows, axis, acc["h"].shape[0]),
               "n": gather_sum(acc["n"], axis), "abs": gather_sum(acc["abs"], axis),
               "b": {}, "yy": {}}
        for p, c in zip(group, cols):
            if targets:
                b = acc["b"][p]
                out["b"][p] = sum_scatter(b, axis, k, 1) if c else sum_replicated(b, axis, k)
                out["yy"][p] = gather_sum(acc["yy"][p], axis)
        # ΣH² from the row blocks, the same whether H is then gathered or not
        return (*_fold(out, group, weighting, total, gather_sum(jnp.sum(rows * rows), axis)), handed)

    split = P(None, axis)
    moments = {p: st.Moments(P(axis, None) if h_rows else P(),
                             (P(None, axis) if c else P()) if targets else None, P(), P(), P())
               for p, c in zip(group, cols)}
    return jax.shard_map(body, mesh=lay.mesh,
                         in_specs=(P(), P(), split, split, split, split, moments if has_total else None),
                         out_specs=(moments, P(), split), check_vma=False)


# ----------------------------------------------------------------------------- input checks


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _check_inputs(params: PyTree, experts: Sequence[PyTree] | None,
                  task_inputs: Sequence[PyTree]) -> None:
    """Structure, shapes, dtypes and finiteness of everything, before any work (one sync)."""
    from epmq_jax._tree import leaves_with_paths
    from epmq_jax.merge._validate import flatten_inputs

    flatten_inputs(params, [streamed.abstract(e) if streamed.is_lazy(e) else e for e in experts or []],
                   ref_name="params", validate=True)     # streamed experts: shapes from headers
    named = [(f"task_inputs[{t}]" + (f" leaf '{p}'" if p else ""), x)
             for t, tree in enumerate(task_inputs) for p, x in leaves_with_paths(tree)
             if jnp.issubdtype(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                               jnp.inexact)]
    if named:
        flags = jax.device_get(_finite_flags([jnp.asarray(x) for _, x in named]))
        for (name, x), ok in zip(named, flags):
            if not ok:
                raise ValueError(f"{name} (shape {tuple(np.shape(x))}) contains NaN or inf")


def _poolable(config: CalibConfig, task_inputs: Sequence[PyTree], activation_budget) -> bool:
    """Whether the tasks' samples can be pooled into one stream of batches.

    With the ``gptq`` objective and uniform task weights the statistics are sums over all tasks'
    rows alike (H = Σ_t X_tᵀX_t, no targets), so the task boundaries do not matter: pooled,
    every batch is full (a task with a few samples is not padded up to a batch of its own) and
    there is one compiled pass per group instead of one per task. Not for AWQ (its clipping
    search samples rows as llm-awq does, per task), nor under an ``activation_budget`` (which
    moves one task's activations at a time), nor when the tasks' inputs differ in structure,
    trailing shapes or dtypes (they could not be concatenated).
    """
    obj = config.objective
    if (len(task_inputs) < 2 or obj.kind != "gptq" or obj.task_weights != "uniform"
            or config.rounder not in ("gptq", "none") or config.full is not None
            or activation_budget is not None):
        return False
    flat = [jax.tree.flatten(x) for x in task_inputs]
    if any(td != flat[0][1] for _, td in flat[1:]):
        return False
    sig = lambda x: (np.shape(x)[1:], np.dtype(getattr(x, "dtype", np.asarray(x).dtype)))  # noqa: E731
    return all([sig(a) for a in leaves] == [sig(a) for a in flat[0][0]] for leaves, _ in flat[1:])


def _pool(task_inputs: Sequence[PyTree]) -> PyTree:
    """All tasks' samples in one input tree, task after task (on the host, as batching is)."""
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *task_inputs)


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


def _check_sizes(activation_budget, h_rows_from, mesh) -> None:
    for name, v in (("activation_budget", activation_budget), ("h_rows_from", h_rows_from)):
        if v is not None and (not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name} must be None or an int >= 0 (bytes for activation_budget, "
                             f"d_in for h_rows_from), got {v!r}")
    if h_rows_from is not None and mesh is None:
        raise ValueError(f"h_rows_from={h_rows_from} splits H over the rows of a mesh axis: it "
                         "needs mesh=")


def calibrate(adapter: CalibAdapter, params: PyTree, task_inputs: Sequence[PyTree],
              config: CalibConfig = CalibConfig(), *, experts: Sequence[PyTree] | None = None,
              mesh: jax.sharding.Mesh | None = None, axis: str | None = None,
              checkpoint_dir: str | None = None, progress: bool = False,
              on_block: Callable[[int], None] | None = None, base: PyTree | None = None,
              activation_budget: int | None = None, h_rows_from: int | None = None,
              readout_heads: Sequence[Any] | None = None) -> CalibResult:
    """Calibrates every linear layer the adapter names, block by block (see the module docstring).

    Args:
      adapter: the model family's adapter (:class:`~epmq_jax.calib.adapter.CalibAdapter`).
      params: the model being calibrated (the merge), a pure nested-dict param tree; float32,
        bfloat16 or float16 kernels (each comes back in its own dtype; statistics, solves and
        rounding run in float32).
      task_inputs: T model-input pytrees (leading axis = samples), task t's calibration data.
      config: the objective, rounder and options (:class:`CalibConfig`).
      experts: T expert param trees, same structure, shapes and dtypes as ``params`` (needed by
        ``epmq`` and ``regmean``; task t's data runs through expert t): in memory, or streamed
        from disk (:class:`epmq_jax.models.streamed.CheckpointTree`, e.g.
        :func:`epmq_jax.models.llama.experts_from_pretrained`), read one block at a time.
      mesh: optional mesh; batches are split over ``axis`` along samples, each block's
        parameters, the statistics B and the solves over output channels (H whole on every
        device, or split over rows: ``h_rows_from``). ``batch_size`` is rounded up to a
        multiple of the axis size. The same mesh gives the same bits in one process or several.
      axis: mesh axis name (default: the mesh's first axis).
      checkpoint_dir: save progress there after every block and resume from it.
      progress: show a progress bar over blocks.
      on_block: called with the block index after each block is finished (calibrated, its
        outputs computed and checkpointed), e.g. for timing or logging.
      base: the pretrained params (same structure as ``params``), needed only by E-PMQ-full's
        extrapolated anchor (``config.full.rho != 1``).
      activation_budget: bytes per device for the calibration activations held between uses
        (every task's carries on the quantized and expert paths and the expert-side inputs of
        the block's groups; sizes in docs/adapters.md). A block whose activations exceed it keeps
        them in host memory and brings one task's to the device at a time (same results).
        None: always on the device.
      h_rows_from: with a mesh, the H of layers with ``d_in >= h_rows_from`` (when the axis
        divides d_in) is summed and held split over its rows between tasks, and gathered
        whole only for the layer's solve (see docs/adapters.md for the trade-off). None: H whole
        on every device.

    Every block forward (the model's own layers, for the captures and the next block's inputs)
    runs at ``Precision.HIGHEST`` (``jax.default_matmul_precision("highest")``), as the
    statistics, solves and rounders do: an accelerator's default (TF32, bf16 passes) would
    change the calibration data.

    Returns:
      :class:`CalibResult` (calibrated params and per-layer statistics).

    Raises:
      ValueError: missing or mismatched experts (the first differing leaf path is named), NaN or
        inf in an input, inputs without a common sample axis, an axis the mesh lacks, a kernel
        path the block lacks, a capture missing, a Hessian no damping makes positive definite,
        or a checkpoint of another run.
    """
    _check_sizes(activation_budget, h_rows_from, mesh)
    with jax.default_matmul_precision("highest"):
        return _calibrate(adapter, params, task_inputs, config, experts=experts, mesh=mesh, axis=axis,
                          checkpoint_dir=checkpoint_dir, progress=progress, on_block=on_block, base=base,
                          activation_budget=activation_budget, h_rows_from=h_rows_from,
                          readout_heads=readout_heads)


def _calibrate(adapter, params, task_inputs, config, *, experts, mesh, axis, checkpoint_dir, progress,
               on_block, base=None, activation_budget=None, h_rows_from=None,
               readout_heads=None) -> CalibResult:
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
    full = config.full
    if full is not None:
        full_mode.check(config, adapter, params, base, readout_heads, T)
        if full.leaves and any(streamed.is_lazy(e) for e in experts or []):
            raise ValueError("config.full.leaves (E-PMQ-full's stem and head, which read whole "
                             "expert trees) needs the experts in memory; got experts streamed from disk")
    _check_inputs(params, experts, task_inputs)
    sharding = layout = None
    if mesh is not None:
        sharding = NamedSharding(mesh, P(None, axis))     # (batches, samples, ...): samples split
        layout = Layout(mesh, axis)
    blocks = list(adapter.block_paths(params))
    if obj.kind == "gptq" and config.rounder == "rtn":   # data-free: no forward passes at all
        return _rtn_only(adapter, params, blocks, config, on_block)

    ckpt = None
    done, restored, stats = 0, {}, []
    if checkpoint_dir is not None:
        from epmq_jax.calib._resume import BlockCheckpointer, fingerprint

        lazy = [e.fingerprint() for e in experts or [] if streamed.is_lazy(e)]
        trees = (params, list(task_inputs), [e for e in experts or [] if not streamed.is_lazy(e)])
        if full is not None and full.rho != 1.0:
            trees += (base,)
        if full is not None and full.heads:
            trees += ([np.asarray(h) for h in readout_heads],)
        run_id = fingerprint(config, type(adapter).__qualname__, *lazy, trees=trees)
        ckpt = BlockCheckpointer(checkpoint_dir, run_id)
        state = ckpt.restore()
        if state is not None:
            done, restored, stats = state

    n_tasks = T
    streams = list(task_inputs)
    if _poolable(config, task_inputs, activation_budget):     # one stream of all tasks' samples
        streams, T = [_pool(task_inputs)], 1
    # as few batches as batch_size allows for the largest stream, of even size: a few samples
    # are not padded up to batch_size (one compiled shape for all streams)
    n_max = max(_n_samples(x, f"task_inputs[{t}]") for t, x in enumerate(streams))
    bs = -(-n_max // -(-n_max // config.batch_size))
    if mesh is not None:
        k = mesh.shape[axis]
        bs = -(-bs // k) * k
    batches = [_batches(x, bs, f"task_inputs[{t}]", sharding) for t, x in enumerate(streams)]
    del streams
    masks = [m for _, m in batches]
    kernels: dict[str, Any] = dict(restored)
    stem, head = full_mode.leaf_kinds(adapter, full)
    embed_params = params
    if stem is not None:       # E-PMQ-full: the stem before block 0 (restored when resuming)
        if done == 0:
            embed_params, stem_stats = _full_leaves(adapter, stem, params, base, experts,
                                                    [b for b, _ in batches], masks, config, kernels)
            stats += stem_stats
        else:
            embed_params = full_mode.replay(params, (), {f"/{p}": v for p, v in kernels.items()})
    q_carry = Stash(_embed_all(adapter, embed_params, b, layout) for b, _ in batches)
    e_carry = None
    if obj.needs_expert_inputs:
        e_carry = Stash(_embed_all(adapter, experts[t], b, layout) for t, (b, _) in enumerate(batches))
    del batches

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
        merged_block = place(get_path(params, bpath), layout)
        expert_blocks = None    # expert t's block k, read now when streamed (one block x T)
        if experts is not None:
            expert_blocks = [place(streamed.materialize(get_path(e, bpath)), layout) for e in experts]
        x_expert = Stash({} for _ in range(T))
        capture = tuple(g[0] for g in groups)   # also when replaying: the same program
        if full is not None:
            capture += _norm_paths(adapter, kind, full)
        plans = None                 # run_block split at the groups' inputs: each op once per block
        if full is None and config.rounder != "awq" and k >= done:
            plans = [_segments.plan(adapter, kind, groups, merged_block, _batch_abstract(q_carry, t, layout))
                     for t in range(T)]     # one per shape (cached): tasks may differ in length
            plans = None if None in plans else plans
        spill = _over_budget(activation_budget, layout, q_carry, e_carry, adapter, kind, capture,
                             expert_blocks, full is not None)
        if plans is not None and (spill or _split_too_big(
                activation_budget, plans, layout, q_carry, e_carry, adapter, kind, capture, expert_blocks)):
            plans = None             # the residuals would not fit beside the activations: whole blocks
        residuals = None if plans is None else [() for _ in range(T)]
        q_carry.spill = x_expert.spill = spill
        if e_carry is not None:      # one pass per task through its expert's block
            e_carry.spill = spill    # (also when replaying: the same program)
            for t in range(T):
                e_carry[t], x_expert[t] = _expert_pass(adapter, kind, capture, expert_blocks[t],
                                                       e_carry[t], layout=layout, full=full is not None)
        block, pending = merged_block, []
        if full is not None:         # E-PMQ-full: norms and groups of the block (full.calibrate_block)
            weighted = full.tokens and k >= len(blocks) - full.token_reach
            if k < done:
                block = full_mode.replay(block, bpath, kernels)
            else:
                anchor = full_mode.anchor_tree(merged_block, None if base is None else get_path(base, bpath),
                                               full.rho)
                block, pending = full_mode.calibrate_block(
                    adapter, kind, block, anchor, expert_blocks, q_carry, x_expert, masks, config, where,
                    weighted=weighted)
            groups = ()
        if config.rounder == "awq":    # whole blocks: shared scales folded into the ops before them
            if k >= done:
                changed, block_stats = awq.calibrate_block(
                    adapter, kind, merged_block, _per_batch([q_carry[t] for t in range(T)]),
                    _per_batch(masks),
                    config.spec, where=where, **config.rounder_options())
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
                    block = set_path(block, key_path(rel), effective_kernel(q))
                continue
            block, layers = _calibrate_group(
                adapter, kind, group, block, merged_block, expert_blocks, q_carry,
                x_expert.column(group[0]), masks, config, mesh, axis, where,
                h_rows_from=h_rows_from, seg=None if plans is None else (plans, gi), residuals=residuals)
            pending += [(gi, *layer) for layer in layers]
        del x_expert, expert_blocks
        out_block = merged_block if config.propagate_float else block
        for t in range(T):
            if plans is not None and groups and not config.propagate_float:
                q_carry[t] = _advance_segment(block, q_carry[t], residuals[t], plan=plans[t], layout=layout)
                residuals[t] = ()
            else:
                q_carry[t] = _advance_all(adapter, kind, out_block, q_carry[t], layout=layout)
        del residuals
        if pending:
            stats += (full_mode.finish_block(pending, k, config, bpath, kernels, weighted) if full is not None
                      else _finish_block(pending, k, config, bpath, kernels, n_tasks))
            block_time = time.perf_counter() - t0
            for s in stats[-len(pending):]:
                s["block_time_s"] = block_time
        if ckpt is not None and k >= done:
            ckpt.save(k + 1, dict(kernels), stats)
        if on_block is not None:
            q_carry.block_until_ready()
            on_block(k)
    if head is not None:       # E-PMQ-full: the head after the last block
        readout = full_mode.readout_metrics(readout_heads) if full.heads else None
        stats += _full_leaves(adapter, head, embed_params, base, experts, q_carry, masks, config, kernels,
                              e_carry, readout)[1]
    out_params = params
    for path, q in kernels.items():
        out_params = set_path(out_params, key_path(path), q)
    return CalibResult(out_params, stats)


def _batch_abstract(carries: Stash, t: int, layout: Layout | None) -> PyTree:
    """One batch of task t's stored carries (one device's share on a mesh), as ``ShapeDtypeStruct`` s."""
    k = 1 if layout is None else layout.size
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((a.shape[1] // k, *a.shape[2:]), a.dtype),
                        carries.abstract(t))


def _norm_paths(adapter, kind, full) -> tuple[str, ...]:
    """The extra captures E-PMQ-full's expert passes keep: the norms' ẑ, the residual streams."""
    paths = tuple(n.path for n in adapter.full_norms(kind)) if full.norms else ()
    return paths + tuple(f"{n}:input" for _, n in full_mode.residual_pairs(adapter, kind, full))


def _full_leaves(adapter, kind, params, base, experts, carries, masks, config: CalibConfig, kernels: dict,
                 e_carry=None, readout=None) -> tuple[Any, list[dict]]:
    """E-PMQ-full on a stem or head pseudo block (whole param trees, float solves).

    ``carries``: per task the stacked model inputs (stem) or last-block outputs (head); the
    expert side runs the same inputs (stem) or ``e_carry`` (head) through each expert.
    ``readout``: the tasks' output metrics for the head's last layer (``heads``), or None.

    Returns:
      ``(params with the pseudo block's leaves calibrated, statistics)``; the leaves are also
      recorded in ``kernels``.
    """
    t0 = time.perf_counter()
    full = config.full
    capture = tuple(g[0] for g in adapter.linear_groups(kind)) + _norm_paths(adapter, kind, full)
    x_expert = [{}] * len(carries)
    if config.objective.needs_expert_inputs and capture:
        sources = carries if e_carry is None else e_carry
        x_expert = [_expert_pass(adapter, kind, capture, experts[t], sources[t], full=True)[1]
                    for t in range(len(carries))]
    anchor = full_mode.anchor_tree(params, base, full.rho)
    out, pending = full_mode.calibrate_block(adapter, kind, params, anchor, experts, carries, x_expert, masks,
                                             config, kind, weighted=False, float_only=True, readout=readout)
    stats = full_mode.finish_block(pending, kind, config, (), kernels, False)
    for s in stats:
        s["block_time_s"] = time.perf_counter() - t0
    return out, stats


# Without an activation_budget a block splits only while the values its passes hand on stay
# within this many bytes per device or this many times the carries, whichever is larger
_UNBUDGETED_SPLIT_BYTES = 2 << 30
_UNBUDGETED_SPLIT_CARRIES = 3


def _split_too_big(budget, plans, layout, q_carry: Stash, e_carry: Stash | None, *args) -> bool:
    """Whether the values the split block passes hand on (all tasks) do not fit: beside the
    activations in ``budget`` (bytes per device), or without a budget in
    :data:`_UNBUDGETED_SPLIT_BYTES` or :data:`_UNBUDGETED_SPLIT_CARRIES` times the carries,
    whichever is larger)."""
    k = 1 if layout is None else layout.size
    handed = sum(p.residual_bytes * jax.tree.leaves(q_carry.abstract(t))[0].shape[0] * k
                 for t, p in enumerate(plans))
    if budget is None:
        carries = q_carry.nbytes() + (0 if e_carry is None else e_carry.nbytes())
        return handed > max(_UNBUDGETED_SPLIT_BYTES * k, _UNBUDGETED_SPLIT_CARRIES * carries)
    return _over_budget(budget, layout, q_carry, e_carry, *args, False, extra=handed)


def _over_budget(budget, layout, q_carry: Stash, e_carry: Stash | None, adapter, kind, capture,
                 expert_blocks, full: bool, extra: int = 0) -> bool:
    """Whether this block's activations (carries of both paths, expert-side group inputs, and
    ``extra`` bytes) exceed ``budget`` bytes per device (the mesh axis splits them evenly)."""
    if budget is None:
        return False
    need = q_carry.nbytes() + extra
    if e_carry is not None:
        need += e_carry.nbytes()
        for t in range(len(e_carry)):     # shapes only: nothing is computed or moved
            shapes = jax.eval_shape(functools.partial(_expert_pass, adapter, kind, capture,
                                                      layout=layout, full=full),
                                    expert_blocks[t], e_carry.abstract(t))
            need += tree_nbytes(shapes[1])
    return need / (1 if layout is None else layout.size) > budget


def _finish_block(pending, k: int, config: CalibConfig, bpath, kernels: dict, n_tasks: int) -> list[dict]:
    """Fetches a block's statistics at once (one host round trip), checks them, records the kernels.

    ``n_tasks``: the number of tasks (one ω_t each; pooled tasks all have ω_t = 1)."""
    raw = jax.device_get([(r, n, om) for _, _, _, _, r, n, om in pending])
    out = []
    for (gi, rel, q, shape, _, _, _), (r, n, om) in zip(pending, raw):
        path = _full_path(bpath, rel)
        s = finish_stats(r, path=path, shape=shape, objective=config.objective,
                         rounding=config.rounder, damp=config.damp,
                         damp_center=config.damp_center, gptq_damp=config.gptq_damp)
        omegas = [stat_float(o) for o in om]
        if len(omegas) != n_tasks:       # pooled: one sum over all tasks' rows, every ω_t = 1
            omegas = omegas * n_tasks
        s.update(block=k, group=gi, n_rows=stat_float(n), task_weights=omegas)
        kernels[path] = q
        out.append(s)
    return out


def _per_batch(stacked: Sequence[PyTree]) -> list[list[PyTree]]:
    """Per task, the stacked batches ``(n_batches, batch, ...)`` as a list of single batches."""
    return [[jax.tree.map(lambda x, i=i: x[i], tree) for i in range(jax.tree.leaves(tree)[0].shape[0])]
            for tree in stacked]


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
                out = set_path(out, [*bpath, *key_path(rel)], q)
                stats.append({"path": f"{where}/{rel}", "block": k, "group": gi, "rounding": "rtn"})
        jax.block_until_ready(out)
        for s in stats[first:]:
            s["block_time_s"] = time.perf_counter() - t0
        if on_block is not None:
            on_block(k)
    return CalibResult(out, stats)


def _calibrate_group(adapter, kind, group, block, merged_block, expert_blocks, q_carry, x_expert,
                     masks, config: CalibConfig, mesh, axis, where, h_rows_from=None, seg=None,
                     residuals=None):
    """Statistics, solve and rounding for one group of layers, all dispatched without waiting.

    Tasks are processed one after the other (each task's batches in one compiled scan), so the
    statistics hold two accumulators whatever the number of tasks. With ``seg = (plans, g)`` each
    task's batches run only segment g of the block (``plans[t]``, :mod:`epmq_jax.calib._segments`)
    from ``residuals[t]``, which is replaced by the residuals segment g hands on.

    Returns:
      ``(updated block, [(rel, q, (d_in, d_in), raw stats, n_rows, [ω_t])])``; the raw statistics
      are device scalars for :func:`_finish_block`. (Rounders that work on a whole group or
      block, e.g. AWQ with scales shared by the layers of a group, replace the per-layer loop
      below.)
    """
    obj = config.objective
    # λ, the anchor and the damping do not enter the batch statistics: one compilation for all
    static_obj = dataclasses.replace(obj, lam=0.0, anchor="output")
    shapes = [_kernel(block, p, where).shape for p in group]
    layout = None
    if mesh is not None:      # (Layout, H split over rows?, B split over columns? per layer)
        lay = Layout(mesh, axis)
        d_in = shapes[0][0]
        h_rows = h_rows_from is not None and d_in >= h_rows_from and d_in % lay.size == 0
        layout = (lay, h_rows, tuple(lay.columns(s) for s in shapes))
    total, omegas = None, []
    for t in range(len(q_carry)):
        e_kern = None
        if obj.needs_targets:
            e_kern = {p: _kernel(expert_blocks[t], p, f"experts[{t}]/{where}") for p in group}
        total, omega, handed = _task_moments(adapter, kind, group, static_obj, block, q_carry[t], masks[t],
                                             x_expert[t], e_kern, total, layout=layout,
                                             seg=None if seg is None else (seg[0][t], seg[1]),
                                             residuals=() if seg is None else residuals[t])
        if seg is not None:
            residuals[t] = handed
        omegas.append(omega)
    columns = None if mesh is None else (mesh, axis)
    results = []
    for rel in group:
        w_m = _kernel(merged_block, rel, where)
        m = total[rel]
        if layout is not None and layout[1]:      # H split over rows: whole for the solve
            m = m._replace(h=jax.device_put(m.h, NamedSharding(mesh, P())))
        cols = columns if mesh is not None and w_m.shape[1] % mesh.shape[axis] == 0 else None
        w_m = _place_columns(w_m, mesh, axis)
        if m.b is not None:
            m = m._replace(b=_place_columns(m.b, mesh, axis))
        q, eff, raw = layer_step(obj, m, w_m, config.spec, rounding=config.rounder,
                                 damp=config.damp, damp_center=config.damp_center,
                                 gptq_damp=config.gptq_damp, columns=cols,
                                 **config.rounder_options())
        block = set_path(block, key_path(rel), eff)
        results.append((rel, q, (w_m.shape[0],) * 2, raw, m.n, omegas))
    return block, results

"""Where the calibration driver's arrays live, for runs at LLM size: on a mesh, in host memory.

- **Parameters** (:func:`place`): a block's arrays are put on the device(s) once when the driver
  reaches the block; on a mesh, every leaf of two or more dimensions is split over its last axis
  (output channels of a Flax kernel ``(d_in, d_out)``) when the axis size divides it, the rest
  replicated.
- **Data-parallel programs** (:func:`per_device`): with a mesh, a forward pass runs as a
  ``shard_map`` over the sample axis with the block's parameters gathered (replicated) inside, so
  each device computes its own samples and no result depends on a cross-device reduction.
- **Fixed-order sums across devices** (:func:`sum_scatter`, :func:`sum_replicated`,
  :func:`gather_sum`, :func:`fixed_total`): XLA's all-reduce adds the devices' partial sums in
  an order the transport picks (in-process and gloo collectives differ in the last bit), so the
  driver moves partial sums with ``all_to_all`` / ``all_gather`` (exact) and adds them in device
  order on each device: the same mesh gives the same bits whether its devices sit in one
  process or several.
- **Embedding from a few leaves** (:func:`embed_params`): only the leaves the adapter's
  ``embed`` reads (found from its jaxpr, nothing computed) are read from a streamed expert and
  put on the device; the others are zeros made inside the compiled program (dead code to XLA).
- **Activations spilled to host memory** (:class:`Stash`): per-task activation trees kept on the
  device, or in host memory (NumPy, one array per addressable shard, so multi-host arrays spill
  too) and brought back only while in use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from epmq_jax._tree import leaves_with_paths
from epmq_jax.calib.adapter import get_path, key_path
from epmq_jax.models import streamed

PyTree = Any


class Layout(NamedTuple):
    """A mesh and the axis that splits samples (batches) and output channels (kernels, B)."""

    mesh: jax.sharding.Mesh
    axis: str

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    def columns(self, shape: Sequence[int]) -> bool:
        """Whether an array of ``shape`` (>= 2-D) is split over its last axis."""
        return len(shape) >= 2 and shape[-1] % self.size == 0

    def leaf_sharding(self, shape: Sequence[int]) -> NamedSharding:
        spec = P(*([None] * (len(shape) - 1)), self.axis) if self.columns(shape) else P()
        return NamedSharding(self.mesh, spec)


def place(tree: PyTree, layout: Layout | None) -> PyTree:
    """``tree``'s arrays on the device (``layout`` None: the default device), or on the mesh:
    leaves of two or more dimensions split over their last axis where the axis size divides
    it, the rest replicated. Arrays already placed so are not copied."""
    if layout is None:
        return jax.device_put(tree)
    return jax.device_put(tree, jax.tree.map(lambda x: layout.leaf_sharding(np.shape(x)), tree))


def per_device(fn: Callable, layout: Layout | None, n_replicated: int, n_split: int,
               out: Any = None) -> Callable:
    """``fn(*replicated, *split)`` as a data-parallel program on the layout's mesh.

    The first ``n_replicated`` arguments (parameters) are whole on every device; the next
    ``n_split`` (batches ``(n_batches, batch, ...)``, every leaf) are split over the batch axis
    (axis 1), and so is every output leaf unless ``out`` gives the output's specs. Without a
    layout, ``fn`` itself.
    """
    if layout is None:
        return fn
    split = P(None, layout.axis)
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=(P(),) * n_replicated + (split,) * n_split,
                         out_specs=split if out is None else out, check_vma=False)


# ----------------------------------------------------------------------------- fixed-order sums


def sum_scatter(x: jax.Array, axis: str, k: int, dim: int) -> jax.Array:
    """Σ over the ``k`` devices of ``axis`` of their ``x``, device j keeping the j-th of k equal
    slices along ``dim`` (inside ``shard_map``). The slices travel by ``all_to_all`` (exact) and
    are added in device order, so the bits do not depend on the collectives' implementation."""
    parts = jnp.stack(jnp.split(x, k, axis=dim))
    return jnp.sum(jax.lax.all_to_all(parts, axis, 0, 0, tiled=False), axis=0)


def sum_rows(x: jax.Array, axis: str, k: int) -> jax.Array:
    """:func:`sum_scatter` over rows, ``x`` padded with zero rows to a multiple of k."""
    pad = -x.shape[0] % k
    return sum_scatter(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x, axis, k, 0)


def gather_rows(rows: jax.Array, axis: str, n: int) -> jax.Array:
    """The whole array from each device's block of :func:`sum_rows` (an exact ``all_gather``),
    cut to its ``n`` rows."""
    return jax.lax.all_gather(rows, axis, tiled=True)[:n]


def sum_replicated(x: jax.Array, axis: str, k: int) -> jax.Array:
    """Σ over the devices of ``axis`` of their ``x``, whole on every device, in a fixed order."""
    return gather_rows(sum_rows(x, axis, k), axis, x.shape[0])


def gather_sum(x: jax.Array, axis: str) -> jax.Array:
    """Σ over the devices of ``axis`` of a small ``x`` (a scalar, a vector): all gathered, then
    added in device order on every device."""
    return jnp.sum(jax.lax.all_gather(x, axis), axis=0)


def fixed_total(columns: tuple | None) -> Callable[[jax.Array], jax.Array]:
    """Σ of all entries of a ``(d_in, d_out)`` array, for reported objectives: ``jnp.sum`` on
    one device; with ``columns = (mesh, axis)`` (the columns split over devices) the per-column
    sums are gathered to every device (exact) and added there, so the value is the same
    whatever the process layout (a scalar all-reduce is not)."""
    if columns is None:
        return jnp.sum
    whole = NamedSharding(columns[0], P())
    return lambda x: jnp.sum(jax.lax.with_sharding_constraint(jnp.sum(x, axis=0), whole))


# ----------------------------------------------------------------------------- the embedding


class _Fill(NamedTuple):
    """Static description of a param tree whose unread leaves are zeros made in the program."""

    treedef: Any
    zeros: tuple   # per leaf: None (passed in) or (shape, dtype name)


def _live_inputs(closed: Any) -> list[bool]:
    """Which inputs of a jaxpr its outputs depend on (backwards over the equations; an
    equation with effects, or with a live output, keeps all of its inputs)."""
    jaxpr = closed.jaxpr
    live = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
    return [v in live for v in jaxpr.invars]


def embed_params(adapter: Any, tree: PyTree, inputs: PyTree, layout: Layout | None
                 ) -> tuple[_Fill, list[jax.Array]]:
    """The leaves of ``tree`` (in memory or streamed) that ``adapter.embed`` reads, placed.

    Args:
      inputs: one task's stacked batches ``(n_batches, batch, ...)`` (their shapes only).

    Returns:
      ``(fill, leaves)`` for :func:`fill_params`: the read leaves on the device(s) (nothing else
      of ``tree`` is read or transferred).
    """
    spec = streamed.abstract(tree)
    flat, treedef = jax.tree_util.tree_flatten(spec)
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), inputs)
    live = _live_inputs(jax.make_jaxpr(adapter.embed)(spec, one))[: len(flat)]
    paths = [p for p, _ in leaves_with_paths(spec)]
    used = [get_path(tree, key_path(p)) for p, on in zip(paths, live) if on]   # streamed: read now
    zeros = tuple(None if on else (tuple(s.shape), np.dtype(s.dtype).name) for s, on in zip(flat, live))
    return _Fill(treedef, zeros), place(used, layout)


def fill_params(fill: _Fill, used: Sequence[jax.Array]) -> PyTree:
    """Inside a compiled program: the whole param tree, unread leaves as zeros."""
    it = iter(used)
    leaves = [next(it) if z is None else jnp.zeros(z[0], z[1]) for z in fill.zeros]
    return jax.tree_util.tree_unflatten(fill.treedef, leaves)


# ----------------------------------------------------------------------------- host spilling


@dataclasses.dataclass(frozen=True)
class _OnHost:
    """A device array's addressable shards in host memory (NumPy), and where they go back
    (a plain class, not a pytree node: tree maps stop at it)."""

    shape: tuple
    dtype: np.dtype
    sharding: jax.sharding.Sharding
    shards: tuple   # ((device, np.ndarray), ...)


def _to_host(x: jax.Array) -> _OnHost:
    return _OnHost(x.shape, x.dtype, x.sharding,
                   tuple((s.device, np.asarray(s.data)) for s in x.addressable_shards))


def _to_device(h: _OnHost) -> jax.Array:
    arrays = [jax.device_put(data, device) for device, data in h.shards]
    return jax.make_array_from_single_device_arrays(h.shape, h.sharding, arrays)


def _is_on_host(x: Any) -> bool:
    return isinstance(x, _OnHost)


class Stash:
    """Per-task activation trees (carries, captures), on the device or spilled to host memory.

    ``stash[t] = tree`` stores (moving the arrays to host memory while :attr:`spill` is on);
    ``stash[t]`` gives the tree on its devices (copied back when spilled). Spilling copies each
    addressable shard to a NumPy array and restores it with the same sharding, so a spilled
    run computes exactly what an unspilled one does.

    Attributes:
      moved: number of arrays copied to host memory so far (for tests and logs).
    """

    def __init__(self, items: Iterable[PyTree] = ()):
        self._spill, self.moved = False, 0
        self._items: list[PyTree] = list(items)

    @property
    def spill(self) -> bool:
        """Whether stored trees go to host memory; switching it on moves those on the device."""
        return self._spill

    @spill.setter
    def spill(self, on: bool) -> None:
        self._spill = bool(on)
        if on:
            for t, tree in enumerate(self._items):
                self[t] = tree

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, t: int, tree: PyTree) -> None:
        if self._spill:
            def move(x):
                if _is_on_host(x):
                    return x
                self.moved += 1
                return _to_host(x)

            tree = jax.tree.map(move, tree, is_leaf=_is_on_host)
        self._items[t] = tree

    def __getitem__(self, t: int) -> PyTree:
        return _back(self._items[t])

    def get(self, t: int, key: Any) -> PyTree:
        """``stash[t][key]`` of a dict-valued item (None if absent), bringing back only that entry."""
        return _back(self._items[t].get(key))

    def column(self, key: Any) -> _Column:
        """A sequence view ``view[t] = stash.get(t, key)``."""
        return _Column(self, key)

    def abstract(self, t: int) -> PyTree:
        """Item ``t`` as ``jax.ShapeDtypeStruct`` leaves with their shardings (nothing moved)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self._items[t], is_leaf=_is_on_host)

    def nbytes(self) -> int:
        """Bytes of the stored arrays (global shapes), on the device or in host memory."""
        return tree_nbytes(jax.tree.leaves(self._items, is_leaf=_is_on_host))

    def block_until_ready(self) -> None:
        """Waits for the arrays still being computed on the device."""
        jax.block_until_ready([x for x in jax.tree.leaves(self._items, is_leaf=_is_on_host)
                               if not _is_on_host(x)])


def _back(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: _to_device(x) if _is_on_host(x) else x, tree, is_leaf=_is_on_host)


class _Column:
    def __init__(self, stash: Stash, key: Any):
        self._stash, self._key = stash, key

    def __len__(self) -> int:
        return len(self._stash)

    def __getitem__(self, t: int) -> PyTree:
        return self._stash.get(t, self._key)


def tree_nbytes(tree: PyTree) -> int:
    """Bytes of the arrays (``jax.ShapeDtypeStruct``, spilled arrays) of ``tree``."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree, is_leaf=_is_on_host))

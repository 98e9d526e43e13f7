"""Mesh helpers: how kernels and solvers are laid out over devices.

Solvers are written once for whole arrays and sharded by placing their inputs: a Flax kernel
``(d_in, d_out)`` is split over its output channels (the columns are independent given the
input statistics), statistics ``H (d_in, d_in)`` are replicated. Meshes use ``Auto`` axis
types so that ``jit`` propagates these shardings through the solvers. :func:`gather_to_host`
brings a multi-host result to every process for a single-process writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def make_mesh(axis_names: Sequence[str] = ("model",), axis_shapes: Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with ``Auto`` axes over ``devices`` (default: all).

    Args:
      axis_names: mesh axis names.
      axis_shapes: size of each axis; default puts every device on the first axis.
      devices: the devices to use.

    Returns:
      The ``jax.sharding.Mesh``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if axis_shapes is None:
        axis_shapes = (len(devices),) + (1,) * (len(axis_names) - 1)
    if int(np.prod(axis_shapes)) != len(devices) or len(axis_shapes) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(axis_shapes)} for axes {tuple(axis_names)} does not "
                         f"match {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(axis_shapes), tuple(axis_names),
                axis_types=(AxisType.Auto,) * len(axis_names))


def shard_columns(w: jax.Array, mesh: Mesh, axis: str | None = None) -> jax.Array:
    """Places a ``(..., d_out)`` array on ``mesh`` split over its last axis (output channels).

    Args:
      w: e.g. a kernel ``(d_in, d_out)``; ``d_out`` must be divisible by the axis size.
      mesh: the mesh.
      axis: mesh axis to split over (default: the mesh's first axis).
    """
    axis = mesh.axis_names[0] if axis is None else axis
    if w.shape[-1] % mesh.shape[axis]:
        raise ValueError(f"cannot split d_out={w.shape[-1]} of shape {tuple(w.shape)} over "
                         f"mesh axis {axis!r} of size {mesh.shape[axis]}")
    spec = PartitionSpec(*([None] * (w.ndim - 1)), axis)
    return jax.device_put(w, NamedSharding(mesh, spec))


def replicate(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Places ``x`` on every device of ``mesh``."""
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


def gather_to_host(tree: Any) -> Any:
    """Every array of ``tree`` whole, as NumPy, in every process (multi-host: a collective, so
    every process must call it).

    Arrays spread over several processes (a multi-host mesh) are gathered with
    ``jax.experimental.multihost_utils.process_allgather``; arrays a process holds whole
    (replicated, or on its own devices) are read locally. ``QuantizedWeight`` leaves come back
    as ``QuantizedWeight`` with NumPy fields. Use it before a single-process writer, e.g.
    ``tree = gather_to_host(result.params)``, then ``if jax.process_index() == 0:
    epmq_jax.checkpoint.save(path, tree)``.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)

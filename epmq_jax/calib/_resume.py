"""The driver's per-block checkpoint (orbax): calibrated kernels of finished blocks + stats.

A checkpoint step ``k`` holds everything needed to resume after ``k`` finished blocks: the
calibrated kernels (``QuantizedWeight`` fields or float W*), the per-layer statistics and a
fingerprint of the run, so a checkpoint of a different run is refused rather than mixed in.
Activations are not stored: on resume the driver replays the finished blocks' forward passes
(cheap next to calibrating them). orbax writes each step to a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous step readable.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp

from epmq_jax.quant import QuantizedWeight

_QW_FIELDS = ("packed", "scales", "zeros", "g_idx", "input_scale")
_QW_META = ("bits", "group_size", "symmetric", "shape", "dtype")


@jax.jit
def _checksum(tree: Any) -> jax.Array:
    """Two position-weighted sums over all leaves: tells apart trees of equal shapes but other values."""
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.stack([sum((i + 1.0) * jnp.sum(x) for i, x in enumerate(leaves)),
                      sum(jnp.sum(x * x) for x in leaves)])


def fingerprint(*parts: Any, trees: Any = ()) -> str:
    """A short stable hash of the run: ``parts`` by repr (config, ...), ``trees`` (params,
    experts, inputs) by structure, shapes, dtypes and value checksums."""
    desc = [repr(p) for p in parts]
    for tree in trees:
        desc.append(repr(jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)))
        desc.append(repr(jax.device_get(_checksum(tree)).tolist()))
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def _encode(q) -> tuple[dict, dict]:
    if isinstance(q, QuantizedWeight):
        arrays = {f: getattr(q, f) for f in _QW_FIELDS if getattr(q, f) is not None}
        meta = {f: getattr(q, f) for f in _QW_META}
        meta["shape"] = list(meta["shape"])
        return arrays, {"kind": "quantized", **meta}
    return {"float": q}, {"kind": "float"}


def _decode(arrays: dict, meta: dict):
    if meta["kind"] == "float":
        return jnp.asarray(arrays["float"])
    fields = {f: jnp.asarray(arrays[f]) if f in arrays else None for f in _QW_FIELDS}
    return QuantizedWeight(**fields, bits=meta["bits"], group_size=meta["group_size"],
                           symmetric=meta["symmetric"], shape=tuple(meta["shape"]), dtype=meta["dtype"])


class BlockCheckpointer:
    """Saves / restores the driver's progress in ``directory`` (one orbax step per finished block)."""

    def __init__(self, directory: str, run_id: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.run_id = run_id
        opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                            enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(str(directory), options=opts)

    def save(self, n_done: int, kernels: dict[str, Any], stats: list[dict]) -> None:
        """Writes the state after ``n_done`` finished blocks; ``kernels``: full leaf path -> q."""
        paths = sorted(kernels)
        arrays, metas = {}, []
        for i, p in enumerate(paths):
            a, m = _encode(kernels[p])
            arrays[f"k{i}"] = a
            metas.append({"path": p, **m})
        ocp = self._ocp
        meta = {"run_id": self.run_id, "n_done": n_done, "kernels": metas, "stats": stats}
        self.manager.save(n_done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self) -> tuple[int, dict[str, Any], list[dict]] | None:
        """``(n_done, kernels, stats)`` of the latest step, or None when there is none.

        Raises:
          ValueError: the checkpoint belongs to a different run (other config, data or model).
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta["run_id"] != self.run_id:
            raise ValueError(f"checkpoint in {self.manager.directory} belongs to another run "
                             f"(id {meta['run_id']}, this run {self.run_id}); use a fresh directory")
        arrays = {}
        if meta["kernels"]:
            arrays = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore())).state
        kernels = {m["path"]: _decode(jax.tree.map(jnp.asarray, arrays[f"k{i}"]), m)
                   for i, m in enumerate(meta["kernels"])}
        return int(meta["n_done"]), kernels, meta["stats"]

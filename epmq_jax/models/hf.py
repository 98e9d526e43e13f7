"""Loading Hugging Face checkpoints into the Flax models, with numpy only (no torch).

- :func:`resolve_checkpoint`: a local directory, or a hub repo id (downloaded with
  ``huggingface_hub`` when online; offline, only the local cache is used; failures raise at once).
- :func:`read_safetensors`: ``model.safetensors`` or a sharded ``model.safetensors.index.json``
  -> ``{name: np.ndarray}`` (a direct reader of the safetensors format, so bfloat16/float16
  tensors load too; they are cast to float32).
- :func:`load_into`: assigns HF tensors into an nnx module by name, converting layouts
  (Linear ``weight (out, in)`` -> ``kernel (in, out)``, conv OIHW -> HWIO, LayerNorm
  ``weight`` -> ``scale``, Embedding ``weight`` -> ``embedding``) and raising
  :class:`CheckpointMismatchError` listing unknown, missing and shape-mismatched keys.
- :func:`from_pretrained`: the whole thing, dispatching on ``config.json``'s ``model_type`` to
  the family module's ``from_hf(config: dict, tensors: dict) -> nnx.Module``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from epmq_jax._tree import path_str

#: ``config.json`` ``model_type`` -> module defining ``from_hf(config, tensors)``.
FAMILIES: dict[str, str] = {
    "clip": "epmq_jax.models.clip",
    "clip_vision_model": "epmq_jax.models.clip",
    "bert": "epmq_jax.models.bert",
    "t5": "epmq_jax.models.t5",
    "llama": "epmq_jax.models.llama",
    "mistral": "epmq_jax.models.llama",
    "qwen2": "epmq_jax.models.llama",
    "qwen3": "epmq_jax.models.llama",
}

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model.

    Attributes:
        unknown: checkpoint names with no place in the model.
        missing: model paths that no checkpoint tensor fills.
        mismatched: ``(checkpoint name, model path, checkpoint shape after layout conversion,
            model shape)`` tuples.
    """

    def __init__(self, unknown: list[str], missing: list[str],
                 mismatched: list[tuple[str, str, tuple, tuple]]):
        self.unknown, self.missing, self.mismatched = unknown, missing, mismatched
        lines = ["checkpoint does not match the model:"]
        if unknown:
            lines.append(f"  unknown checkpoint keys ({len(unknown)}): " + ", ".join(unknown))
        if missing:
            lines.append(f"  missing model params ({len(missing)}): " + ", ".join(missing))
        for name, path, got, want in mismatched:
            lines.append(f"  shape mismatch: {name} -> {path}: checkpoint {got}, model {want}")
        super().__init__("\n".join(lines))


def _read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    """One ``.safetensors`` file -> ``{name: array}``; floating tensors are cast to float32."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(path.stat().st_size - 8 - n)  # writable, so the arrays are too
        f.readinto(data)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        arr = np.frombuffer(data, dtype, (end - start) // dtype.itemsize, start)
        arr = arr.reshape(info["shape"])
        if np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16:
            arr = arr.astype(np.float32, copy=False)
        out[name] = arr
    return out


def read_safetensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads all weights of a checkpoint directory.

    Args:
        directory: holds ``model.safetensors``, or ``model.safetensors.index.json`` and the
            shards its ``weight_map`` names.

    Returns:
        ``{tensor name: np.ndarray}`` in Hugging Face (torch) layout; floats as float32.
    """
    d = Path(directory)
    if (d / _WEIGHTS).is_file():
        return _read_safetensors_file(d / _WEIGHTS)
    if (d / _INDEX).is_file():
        weight_map = json.loads((d / _INDEX).read_text())["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            out.update(_read_safetensors_file(d / shard))
        absent = sorted(set(weight_map) - set(out))
        if absent:
            raise ValueError(f"{d / _INDEX} lists tensors that no shard holds: {absent}")
        return out
    raise FileNotFoundError(f"{d} has neither {_WEIGHTS} nor {_INDEX} (only safetensors "
                            "checkpoints are supported)")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """Returns a local directory holding ``config.json`` and the safetensors weights.

    A directory that exists is used as is. Anything else is taken as a Hugging Face hub repo id
    and fetched with ``huggingface_hub`` (config and safetensors files only). With
    ``HF_HUB_OFFLINE=1`` only the local hub cache is consulted. Any failure (no network,
    unknown repo, not cached, ``huggingface_hub`` not installed) raises ``FileNotFoundError``
    at once with the reason.
    """
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json")
        return p
    repo_id = str(path_or_repo_id)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", repo_id):
        raise FileNotFoundError(f"{repo_id!r} is neither a local directory nor a hub repo id")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(f"{repo_id!r} is not a local directory, and downloading it needs "
                                "huggingface_hub (pip install 'epmq-jax[hub]')") from None
    offline = _hub_offline()
    try:
        local = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["config.json", "*.safetensors", _INDEX],
            local_files_only=offline, etag_timeout=10)
    except Exception as e:  # hub errors come in many types; all mean "cannot get it"
        where = "in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise FileNotFoundError(f"cannot find checkpoint {repo_id!r} {where}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                ) from e
    return Path(local)


def _hf_to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout for a leaf named ``leaf`` (kernel/scale/embedding/...)."""
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def load_into(module: nnx.Module, tensors: dict[str, np.ndarray],
              rename: Callable[[str], str | None] = lambda name: name,
              ignore: Iterable[str] = ()) -> nnx.Module:
    """Fills ``module``'s ``nnx.Param`` leaves with Hugging Face tensors, in place.

    Each checkpoint name goes through ``rename`` (return None to drop it), then its dots become
    slashes, giving a model path such as ``encoder/layers/0/self_attn/q_proj/weight``. A final
    ``weight`` lands on whichever of ``kernel``, ``scale`` or ``embedding`` the model has there;
    other names must match the model path exactly. Kernels are converted from torch layout
    (2-D ``(out, in)`` -> ``(in, out)``, 4-D OIHW -> HWIO). ``module`` may be abstract (from
    :func:`abstract`): every param is replaced by a ``jax.Array`` of the param's own dtype.
    Two checkpoint names for one param (tied weights) are an error: drop one with ``rename``.

    Args:
        module: the nnx module to fill.
        tensors: ``{checkpoint name: array}`` as from :func:`read_safetensors`.
        rename: maps a checkpoint name to the model's dotted name, or None to skip it.
        ignore: regexes (``re.search``) of checkpoint names to skip (e.g. ``position_ids``).

    Returns:
        ``module``.

    Raises:
        CheckpointMismatchError: unknown, missing or shape-mismatched keys (all listed).
    """
    params = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    ignore = [re.compile(r) for r in ignore]
    assigned: dict[str, np.ndarray] = {}
    unknown, mismatched = [], []
    for name, value in tensors.items():
        if any(r.search(name) for r in ignore):
            continue
        dotted = rename(name)
        if dotted is None:
            continue
        path = dotted.replace(".", "/")
        if path.endswith("/weight") or path == "weight":
            stem = path[: -len("weight")]
            path = next((stem + leaf for leaf in ("kernel", "scale", "embedding")
                         if stem + leaf in params), path)
        if path not in params or path in assigned:
            unknown.append(name)
            continue
        value = _hf_to_flax_layout(path.rsplit("/", 1)[-1], np.asarray(value))
        want = tuple(params[path].shape)
        if tuple(value.shape) != want:
            mismatched.append((name, path, tuple(value.shape), want))
            continue
        assigned[path] = value
    missing = sorted(set(params) - set(assigned) - {m[1] for m in mismatched})
    if unknown or missing or mismatched:
        raise CheckpointMismatchError(sorted(unknown), missing, mismatched)
    new = {p: jnp.asarray(v, dtype=params[p].dtype) for p, v in assigned.items()}
    flat = [(key, new[path_str(key)]) for key, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]
    nnx.update(module, nnx.from_flat_state(flat))
    return module


class _ConstantRngs:
    """Stands in for ``nnx.Rngs`` while a module is built abstractly: every stream (``.params()``,
    ``.default()``, ...) yields the same key. Values are never computed under ``nnx.eval_shape``,
    so the key does not matter, and this skips ``nnx.Rngs``' per-key counter update, which under
    tracing costs time quadratic in the model size (~20 s for CLIP B/32 with flax 0.12)."""

    def __call__(self) -> jax.Array:
        return jax.random.key(0)

    def __getattr__(self, stream: str) -> _ConstantRngs:
        return self


#: Pass as ``rngs`` to a model built inside :func:`abstract`.
ABSTRACT_RNGS: Any = _ConstantRngs()


def abstract(build: Callable[[], nnx.Module]) -> nnx.Module:
    """Builds a module without allocating or initialising its params (``nnx.eval_shape``), to
    be filled by :func:`load_into`: ``abstract(lambda: Model(cfg, rngs=hf.ABSTRACT_RNGS))``."""
    return nnx.eval_shape(build)


def load_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads ``config.json`` from a checkpoint directory."""
    return json.loads((Path(directory) / "config.json").read_text())


def from_pretrained(path_or_repo_id: str | os.PathLike) -> nnx.Module:
    """Loads a Hugging Face checkpoint as a Flax nnx module.

    Args:
        path_or_repo_id: a checkpoint directory (``config.json`` + safetensors) or a hub repo id.

    Returns:
        The model for ``config.json``'s ``model_type``: ``clip`` -> ``CLIPModel``,
        ``clip_vision_model`` -> ``CLIPVisionModelWithProjection`` (``visual_projection`` None
        when the checkpoint has none), ``bert`` -> ``BertModel``, ``t5`` -> the T5 model.
    """
    directory = resolve_checkpoint(path_or_repo_id)
    config = load_config(directory)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{directory}/config.json has model_type={model_type!r}; supported: "
                         f"{sorted(FAMILIES)}")
    family = importlib.import_module(FAMILIES[model_type])
    return family.from_hf(config, read_safetensors(directory))

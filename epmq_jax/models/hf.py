"""Loading Hugging Face checkpoints into the Flax models, in every weight format the hub holds.

- :func:`resolve_checkpoint`: a local directory, or a hub repo id (at a ``revision``). Online,
  the repo's file list picks one weight format and only that format's files (plus
  ``config.json``) are downloaded; offline (``HF_HUB_OFFLINE=1``) only the local cache is used.
  Every failure raises ``FileNotFoundError`` at once with the reason.
- :func:`open_tensors`: a checkpoint directory -> a lazy read-only ``Mapping`` name ->
  ``np.ndarray`` in PyTorch names and layouts, whatever the format: ``model.safetensors``
  (``safetensors.safe_open``), ``flax_model.msgpack`` (``flax.serialization``; Flax names and
  layouts are mapped back), ``pytorch_model.bin`` (``torch.load(mmap=True)``, needs torch);
  each single or sharded through its ``*.index.json``, preferred in that order. A tensor is read
  when it is looked up, and refused if it holds NaN/inf; unreadable files are one-line
  ``ValueError`` errors naming the file.
- :func:`load_into`: assigns such tensors into an nnx module by name, converting layouts
  (Linear ``weight (out, in)`` -> ``kernel (in, out)``, conv OIHW -> HWIO, LayerNorm
  ``weight`` -> ``scale``, Embedding ``weight`` -> ``embedding``) and raising
  :class:`CheckpointMismatchError` listing unknown, missing and shape-mismatched keys.
- :func:`from_pretrained`: the whole thing, dispatching on ``config.json``'s ``model_type`` to
  the family module's ``from_hf(config: dict, tensors: Mapping, *, dtype=None) -> nnx.Module``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # registers "bfloat16" with numpy, so safetensors' numpy reader handles BF16
import numpy as np
from flax import nnx, serialization, traverse_util
from safetensors import safe_open

from epmq_jax._tree import path_str
from epmq_jax.models import gptq_format
from epmq_jax.quant import is_quantized

logger = logging.getLogger(__name__)

#: ``config.json`` ``model_type`` -> module defining ``from_hf(config, tensors, *, dtype=None)``.
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

#: Weight formats in order of preference: (format, single file, sharded index).
FORMATS: tuple[tuple[str, str, str], ...] = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("msgpack", "flax_model.msgpack", "flax_model.msgpack.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)
#: safetensors dtype codes -> numpy dtypes (bfloat16 and float8 from ml_dtypes).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_TORCH_FIX = ("reading it needs torch: pip install 'epmq-jax[torch]' (or the CPU wheel of torch), "
              "or convert the checkpoint to safetensors")


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _unreadable(path: Path, what: str, e: BaseException) -> ValueError:
    """The one-line error for a weights file that cannot be parsed."""
    try:
        with open(path, "rb") as f:
            lfs = f.read(64).startswith(b"version https://git-lfs")
    except OSError:
        lfs = False
    if lfs:
        return ValueError(f"{path} is a git-lfs pointer, not the weights: run `git lfs pull`")
    return ValueError(f"{path}: not a readable {what} (truncated or corrupt?): {_first_line(e)}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable(path, "JSON file", e) from e


def _weight_map(index: Any, path: Path | str) -> dict[str, str]:
    """``weight_map`` of a sharded checkpoint's ``*.index.json`` (tensor name -> shard file)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path}: expected a JSON object with a non-empty 'weight_map'")
    return weight_map


def _torch_installed() -> bool:
    try:
        import torch  # noqa: F401  (needed next anyway: only asked when a .bin is to be read)
    except ImportError:
        return False
    return True


def _select_format(where: str, exists: Callable[[str], bool],
                   read_index: Callable[[str], Any]) -> tuple[str, list[str]]:
    """Picks the first complete weight format of :data:`FORMATS`.

    Args:
        where: the directory or repo, for messages.
        exists: whether a file (relative name) is there.
        read_index: parsed JSON of an index file (relative name).

    Returns:
        ``(format, files)``: the single weights file, or the index followed by its shards.

    Raises:
        FileNotFoundError: no complete format (an index whose shards are absent is skipped).
        ImportError: only ``pytorch_model.bin`` is there and torch is not installed.
    """
    problems = []
    for fmt, single, index in FORMATS:
        first = single if exists(single) else index if exists(index) else None
        if first is None:
            continue
        if fmt == "bin" and not _torch_installed():  # bin is the last resort: nothing else here
            raise ImportError(f"{where}/{first} is a PyTorch checkpoint (the only weights "
                              f"there); {_TORCH_FIX}")
        if first == single:
            return fmt, [single]
        shards = sorted(set(_weight_map(read_index(index), f"{where}/{index}").values()))
        absent = [s for s in shards if not exists(s)]
        if not absent:
            return fmt, [index, *shards]
        problems.append(f"{index} names shards that are absent: {', '.join(absent)}")
    names = ", ".join(name for _, single, index in FORMATS for name in (single, index))
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise FileNotFoundError(f"{where} has no complete weights in a supported format{detail}; "
                            f"looked for {names}")


# --- readers: one weights file each; ``names`` and ``read(name) -> array`` ---------------------


class _SafetensorsFile:
    """``safe_open`` on a ``.safetensors`` file: the header is checked now, tensors read on demand."""

    def __init__(self, path: Path):
        try:
            self._file = safe_open(str(path), framework="numpy")
        except Exception as e:  # SafetensorError and friends: bad header, file shorter than it says
            raise _unreadable(path, "safetensors file", e) from e
        self.names = list(self._file.offset_keys())

    def read(self, name: str) -> np.ndarray:
        return self._file.get_tensor(name)

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        view = self._file.get_slice(name)  # header only
        code = view.get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has safetensors dtype {code}, which numpy cannot hold")
        return tuple(view.get_shape()), SAFETENSORS_DTYPES[code]


class _TorchFile:
    """``torch.load(weights_only=True, mmap=True)``: tensors stay on disk until read."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{path} is a PyTorch checkpoint; {_TORCH_FIX}") from None

        self._torch = torch
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # The legacy (pre-zip, torch < 1.6) format cannot be memory-mapped.
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # zip/pickle errors of a truncated or corrupt file
            raise _unreadable(path, "PyTorch checkpoint", e) from e
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got "
                             f"{type(state).__name__}")
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.names = list(self._tensors)

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name].detach()
        if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        t = self._tensors[name]
        if t.dtype == self._torch.bfloat16:
            return tuple(t.shape), np.dtype(ml_dtypes.bfloat16)
        return tuple(t.shape), t.new_empty(0).numpy().dtype


def _flax_name(keys: tuple[str, ...]) -> str:
    """A Flax param path -> its PyTorch name (``kernel``/``scale``/``embedding`` -> ``weight``)."""
    leaf = "weight" if keys[-1] in ("kernel", "scale", "embedding") else keys[-1]
    return ".".join((*keys[:-1], leaf))


class _MsgpackFile:
    """A ``flax_model.msgpack`` (``flax.serialization``), decoded whole, in PyTorch names/layouts.

    Hub Flax checkpoints hold the params tree of the Flax model (layer lists as ``"0"``, ``"1"``
    keys). Mapped back as transformers does (Flax -> PyTorch): a ``kernel`` becomes ``weight``,
    4-D HWIO -> OIHW, else transposed; ``scale`` and ``embedding`` become ``weight``; other
    leaves (T5's layer-norm ``weight``, ``class_embedding``, ``logit_scale``) keep their names.
    """

    def __init__(self, path: Path):
        try:
            tree = serialization.msgpack_restore(path.read_bytes())
        except Exception as e:  # msgpack's ExtraData/unpack errors on a truncated or corrupt file
            raise _unreadable(path, "Flax msgpack file", e) from e
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a params tree (nested dict), got "
                             f"{type(tree).__name__}")
        self._arrays = {}
        for keys, value in traverse_util.flatten_dict(tree).items():
            value = np.asarray(value)
            if keys[-1] == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            self._arrays[_flax_name(keys)] = value
        self.names = list(self._arrays)

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        return self._arrays[name].shape, self._arrays[name].dtype


_READERS = {"safetensors": _SafetensorsFile, "msgpack": _MsgpackFile, "bin": _TorchFile}


class CheckpointTensors(Mapping):
    """The weights of one checkpoint directory as a lazy, read-only ``name -> np.ndarray`` map.

    Names and layouts are PyTorch's (as in ``model.safetensors``) whatever the file format. A
    tensor is read from disk when looked up (``tensors[name]``), in its stored dtype (bfloat16
    as ``ml_dtypes.bfloat16``), and checked for NaN/inf unless ``allow_nonfinite``; ``in``,
    ``len`` and iteration read nothing. Iteration goes file by file. Safetensors and bin files
    are opened (headers checked) up front; a msgpack file is decoded whole when one of its tensors
    is first read, one file at a time.

    Attributes:
        format: ``"safetensors"``, ``"msgpack"`` or ``"bin"``.
        files: the files read, in order (an index first when sharded).
    """

    def __init__(self, directory: Path, format: str, files: list[str], *,
                 allow_nonfinite: bool = False):
        self.directory, self.format, self.files = directory, format, tuple(files)
        self.allow_nonfinite = allow_nonfinite
        self._readers: dict[str, Any] = {}
        self._where: dict[str, str] = {}  # tensor name -> file
        if len(files) == 1:
            self._where = dict.fromkeys(self._reader(files[0]).names, files[0])
        else:
            weight_map = _weight_map(_read_json(directory / files[0]), directory / files[0])
            if format == "msgpack":  # Flax shards' index names are "/"-joined param paths
                weight_map = {_flax_name(tuple(k.split("/"))): f for k, f in weight_map.items()}
            order = {f: i for i, f in enumerate(files)}
            self._where = dict(sorted(weight_map.items(), key=lambda item: order[item[1]]))
            if format != "msgpack":
                for shard in files[1:]:
                    self._reader(shard)

    def _reader(self, file: str) -> Any:
        reader = self._readers.get(file)
        if reader is None:
            if self.format == "msgpack":
                self._readers.clear()  # hold one decoded msgpack file at a time
            reader = self._readers[file] = _READERS[self.format](self.directory / file)
            held = set(reader.names)
            absent = [n for n, f in self._where.items() if f == file and n not in held]
            if absent:
                raise ValueError(f"{self.directory / self.files[0]} lists tensors that "
                                 f"{file} does not hold: {', '.join(absent)}")
        return reader

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._where[name]  # KeyError for a name the checkpoint does not have
        reader = self._reader(file)
        try:
            value = np.asarray(reader.read(name))
        except Exception as e:
            raise ValueError(f"{self.directory / file}: cannot read tensor {name!r}: "
                             f"{_first_line(e)}") from e
        if not self.allow_nonfinite and jnp.issubdtype(value.dtype, jnp.floating):
            bad = value.size - int(np.count_nonzero(np.isfinite(value)))
            if bad:
                raise ValueError(f"{self.directory / file}: tensor {name!r} {value.shape} holds "
                                 f"{bad} NaN/inf values; pass allow_nonfinite=True to load it "
                                 "anyway")
        return value

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype, Path]:
        """``(shape, dtype, file)`` of a tensor, from the file's header where the format has one
        (safetensors; a ``.bin`` maps its tensors, a msgpack file is decoded): no data is read."""
        file = self._where[name]
        try:
            shape, dtype = self._reader(file).info(name)
        except Exception as e:
            raise ValueError(f"{self.directory / file}: cannot read the header of tensor "
                             f"{name!r}: {_first_line(e)}") from e
        return tuple(shape), np.dtype(dtype), self.directory / file

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return (f"CheckpointTensors({str(self.directory)!r}, format={self.format!r}, "
                f"{len(self)} tensors)")


def open_tensors(directory: str | os.PathLike, *, allow_nonfinite: bool = False
                 ) -> CheckpointTensors:
    """Opens the weights of a checkpoint directory for lazy, tensor-by-tensor reading.

    The first complete format of :data:`FORMATS` is read: ``model.safetensors``, then
    ``flax_model.msgpack``, then ``pytorch_model.bin`` (each single, or sharded through its
    ``*.index.json``); which one is logged at DEBUG level.

    Args:
        directory: the checkpoint directory.
        allow_nonfinite: accept floating tensors holding NaN/inf (refused by default).

    Returns:
        A :class:`CheckpointTensors` mapping name -> ``np.ndarray`` in PyTorch names and layouts
        (a Linear ``weight`` is ``(d_out, d_in)``), each read when looked up.

    Raises:
        FileNotFoundError: no complete weights in a supported format.
        ImportError: only ``pytorch_model.bin`` is there and torch is not installed.
        ValueError: a truncated or corrupt file (naming it), a malformed index.
    """
    d = Path(directory)
    fmt, files = _select_format(str(d), lambda name: (d / name).is_file(),
                                lambda name: _read_json(d / name))
    logger.debug("%s: reading %s weights from %s", d, fmt, ", ".join(files))
    return CheckpointTensors(d, fmt, files, allow_nonfinite=allow_nonfinite)


# --- the hub ---------------------------------------------------------------------------------


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(hub: Any, repo_id: str, revision: str | None) -> Path:
    """Downloads (or, offline, finds in the cache) config.json and one format's weights."""
    at = f" at revision {revision!r}" if revision is not None else ""
    offline = _hub_offline()
    where = "in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"

    def call(fn: Callable, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # hub errors come in many types; all mean "cannot get it"
            raise FileNotFoundError(f"cannot find checkpoint {repo_id!r}{at} {where}: "
                                    f"{_first_line(e)}") from e

    if offline:
        local = Path(call(hub.snapshot_download, repo_id, revision=revision, local_files_only=True))
        fmt, files = _select_format(f"{local} (cached {repo_id!r}{at})",
                                    lambda name: (local / name).is_file(),
                                    lambda name: _read_json(local / name))
    else:
        info = call(hub.model_info, repo_id, revision=revision, timeout=10)
        listed = {s.rfilename for s in info.siblings or ()}
        if "config.json" not in listed:
            raise FileNotFoundError(f"hub repo {repo_id!r}{at} has no config.json")
        fmt, files = _select_format(
            f"hub repo {repo_id!r}{at}", listed.__contains__,
            lambda name: _read_json(Path(call(hub.hf_hub_download, repo_id, name,
                                              revision=revision, etag_timeout=10))))
        local = Path(call(hub.snapshot_download, repo_id, revision=revision,
                          allow_patterns=["config.json", *files], etag_timeout=10))
    logger.debug("%s%s: %s weights (%s) in %s", repo_id, at, fmt, ", ".join(files), local)
    return local


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None
                       ) -> Path:
    """Returns a local directory holding ``config.json`` and the weights.

    A directory that exists is used as is. Anything else is taken as a Hugging Face hub repo id
    and fetched with ``huggingface_hub``: the repo's file list picks the format
    (:data:`FORMATS` order) and only ``config.json`` and that format's files are downloaded.
    With ``HF_HUB_OFFLINE=1`` only the local hub cache is consulted (any cached format).

    Args:
        path_or_repo_id: a checkpoint directory or a hub repo id (``"org/name"``).
        revision: hub branch, tag or commit (default: the repo's main branch); hub ids only.

    Raises:
        FileNotFoundError: at once, with the reason (no network, unknown repo or revision, not
            cached, no weights in a supported format, ``huggingface_hub`` not installed).
        ImportError: the repo holds only ``pytorch_model.bin`` and torch is not installed
            (before anything is downloaded).
        ValueError: ``revision`` given with a local directory.
    """
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub repo ids; {p} is a local "
                             "directory")
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
    local = _from_hub(huggingface_hub, repo_id, revision)
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local} (hub repo {repo_id!r}) has no config.json")
    return local


def flax_axes(leaf: str, ndim: int) -> tuple[int, ...] | None:
    """The axis permutation taking a torch-layout tensor to the Flax layout of a leaf named
    ``leaf`` (a 2-D ``kernel``: ``(1, 0)``; a 4-D one, OIHW -> HWIO), or None (unchanged)."""
    if leaf == "kernel" and ndim == 2:
        return (1, 0)
    if leaf == "kernel" and ndim == 4:
        return (2, 3, 1, 0)
    return None


def _hf_to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout for a leaf named ``leaf`` (kernel/scale/embedding/...)."""
    axes = flax_axes(leaf, value.ndim)
    return value if axes is None else value.transpose(axes)


def model_path(name: str, params: Container[str],
               rename: Callable[[str], str | None] = lambda name: name,
               ignore: Iterable[re.Pattern] = ()) -> str | None:
    """The model param path a checkpoint tensor fills, by :func:`load_into`'s rule, or None when
    ``ignore`` (compiled regexes, ``re.search``) or ``rename`` skips it.

    ``rename(name)``'s dots become slashes; a final ``weight`` lands on whichever of ``kernel``,
    ``scale`` or ``embedding`` ``params`` (the model's param paths) holds there.
    """
    if any(r.search(name) for r in ignore):
        return None
    dotted = rename(name)
    if dotted is None:
        return None
    path = dotted.replace(".", "/")
    if path.endswith("/weight") or path == "weight":
        stem = path[: -len("weight")]
        path = next((stem + leaf for leaf in ("kernel", "scale", "embedding")
                     if stem + leaf in params), path)
    return path


def load_into(module: nnx.Module, tensors: Mapping[str, np.ndarray],
              rename: Callable[[str], str | None] = lambda name: name,
              ignore: Iterable[str] = (), *, dtype: Any = None) -> nnx.Module:
    """Fills ``module``'s ``nnx.Param`` leaves with Hugging Face tensors, in place.

    Each checkpoint name goes through ``rename`` (return None to drop it), then its dots become
    slashes, giving a model path such as ``encoder/layers/0/self_attn/q_proj/weight``. A final
    ``weight`` lands on whichever of ``kernel``, ``scale`` or ``embedding`` the model has there;
    other names must match the model path exactly. Kernels are converted from torch layout
    (2-D ``(out, in)`` -> ``(in, out)``, 4-D OIHW -> HWIO); a tensor that is a
    ``QuantizedWeight`` (a GPTQ linear, :class:`~epmq_jax.models.gptq_format.GPTQTensors`) is
    already in Flax layout and becomes the kernel's value as it is (dequantizing to the param's
    dtype). ``module`` may be abstract (from :func:`abstract`): every param is replaced by a
    ``jax.Array``. Tensors are read one at a time (skipped names are never read) and made
    ``jax.Array`` at once, so a lazy ``tensors`` (:func:`open_tensors`) is not held in host
    memory beside the model.
    Two checkpoint names for one param (tied weights) are an error: drop one with ``rename``.

    Args:
        module: the nnx module to fill.
        tensors: ``{checkpoint name: array}`` in PyTorch layout, e.g. from :func:`open_tensors`.
        rename: maps a checkpoint name to the model's dotted name, or None to skip it.
        ignore: regexes (``re.search``) of checkpoint names to skip (e.g. ``position_ids``).
        dtype: storage dtype of the floating params; None keeps each param's own dtype.

    Returns:
        ``module``.

    Raises:
        CheckpointMismatchError: unknown, missing or shape-mismatched keys (all listed).
    """
    params = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    ignore = [re.compile(r) for r in ignore]
    assigned: dict[str, jax.Array] = {}
    unknown, mismatched = [], []
    for name in tensors:
        path = model_path(name, params, rename, ignore)
        if path is None:
            continue
        if path not in params or path in assigned:
            unknown.append(name)
            continue
        value = tensors[name]
        if not is_quantized(value):   # a QuantizedWeight (GPTQ checkpoints) is in Flax layout
            value = _hf_to_flax_layout(path.rsplit("/", 1)[-1], np.asarray(value))
        want = tuple(params[path].shape)
        if tuple(value.shape) != want or (is_quantized(value) and not path.endswith("kernel")):
            mismatched.append((name, path, tuple(value.shape), want))
            continue
        own = params[path].dtype
        own = dtype if dtype is not None and jnp.issubdtype(own, jnp.floating) else own
        assigned[path] = (dataclasses.replace(value, dtype=np.dtype(own).name)
                          if is_quantized(value) else jnp.asarray(value, dtype=own))
    missing = sorted(set(params) - set(assigned) - {m[1] for m in mismatched})
    if unknown or missing or mismatched:
        raise CheckpointMismatchError(sorted(unknown), missing, mismatched)
    flat = [(key, assigned[path_str(key)])
            for key, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]
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
    """Reads ``config.json`` from a checkpoint directory (a one-line ValueError if corrupt)."""
    return _read_json(Path(directory) / "config.json")


def _param_dtype(dtype: Any, config: Mapping[str, Any], where: str) -> Any:
    """``from_pretrained``'s ``dtype`` -> a floating numpy dtype, or None (float32 params)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype == "auto":
        dtype = config.get("torch_dtype") or config.get("dtype")
        if dtype is None:
            return None
        dtype = str(dtype).removeprefix("torch.")
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"from_pretrained: dtype={dtype!r} ({where}): expected None, 'auto', or "
                         "a floating dtype such as 'float32', 'bfloat16', 'float16'")
    return dt


def from_pretrained(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                    dtype: Any = None, allow_nonfinite: bool = False,
                    quantized: str = "dequantize") -> nnx.Module:
    """Loads a Hugging Face checkpoint as a Flax nnx module.

    Args:
        path_or_repo_id: a checkpoint directory (``config.json`` + weights in any format of
            :data:`FORMATS`) or a hub repo id.
        revision: hub branch, tag or commit (hub repo ids only).
        dtype: storage dtype of the floating params: None (float32), ``"float32"``,
            ``"bfloat16"``, ``"float16"``, a numpy/JAX dtype, or ``"auto"`` (``config.json``'s
            ``torch_dtype`` / ``dtype``; float32 when it has neither). Computation follows the
            module (T5 computes in float32; CLIP and BERT in the inputs' and params' dtype).
        allow_nonfinite: accept NaN/inf in the weights (refused by default).
        quantized: for a GPTQ checkpoint (``quantization_config`` with ``quant_method: gptq``,
            e.g. written by :func:`epmq_jax.checkpoint.save_pretrained`): ``"dequantize"`` gives
            float kernels; ``"packed"`` swaps each quantized ``nnx.Linear`` for an
            :class:`epmq_jax.nn.QuantLinear` holding the checkpoint's packed
            ``QuantizedWeight`` (``nnx.state(model, nnx.Param)`` then has the packed leaves, at
            the float model's paths). No effect on checkpoints without GPTQ tensors.

    Returns:
        The model for ``config.json``'s ``model_type``: ``clip`` -> ``CLIPModel``,
        ``clip_vision_model`` -> ``CLIPVisionModelWithProjection`` (``visual_projection`` None
        when the checkpoint has none), ``bert`` -> ``BertModel``, ``t5`` -> the T5 model,
        ``llama``/``mistral``/``qwen2``/``qwen3`` -> ``LlamaForCausalLM``.

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`. ImportError: a ``pytorch_model.bin``
        without torch. ValueError: an unsupported ``model_type`` or ``dtype``, a truncated or
        corrupt file, NaN/inf in a weight; :class:`CheckpointMismatchError` for keys that do
        not fit the model.
    """
    directory = resolve_checkpoint(path_or_repo_id, revision=revision)
    config = load_config(directory)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{directory}/config.json has model_type={model_type!r}; supported: "
                         f"{sorted(FAMILIES)}")
    if quantized not in ("dequantize", "packed"):
        raise ValueError(f"from_pretrained: quantized={quantized!r}; expected 'dequantize' or 'packed'")
    param_dtype = _param_dtype(dtype, config, f"{directory}/config.json")
    family = importlib.import_module(FAMILIES[model_type])
    tensors: Mapping[str, Any] = open_tensors(directory, allow_nonfinite=allow_nonfinite)
    gptq = gptq_format.read_settings(config, directory)
    if gptq is not None:
        tensors = gptq_format.GPTQTensors(tensors, gptq)
    model = family.from_hf(config, tensors, dtype=param_dtype)
    return model if gptq is None else gptq_format.finish_model(model, quantized)

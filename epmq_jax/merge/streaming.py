"""Merging Hugging Face checkpoints tensor by tensor, for models too large to hold T times.

:func:`merge_checkpoints` merges checkpoint directories (a base and T experts, any format
:func:`epmq_jax.models.hf.open_tensors` reads; sharded safetensors for LLMs) into a new Hugging Face
directory, one tensor at a time: each pass reads a tensor from every input, merges it and lets it
go, so host memory is about one tensor times (T + 2) plus the merge's temporaries of that tensor,
never T models. Results equal the in-memory functions of :mod:`epmq_jax.merge` on the same
tensors (they run the same per-leaf kernels), except where noted for DARE.

Passes over the inputs (each reads every merged tensor of every input once):

- ``task_arithmetic``, ``average``, ``dare``, ``ties`` with ``trim="per_tensor"``: **1**.
- ``ties`` (and ``dare`` with ``merge="ties"``) with ``trim="global"``: the trim keeps, per task
  vector, the entries whose magnitude is at least the k-th smallest over *all* merged tensors.
  That k-th value is found exactly by a radix selection on the magnitudes' IEEE bit patterns,
  16 bits per pass with a 65536-bin histogram per expert (bounded memory whatever the model
  size): ``ceil(31 / 16) = 2`` passes for float32 task vectors (4 for float64). A further pass
  sums the sign votes that decide the majority sign of entries whose elected sign is 0, then the
  writing pass: **4** passes in all for float32 (2 when ``density >= 1``).

DARE draws its masks per tensor: expert ``t`` keeps the entries of tensor ``name`` where
``jax.random.bernoulli(fold_in(k_name, t), 1 - drop, shape)`` is True, with
``k_name = fold_in(jax.random.key(seed), zlib.crc32(name.encode()))``, so a rerun (and every pass
of a multi-pass merge) draws the same masks. The in-memory :func:`epmq_jax.merge.dare` draws one
mask over all merged leaves at once instead: the streamed result equals ``dare`` applied to each
tensor alone with the key ``k_name``, not ``dare`` over the whole tree.

Output: ``config.json`` copied from the reference checkpoint (the base; ``experts[0]`` for
``average``), the tokenizer files and ``generation_config.json`` when present, and the tensors in
``model.safetensors`` (``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``
when larger than ``max_shard_size``), in the reference's dtypes unless ``dtype`` is given. Shards
are written as the tensors come (the header is planned from the inputs' headers), never held in
memory. Everything is written into a temporary directory next to ``out_dir`` and renamed into place
at the end: an error or interruption leaves no half-written model (a killed process leaves the
hidden ``.NAME.epmq-tmp-*`` directory, never ``out_dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import struct
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from epmq_jax._tree import PathFilter, compile_filter
from epmq_jax.merge._basic import (
    _mean_leaf,
    _task_arithmetic_leaf,
    add_deltas,
    per_expert_scaling,
    task_vectors,
)
from epmq_jax.merge._dare import _dare_merge, drop_and_rescale
from epmq_jax.merge._ties import (
    _abs_bits,
    _ties_merge,
    check_ties_args,
    disjoint_merge,
    keep_above,
    sign_votes,
)
from epmq_jax.models.hf import SAFETENSORS_DTYPES, open_tensors, resolve_checkpoint

logger = logging.getLogger(__name__)

#: Files copied from the reference checkpoint besides ``config.json``, when present.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
                "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
                "chat_template.jinja", "chat_template.json")
#: Tensor dtypes that are merged (other floating dtypes, e.g. float8 weights of a quantized
#: checkpoint, are refused when the filter selects them).
MERGEABLE = tuple(np.dtype(d) for d in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
_ST_CODES = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}
_RADIX = 16  # bits of the magnitude selected per pass of the global trim

# Settings of each method (and their defaults), as the in-memory functions take them.
_TIES = {"scaling": 0.3, "density": 0.2, "trim": "global", "merge_func": "mean"}
METHODS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"scaling": 0.3},
    "ties": _TIES,
    "dare": {"scaling": 0.3, "drop": 0.9, "rescale": True, "merge": "task_arithmetic", "seed": 0},
    "average": {},
}


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    """What a streaming merge wrote.

    Attributes:
      out_dir: the merged checkpoint directory.
      merged: number of tensors merged.
      copied: number of tensors copied from the reference checkpoint.
      passes: how many times each merged tensor was read from every input.
      files: the weight files written (the index first when sharded).
    """

    out_dir: Path
    merged: int
    copied: int
    passes: int
    files: tuple[str, ...]


def parse_size(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"10KB"``
    (KB/MB/GB/TB powers of 1000, KiB/MiB/GiB/TiB of 1024, as transformers reads them)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if m is None:
            raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a size such "
                             "as '5GB', '500MB', '2GiB'")
        unit = (m.group(2) or "B").upper()
        power = "BKMGT".index(unit[0])
        value = int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return value


def tensor_key(seed: int, name: str) -> jax.Array:
    """The PRNG key of tensor ``name`` (DARE's masks): ``fold_in(key(seed), crc32(name))``."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


# --- inputs ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    """The opened checkpoints of one merge (tensors read lazily, one at a time).

    Attributes:
      ref_dir, expert_dirs: the reference checkpoint (the base) and the other inputs.
      ref, experts: their lazy tensor mappings (:func:`~epmq_jax.models.hf.open_tensors`).
      specs: ``name -> (shape, dtype)`` of every reference tensor, in the reference's order.
      merged: the names of the tensors merged, in that order; the others are copied.
    """

    ref_dir: Path
    expert_dirs: list[Path]
    ref: Mapping[str, np.ndarray]
    experts: list[Mapping[str, np.ndarray]]
    specs: dict[str, tuple[tuple[int, ...], np.dtype]]
    merged: list[str]

    def for_each_merged(self, fn: Callable[[str, jax.Array, list[jax.Array]], Any],
                        desc: str, progress: bool) -> None:
        """Calls ``fn(name, base_tensor, expert_tensors)`` on every merged tensor, in order.

        Each call's tensors are read just before it and dropped when it returns, so at most
        T + 1 input tensors are alive at once (unless ``fn`` keeps them).
        """
        for name in _bar(self.merged, desc, progress):
            fn(name, *self.read(name))

    def read(self, name: str) -> tuple[jax.Array, list[jax.Array]]:
        """Tensor ``name`` of the reference and of each expert, as JAX arrays.

        JAX arrays, not NumPy ones, go to the jitted kernels: a jitted call given NumPy arrays
        keeps them referenced until the next call, which would hold two tensors per input.
        """
        return jnp.asarray(self.ref[name]), [jnp.asarray(e[name]) for e in self.experts]


def _bar(items: Sequence[Any], desc: str, progress: bool) -> Any:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", disable=None)  # None: no bar off a terminal


def open_inputs(ref_dir: Path, expert_dirs: Sequence[Path], *, filter: PathFilter = None,
                ref_role: str = "base", expert_roles: Sequence[str] | None = None) -> Inputs:
    """Opens the checkpoints lazily and checks, from their headers only, that they match.

    Args:
      ref_dir: the reference checkpoint: its tensors not merged are copied, its dtypes kept.
      expert_dirs: the other checkpoints, holding the same tensor names, shapes and dtypes.
      filter: which tensors are merged (``re.search`` on the tensor name, a compiled pattern or
        a predicate; None: all), among those of a dtype in :data:`MERGEABLE`.
      ref_role, expert_roles: how error messages call the inputs (``"base"``, ``"expert 2"``).

    Raises:
      ValueError: in one line naming the tensor and the files: a tensor one input lacks or has
        in addition, a shape or dtype that differs, a selected float8 (or other non-mergeable
        floating) tensor; an unreadable file.
    """
    roles = list(expert_roles or [f"expert {t}" for t in range(len(expert_dirs))])
    ref = open_tensors(ref_dir)
    experts = [open_tensors(d) for d in expert_dirs]
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    files: dict[str, Path] = {}
    for name in ref:
        shape, dtype, file = ref.info(name)
        specs[name], files[name] = (shape, dtype), file
    if not specs:
        raise ValueError(f"{ref_role} ({ref_dir}) holds no tensors")
    for e, d, role in zip(experts, expert_dirs, roles):
        missing = [n for n in specs if n not in e]
        if missing:
            raise ValueError(f"{role} ({d}) has no tensor {missing[0]!r} that the {ref_role} has "
                             f"in {files[missing[0]]} ({len(missing)} missing in all)")
        extra = [n for n in e if n not in specs]
        if extra:
            raise ValueError(f"{role} has tensor {extra[0]!r} in {e.info(extra[0])[2]} that the "
                             f"{ref_role} ({ref_dir}) lacks ({len(extra)} extra in all)")
        for name, (shape, dtype) in specs.items():
            eshape, edtype, efile = e.info(name)
            if (eshape, edtype) != (shape, dtype):
                raise ValueError(f"tensor {name!r} is {edtype.name} {eshape} in {efile} ({role}) "
                                 f"but {dtype.name} {shape} in {files[name]} ({ref_role})")
    keep = compile_filter(filter)
    merged = []
    for name, (_, dtype) in specs.items():
        if not keep(name) or not jnp.issubdtype(dtype, jnp.floating):
            continue
        if dtype not in MERGEABLE:
            raise ValueError(f"tensor {name!r} in {files[name]} is {dtype.name}, which is not "
                             f"merged (quantized checkpoint?); exclude it with the filter")
        merged.append(name)
    return Inputs(ref_dir, list(expert_dirs), ref, experts, specs, merged)


# --- output: sharded safetensors written as the tensors come ---------------------------------


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def plan_shards(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                max_bytes: int) -> list[list[str]]:
    """Splits tensors into shards of at most ``max_bytes`` (a larger tensor gets one alone).

    Tensors are taken in order and a shard is closed when the next one would overflow it (as
    transformers' and mergekit's writers do); inside a shard, wider dtypes come first so every
    tensor's data stays aligned to its item size.
    """
    shards: list[list[str]] = []
    size = 0
    for name, (shape, dtype) in specs.items():
        n = _nbytes(shape, dtype)
        if not shards or (shards[-1] and size + n > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return [sorted(s, key=lambda name: -specs[name][1].itemsize) for s in shards]


class _ShardWriter:
    """One ``.safetensors`` file: the header (names, dtypes, shapes, offsets) is written first,
    from the plan, then each tensor's bytes as :meth:`write` receives it, in the plan's order."""

    def __init__(self, path: Path, names: list[str],
                 specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            shape, dtype = specs[name]
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)   # the data starts 8-byte aligned, as safetensors writes
        self.path, self._specs, self._todo = path, specs, list(reversed(names))
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, value: np.ndarray) -> None:
        expected = self._todo.pop()
        shape, dtype = self._specs[name]
        if name != expected or value.shape != shape or value.dtype != dtype:
            raise AssertionError(f"{self.path}: got {name!r} {value.dtype} {value.shape}, "
                                 f"planned {expected!r} {dtype} {shape}")
        self._file.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        self._file.close()
        if self._todo:
            raise AssertionError(f"{self.path}: tensors never written: {self._todo[::-1]}")

    def abort(self) -> None:
        """Closes the file on an error (the directory holding it is removed)."""
        self._file.close()


def _prepare_out(out_dir: Path, inputs: Sequence[Path], overwrite: bool) -> Path:
    out = Path(out_dir).expanduser().absolute()
    for d in inputs:
        d = d.resolve()
        if out.resolve() == d or out.resolve() in d.parents:
            raise ValueError(f"out_dir {out} is (or contains) the input checkpoint {d}")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"out_dir {out} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"out_dir {out} exists; pass overwrite=True (--overwrite) to "
                                  "replace it")
    return out


def _write_checkpoint(out: Path, inputs: Inputs, tensor: Callable[[str], np.ndarray],
                      out_specs: dict[str, tuple[tuple[int, ...], np.dtype]], max_bytes: int,
                      config_dtype: np.dtype | None, desc: str, progress: bool) -> tuple[str, ...]:
    """Writes the merged checkpoint into a temporary directory, then renames it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.epmq-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = json.loads((inputs.ref_dir / "config.json").read_text())
        if config_dtype is not None:
            for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
                config[key] = config_dtype.name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (inputs.ref_dir / name).is_file():
                shutil.copyfile(inputs.ref_dir / name, tmp / name)
        shards = plan_shards(out_specs, max_bytes)
        n = len(shards)
        files = (["model.safetensors"] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        starts = dict(zip(np.cumsum([0] + [len(s) for s in shards[:-1]]).tolist(),
                          zip(files, shards)))
        writer = None
        try:
            for i, name in enumerate(_bar([n for s in shards for n in s], desc, progress)):
                if i in starts:
                    if writer is not None:
                        writer.close()
                    writer = _ShardWriter(tmp / starts[i][0], starts[i][1], out_specs)
                writer.write(name, tensor(name))
            writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if n > 1:
            index = {"metadata": {"total_size": sum(_nbytes(*s) for s in out_specs.values())},
                     "weight_map": {name: f for f, names in zip(files, shards) for name in names}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            files = ["model.safetensors.index.json", *files]
        if out.exists():
            old = out.parent / f".{out.name}.epmq-old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tuple(files)


# --- the engine --------------------------------------------------------------------------------


class TensorMerge:
    """A merge method for :func:`stream_merge`: checks, optional pre-passes, then per-tensor.

    Subclasses implement :meth:`merge_tensor` and, when they need statistics over all tensors
    before the first result (TIES' global trim), :meth:`prepare`.
    """

    def check(self, inputs: Inputs) -> None:
        """Raises ValueError for settings that do not fit these inputs (before any work)."""

    def prepare(self, inputs: Inputs, progress: bool) -> int:
        """Runs the passes needed before merging; returns how many it made."""
        return 0

    def merge_tensor(self, name: str, base: jax.Array, experts: list[jax.Array]) -> Any:
        """The merged tensor ``name`` (any float dtype: it is cast to the output dtype)."""
        raise NotImplementedError


def stream_merge(ref: str | os.PathLike, experts: Sequence[str | os.PathLike],
                 out_dir: str | os.PathLike,
                 method: TensorMerge, *, filter: PathFilter = None, dtype: Any = None,
                 max_shard_size: int | str = "5GB", overwrite: bool = False,
                 progress: bool = False, ref_role: str = "base",
                 expert_roles: Sequence[str] | None = None) -> MergeSummary:
    """Runs a :class:`TensorMerge` over local checkpoint directories (see :func:`merge_checkpoints`).

    Everything that can be checked from the arguments and the files' headers is checked before
    the first tensor is read.
    """
    ref, experts = Path(ref), [Path(e) for e in experts]
    max_bytes = parse_size(max_shard_size)
    out_dtype = None if dtype is None else _float_dtype(dtype)
    out = _prepare_out(Path(out_dir), [ref, *experts], overwrite)
    inputs = open_inputs(ref, experts, filter=filter, ref_role=ref_role, expert_roles=expert_roles)
    method.check(inputs)
    out_specs = {name: (shape, out_dtype if out_dtype is not None and dt in MERGEABLE else dt)
                 for name, (shape, dt) in inputs.specs.items()}
    passes = method.prepare(inputs, progress) + 1
    merged = set(inputs.merged)

    def tensor(name: str) -> np.ndarray:
        dt = out_specs[name][1]
        if name not in merged:
            return inputs.ref[name].astype(dt, copy=False)
        value = method.merge_tensor(name, *inputs.read(name))
        value = np.asarray(value).astype(dt, copy=False)
        if not np.isfinite(value).all():
            raise ValueError(f"merged tensor {name!r} holds NaN/inf in {dt.name} (overflow?); "
                             "nothing was written")
        return value

    files = _write_checkpoint(out, inputs, tensor, out_specs, max_bytes, out_dtype,
                              f"merge pass {passes}/{passes}", progress)
    logger.info("%s: %d tensors merged, %d copied, %d passes", out, len(merged),
                len(out_specs) - len(merged), passes)
    return MergeSummary(out, len(merged), len(out_specs) - len(merged), passes, files)


def _float_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(jnp.dtype(str(dtype).removeprefix("torch.")) if isinstance(dtype, str)
                      else dtype)
    except TypeError:
        dt = None
    if dt not in MERGEABLE:
        raise ValueError(f"dtype={dtype!r}: expected None or one of "
                         f"{[d.name for d in MERGEABLE]}")
    return dt


# --- our methods -----------------------------------------------------------------------------


class _TaskArithmetic(TensorMerge):
    def __init__(self, scaling: Any, n_experts: int):
        self.lam = per_expert_scaling(scaling, n_experts)

    def merge_tensor(self, name, base, experts):
        return _task_arithmetic_leaf(base, tuple(experts), self.lam)


class _Average(TensorMerge):
    def merge_tensor(self, name, base, experts):
        return _mean_leaf((base, *experts))


class _PerTensorTies(TensorMerge):
    def __init__(self, scaling: float, density: float, merge_func: str):
        self.scaling, self.density, self.merge_func = scaling, density, merge_func

    def merge_tensor(self, name, base, experts):
        return _ties_merge([base], [[e] for e in experts], self.scaling, density=self.density,
                           trim="per_tensor", merge_func=self.merge_func)[0]


class _Dare(TensorMerge):
    """DARE + Task Arithmetic, or + TIES with the per-tensor trim: one tensor at a time."""

    def __init__(self, seed: int, drop: float, lam: jax.Array, rescale: bool,
                 ties_kw: tuple | None):
        self.seed, self.drop, self.lam, self.rescale, self.ties_kw = seed, drop, lam, rescale, ties_kw

    def merge_tensor(self, name, base, experts):
        return _dare_merge([base], [[e] for e in experts], tensor_key(self.seed, name), self.drop,
                           self.lam, rescale=self.rescale, ties_kw=self.ties_kw)[0]


def _task_stack(base, experts, dare):
    """``(T, *shape)`` task vectors of one tensor in compute dtype, DARE-sparsified when
    ``dare = (key, drop, rescale)`` (the same draws as :class:`_Dare`)."""
    tvs = task_vectors([base], [[e] for e in experts])
    if dare is not None:
        tvs = drop_and_rescale(dare[0], tvs, dare[1], dare[2])
    return jnp.stack([tv[0] for tv in tvs])


@functools.partial(jax.jit, static_argnames=("ct", "rescale"))
def _magnitude_bits(base, experts, key, drop, *, ct, rescale):
    dare = None if key is None else (key, drop, rescale)
    st = _task_stack(base, experts, dare)
    return _abs_bits(st.astype(ct)).reshape(st.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("ct", "rescale"))
def _trimmed_votes(base, experts, key, drop, thr, *, ct, rescale):
    dare = None if key is None else (key, drop, rescale)
    st = _task_stack(base, experts, dare)
    return sign_votes(keep_above(st, _abs_bits(st.astype(ct)), thr))


@functools.partial(jax.jit, static_argnames=("ct", "rescale", "merge_func"))
def _global_ties_tensor(base, experts, key, drop, thr, majority, scaling, *, ct, rescale,
                        merge_func):
    dare = None if key is None else (key, drop, rescale)
    st = _task_stack(base, experts, dare)
    st = keep_above(st, _abs_bits(st.astype(ct)), thr)
    return add_deltas([base], [scaling * disjoint_merge(st, majority, merge_func)])[0]


class _GlobalTies(TensorMerge):
    """TIES (optionally on DARE-sparsified task vectors) with the trim over all merged tensors.

    :meth:`prepare` finds, per expert, the bit pattern of the k-th smallest magnitude
    (``k = N - int(N * density)`` over the N merged entries, as :func:`ties_merging`) by a radix
    selection, :data:`_RADIX` bits per pass, then sums the sign votes of the trimmed vectors.
    """

    def __init__(self, scaling: float, density: float, merge_func: str,
                 dare: tuple[int, float, bool] | None):
        self.scaling, self.density, self.merge_func, self.dare = scaling, density, merge_func, dare

    def _args(self, name: str) -> tuple[Any, Any]:
        if self.dare is None:
            return None, None
        return tensor_key(self.dare[0], name), self.dare[1]

    def _static(self) -> dict[str, Any]:
        return {"ct": self.ct, "rescale": bool(self.dare and self.dare[2])}

    def prepare(self, inputs, progress):
        cts = {jnp.promote_types(inputs.specs[n][1], jnp.float32) for n in inputs.merged}
        self.ct = jax.dtypes.canonicalize_dtype(jnp.result_type(*cts) if cts else jnp.float32)
        n_t = len(inputs.experts)
        self.thr = np.zeros(n_t, np.int32 if self.ct.itemsize == 4 else np.int64)
        passes = 0
        n_total = sum(math.prod(inputs.specs[n][0]) for n in inputs.merged)
        if self.density < 1.0 and n_total:
            k = n_total - int(n_total * self.density)
            nbits = 8 * self.ct.itemsize - 1     # |x| clears the sign bit
            shifts = [_RADIX * i for i in reversed(range(-(-nbits // _RADIX)))]
            prefix = np.zeros(n_t, np.int64)
            rank = np.full(n_t, k, np.int64)
            for p, shift in enumerate(shifts):
                hist = np.zeros((n_t, 1 << _RADIX), np.int64)

                def count(name, base, experts, shift=shift, first=p == 0, hist=hist):
                    key, drop = self._args(name)
                    bits = np.asarray(_magnitude_bits(base, tuple(experts), key, drop,
                                                      **self._static()))
                    for t in range(n_t):
                        b = bits[t] if first else bits[t][(bits[t] >> (shift + _RADIX)) == prefix[t]]
                        hist[t] += np.bincount((b >> shift) & ((1 << _RADIX) - 1),
                                               minlength=1 << _RADIX)

                inputs.for_each_merged(count, f"TIES trim pass {p + 1}/{len(shifts) + 2}",
                                       progress)
                cum = np.cumsum(hist, axis=1)
                for t in range(n_t):
                    digit = int(np.searchsorted(cum[t], rank[t]))  # first bin reaching the rank
                    rank[t] -= cum[t, digit - 1] if digit else 0
                    prefix[t] = (prefix[t] << _RADIX) | digit
            self.thr = prefix.astype(self.thr.dtype)
            passes = len(shifts)
        votes = [0]

        def vote(name, base, experts):
            key, drop = self._args(name)
            votes[0] += int(_trimmed_votes(base, tuple(experts), key, drop, self.thr,
                                           **self._static()))

        inputs.for_each_merged(vote, f"TIES sign pass {passes + 1}/{passes + 2}", progress)
        self.majority = np.int32(np.sign(votes[0]))
        return passes + 1

    def merge_tensor(self, name, base, experts):
        key, drop = self._args(name)
        return _global_ties_tensor(base, tuple(experts), key, drop, self.thr, self.majority,
                                   self.scaling, merge_func=self.merge_func, **self._static())


def _settings(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    allowed = dict(METHODS[method])
    if method == "dare" and given.get("merge") == "ties":
        allowed.update({k: v for k, v in _TIES.items() if k != "scaling"})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"method={method!r} takes the settings {sorted(allowed)}; got "
                         f"{unknown}")
    return {**allowed, **given}


def _tensor_merge(method: str, s: dict[str, Any], n_experts: int) -> TensorMerge:
    if method == "task_arithmetic":
        return _TaskArithmetic(s["scaling"], n_experts)
    if method == "average":
        return _Average()
    if method == "ties":
        check_ties_args(s["density"], s["trim"], s["merge_func"])
        if s["trim"] == "per_tensor":
            return _PerTensorTies(s["scaling"], float(s["density"]), s["merge_func"])
        return _GlobalTies(s["scaling"], float(s["density"]), s["merge_func"], None)
    # dare
    if not 0.0 <= float(s["drop"]) < 1.0:
        raise ValueError(f"drop is a probability in [0, 1), got {s['drop']}.")
    if s["merge"] not in ("task_arithmetic", "ties"):
        raise ValueError(f"merge must be 'task_arithmetic' or 'ties', got {s['merge']!r}.")
    if not isinstance(s["seed"], (int, np.integer)) or isinstance(s["seed"], bool):
        raise ValueError(f"seed must be an int, got {s['seed']!r}.")
    drop, rescale = float(s["drop"]), bool(s["rescale"])
    if s["merge"] == "task_arithmetic":
        return _Dare(int(s["seed"]), drop, per_expert_scaling(s["scaling"], n_experts), rescale,
                     None)
    check_ties_args(s["density"], s["trim"], s["merge_func"])
    if not isinstance(s["scaling"], (int, float)):
        raise ValueError("merge='ties' takes one scalar scaling, not one per expert.")
    if s["trim"] == "per_tensor":
        ties_kw = (("density", float(s["density"])), ("merge_func", s["merge_func"]),
                   ("trim", "per_tensor"))
        return _Dare(int(s["seed"]), drop, jnp.asarray(s["scaling"], jnp.float32), rescale,
                     ties_kw)
    return _GlobalTies(jnp.asarray(s["scaling"], jnp.float32), float(s["density"]),
                       s["merge_func"], (int(s["seed"]), drop, rescale))


def merge_checkpoints(base: str | os.PathLike | None, experts: Sequence[str | os.PathLike],
                      out_dir: str | os.PathLike, *, method: str, filter: PathFilter = None,
                      dtype: Any = None, max_shard_size: int | str = "5GB",
                      overwrite: bool = False, progress: bool = False,
                      **settings: Any) -> MergeSummary:
    """Merges Hugging Face checkpoints tensor by tensor into a new checkpoint directory.

    Args:
      base: the pretrained checkpoint θ₀ (a directory with ``config.json`` and weights in any
        format :func:`~epmq_jax.models.hf.open_tensors` reads, or a hub repo id); None for
        ``method="average"``, whose reference is ``experts[0]``.
      experts: the fine-tuned checkpoints θ_1..θ_T: the same tensor names, shapes and dtypes.
      out_dir: the merged checkpoint directory to write (must not exist unless ``overwrite``).
      method: ``"task_arithmetic"``, ``"ties"``, ``"dare"`` or ``"average"``.
      filter: which tensors are merged: ``re.search`` on the tensor name
        (``"model.layers.0.mlp.up_proj.weight"``), a compiled pattern or a predicate; None merges
        every tensor of a floating dtype. The others are copied from the reference.
      dtype: dtype of every floating tensor written (``"bfloat16"``, ``np.float32``, ...; also
        recorded in ``config.json``); None keeps the reference's dtypes.
      max_shard_size: shard ``model.safetensors`` above this size (bytes, or ``"5GB"``, ...).
      overwrite: replace an existing ``out_dir`` (only once the new one is complete).
      progress: show a progress bar over tensors per pass (tqdm, on a terminal).
      **settings: the method's settings, named and defaulted as in the in-memory functions:
        ``task_arithmetic``: ``scaling`` (scalar or one per expert); ``ties``: ``scaling``,
        ``density``, ``trim`` (``"global"`` or ``"per_tensor"``), ``merge_func``; ``dare``:
        ``seed`` (int, instead of ``key``; see the module doc), ``drop``, ``rescale``,
        ``merge`` (``"task_arithmetic"`` or ``"ties"``), ``scaling``, and with ``"ties"`` its
        ``density``, ``trim``, ``merge_func``; ``average``: none.

    Returns:
      A :class:`MergeSummary` (the directory, counts, passes made, files written).

    Raises:
      ValueError: before any tensor is read, in one line: an unknown method or setting, a bad
        value, inputs whose tensor names, shapes or dtypes differ (naming the tensor and the
        files), ``out_dir`` that exists (without ``overwrite``) or is an input. While merging:
        a tensor holding NaN/inf (named with its file), a merged tensor that overflows ``dtype``.
        Nothing is left at ``out_dir`` on any error.
      FileNotFoundError: a checkpoint that is neither a local directory nor on the hub.
    """
    s = _settings(method, settings)
    if method == "average" and base is not None:
        raise ValueError("method='average' takes base=None: experts[0] is the reference")
    if method != "average" and base is None:
        raise ValueError(f"method={method!r} needs a base checkpoint")
    if isinstance(experts, (str, bytes, os.PathLike)) or len(experts) == 0:
        raise ValueError("experts must be a non-empty list of checkpoints")
    tm = _tensor_merge(method, s, len(experts) - (method == "average"))
    dirs = [resolve_checkpoint(e) for e in experts]
    if method == "average":
        ref, rest = dirs[0], dirs[1:]
        roles = ("experts[0]", [f"experts[{t + 1}]" for t in range(len(rest))])
    else:
        ref, rest = resolve_checkpoint(base), dirs
        roles = ("base", [f"experts[{t}]" for t in range(len(rest))])
    return stream_merge(ref, rest, out_dir, tm, filter=filter, dtype=dtype,
                        max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                        ref_role=roles[0], expert_roles=roles[1])

"""Low-bit checkpoints: parameter trees whose leaves are partly ``QuantizedWeight``.

``save(path, tree)`` / ``load(path)`` go through orbax, keep quantized kernels packed, verify
every byte on load and load on any device topology. ``export_safetensors(tree, file)`` writes
one flat safetensors file for other runtimes. ``save_pretrained(model, params, out_dir)``
(:mod:`epmq_jax.export_hf`) writes a Hugging Face GPTQ model directory for serving stacks.

**Orbax layout** (``path`` is a directory)::

    path/.epmq-checkpoint       marker: JSON {"format", "versions": [...], "pending": [...]},
                                the directories this library wrote there (only those are ever
                                deleted; a directory that is not empty and has no marker is
                                refused)
    path/.epmq-checkpoint.lock  flock'ed: saves are serialized, loads wait for a running save
    path/LATEST                 name of the current version directory, e.g. "v000003"
    path/v000003/state/         orbax checkpoint of the tree, every QuantizedWeight expanded
                                into {packed, scales, zeros, g_idx[, input_scale]}
    path/v000003/epmq.json      {"format": "epmq-jax-tree/2", "quantized": {leaf path: static
                                metadata (bits, group_size, symmetric, shape, dtype)},
                                "arrays": {stored path: {dtype, shape, sha256 of the host
                                bytes}}, "files": {path under v000003: {size, sha256}},
                                "manifest_sha256": sha256 of the rest}

A save writes the new version under a temporary name (recorded in the marker first, so a
killed save's leftovers are removed by the next one), renames it into place, replaces
``LATEST`` (``os.replace``) and only then removes the older versions. A crash at any point
leaves ``LATEST`` naming a complete checkpoint. orbax's ``CheckpointManager`` is not used: it
finds (and deletes) versions by directory name, the manifest of the files orbax wrote cannot
be part of its atomic step, and it does not lock against a second process.

``load`` first checks the size and sha256 of every file (so orbax never reads a damaged file:
its private event loop is closed on the first failed read while other reads are in flight,
which prints one "Event loop is closed" traceback per pending read), then reads every array
to the host, checks its checksum and places it: on the default device, or with the sharding
of the matching ``target`` leaf, whatever the device count at save time. Without ``target``
it returns nested dicts keyed by the path components (lists come back as dicts keyed "0",
"1", ...); ``target`` restores the original structure (e.g. an ``nnx.State``).

**safetensors export** (flat names; ``<path>`` is the leaf path, e.g.
``params/encoder/fc1/kernel``). A ``QuantizedWeight`` of shape ``(d_in, d_out)``, ``bits``
b, ``n_groups`` groups becomes GPTQ-style tensors:

- ``<path>.qweight``: int32 ``(ceil(d_in*b/32), d_out)``: the codes packed along ``d_in`` as a
  little-endian bitstream per column (code i at bits ``[i*b, (i+1)*b)``, word k holds stream
  bits ``[32k, 32k+32)``, zero-padded); for b = 4 that is 8 codes per word, row i of the
  kernel in bits ``4*(i % 8)`` of word ``i // 8`` (GPTQ's layout);
- ``<path>.qzeros``: int32 ``(n_groups, ceil(d_out*b/32))``: zero points packed the same way
  along ``d_out``, stored as is (no "-1" offset; that is GPTQModel's ``gptq_v2``
  convention, not the legacy GPTQ-for-LLaMa one);
- ``<path>.scales``: float32 ``(n_groups, d_out)``;
- ``<path>.g_idx``: int32 ``(d_in,)``, the group of each input row;
- ``<path>.input_scale``: float32 ``(d_in,)``, only when present (AWQ): the kernel is
  ``scales[g_idx] * (q - qzeros[g_idx]) / input_scale[:, None]``.

Other leaves are stored under ``<path>`` unchanged. The file metadata key ``"epmq_jax"``
holds JSON ``{path: {bits, group_size, symmetric, shape, dtype}}`` for the quantized leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from epmq_jax._tree import leaves_with_paths, path_str
from epmq_jax.export_hf import save_pretrained  # noqa: F401  (re-exported)
from epmq_jax.quant import QuantizedWeight, is_quantized

FORMAT = "epmq-jax-tree/2"
_UNVERIFIED_FORMAT = "epmq-jax-tree/1"     # written before manifests: loads with a warning
MARKER = ".epmq-checkpoint"
_MARKER_FORMAT = "epmq-jax-checkpoint-dir/1"
_LOCK = ".epmq-checkpoint.lock"
_ARRAY_FIELDS = ("packed", "scales", "zeros", "g_idx", "input_scale")
_META_FIELDS = ("bits", "group_size", "symmetric", "shape", "dtype")
_VERSION = re.compile(r"^v(\d{6})$")


def _meta(qw: QuantizedWeight) -> dict[str, Any]:
    return {f: (list(getattr(qw, f)) if f == "shape" else getattr(qw, f)) for f in _META_FIELDS}


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


@dataclasses.dataclass(frozen=True)
class _Stored:
    """What one version holds: ``arrays`` {stored path: array}, ``quantized`` {leaf path: meta}."""
    arrays: dict[str, Any]
    quantized: dict[str, Any]


def _storable(tree: Any) -> _Stored:
    """Flattens ``tree`` to stored paths, refusing what orbax could not store faithfully.

    Raises:
      ValueError: a single leaf, two leaves stored under one name (orbax names an array by its
        path with "/" and "." alike as separators), a leaf that is also a parent of another, an
        empty array, or an array spread over several processes.
    """
    arrays: dict[str, Any] = {}
    quantized: dict[str, Any] = {}
    source: dict[str, str] = {}
    for path, leaf in leaves_with_paths(tree, is_leaf=is_quantized):
        if not path:
            raise ValueError("tree: must be a container of arrays, not a single leaf")
        if is_quantized(leaf):
            quantized[path] = _meta(leaf)
            items = [(f"{path}/{f}", getattr(leaf, f)) for f in _ARRAY_FIELDS
                     if getattr(leaf, f) is not None]
        else:
            items = [(path, leaf)]
        for stored, x in items:
            name = stored.replace("/", ".")
            if name in source:
                raise ValueError(f"tree: leaves {source[name]!r} and {path!r} would both be stored "
                                 f"as {name!r} ('/' and '.' in keys both separate levels)")
            source[name] = path
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                raise ValueError(f"tree: leaf {path!r} spans several processes; checkpoint.save "
                                 "runs in one process (gather the tree first)")
            if np.size(x) == 0:
                raise ValueError(f"tree: leaf {path!r} has shape {np.shape(x)}; orbax cannot "
                                 "store an empty array")
            arrays[stored] = x
    if not arrays:
        raise ValueError("tree: has no array leaves to save")
    for stored in arrays:
        parts = stored.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in arrays:
                raise ValueError(f"tree: leaf {source['.'.join(parts[:i])]!r} is also the parent "
                                 f"of leaf {source[stored.replace('/', '.')]!r}")
    return _Stored(arrays, quantized)


def _digest(x: Any) -> dict[str, Any]:
    """dtype, shape and sha256 of an array's host bytes (C order)."""
    a = np.asarray(x)
    data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": hashlib.sha256(data).hexdigest()}


def _file_digest(file: Path) -> dict[str, Any]:
    with open(file, "rb") as fh:
        return {"size": file.stat().st_size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}


def _manifest_sha256(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_atomic(file: Path, text: str) -> None:
    """Writes ``file`` so that readers see the old or the new content, never a part."""
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; any failure is a one-line ValueError naming the file."""
    try:
        obj = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: corrupt (expected a JSON object, got {type(obj).__name__})")
    return obj


def _write_version(tmp: Path, stored: _Stored) -> None:
    """Writes a complete checkpoint, with its manifest, into the fresh directory ``tmp``."""
    import orbax.checkpoint as ocp

    me = jax.process_index()     # this process alone, also in a multi-host job: no barrier
    only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=only_me) as ckptr:
        ckptr.save(tmp.absolute() / "state", _nested(stored.arrays))
        ckptr.wait_until_finished()
    files = sorted(p for p in (tmp / "state").rglob("*") if p.is_file())
    meta = {"format": FORMAT, "quantized": stored.quantized,
            "arrays": {p: _digest(x) for p, x in stored.arrays.items()},
            "files": {p.relative_to(tmp).as_posix(): _file_digest(p) for p in files}}
    meta["manifest_sha256"] = _manifest_sha256(meta)
    _write_atomic(tmp / "epmq.json", json.dumps(meta))


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[None]:
    """Holds ``path``'s lock file: exclusive (created if needed) or shared (if it exists)."""
    lock = path / _LOCK
    if not exclusive and not lock.exists():
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)       # releases the lock


def _foreign(path: Path) -> list[str]:
    """What ``path`` holds that this library did not write (everything, if it has no marker)."""
    if not path.is_dir() or (path / MARKER).exists():
        return []
    return sorted(p.name for p in path.iterdir() if p.name != _LOCK)


def _refuse_foreign(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: {path} is a file; expected a checkpoint directory")
    if found := _foreign(path):
        raise ValueError(f"path: {path} is not empty ({', '.join(found[:3])}"
                         f"{', ...' if len(found) > 3 else ''}) and has no {MARKER} marker; "
                         "save writes only into a new or empty directory or one it wrote")


def _read_marker(path: Path) -> dict[str, Any]:
    marker = _read_json(path / MARKER)
    if (marker.get("format") != _MARKER_FORMAT
            or not all(isinstance(marker.get(k), list) for k in ("versions", "pending"))):
        raise ValueError(f"{path / MARKER}: corrupt (expected format {_MARKER_FORMAT!r} with "
                         "'versions' and 'pending' lists)")
    return marker


def _write_marker(path: Path, marker: dict[str, Any]) -> None:
    _write_atomic(path / MARKER, json.dumps(marker))


def _point_latest(path: Path, name: str) -> None:
    _write_atomic(path / "LATEST", name)


def save(path: str | os.PathLike, tree: Any) -> Path:
    """Saves a param tree (``QuantizedWeight`` leaves stay packed) atomically under ``path``.

    Concurrent saves to one directory (threads or processes) run one after the other; the
    last one's version is the current one.

    Args:
      path: checkpoint directory: new, empty, or one this function wrote before (its earlier
        versions are replaced; nothing else in it is touched).
      tree: nested dicts / lists / ``nnx.State`` of arrays and ``QuantizedWeight`` s, all in
        this process (single-host; arrays may be sharded over its devices).

    Returns:
      The directory of the version written.

    Raises:
      ValueError: before anything is written: ``path`` is a file, or a non-empty directory
        without this library's marker; two leaves would be stored under one name (``"a/b"``
        beside ``{"a": {"b": ...}}``, or ``"a.b"``); an empty array; a corrupt marker.
    """
    path = Path(path)
    stored = _storable(tree)
    _refuse_foreign(path)
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path, exclusive=True):
        if not (path / MARKER).exists():
            _refuse_foreign(path)           # another process may have written there meanwhile
            _write_marker(path, {"format": _MARKER_FORMAT, "versions": [], "pending": []})
        marker = _read_marker(path)
        taken = set(marker["versions"]) | {p.name for p in path.iterdir()}
        n = 1 + max((int(m.group(1)) for m in map(_VERSION.match, taken) if m), default=-1)
        name, tmp = f"v{n:06d}", f".tmp-v{n:06d}-{uuid.uuid4().hex}"
        marker["pending"].append(tmp)
        _write_marker(path, marker)                     # owned before it exists
        try:
            (path / tmp).mkdir()
            _write_version(path / tmp, stored)
            os.rename(path / tmp, path / name)
        except BaseException:
            shutil.rmtree(path / tmp, ignore_errors=True)
            marker["pending"].remove(tmp)
            _write_marker(path, marker)
            raise
        marker["pending"].remove(tmp)
        marker["versions"].append(name)
        _write_marker(path, marker)
        _point_latest(path, name)
        for old in marker["versions"][:-1] + marker["pending"]:   # and leftovers of killed saves
            shutil.rmtree(path / old, ignore_errors=True)
        _write_marker(path, {**marker, "versions": [name], "pending": []})
    return path / name


def _current_version(path: Path) -> Path:
    latest = path / "LATEST"
    if not latest.is_file():
        raise ValueError(f"{path}: no checkpoint (missing {latest.name})")
    try:
        name = latest.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{latest}: unreadable or corrupt ({type(e).__name__})") from None
    if not _VERSION.match(name):
        raise ValueError(f"{latest}: corrupt (expected a version name like 'v000003', got "
                         f"{name[:40]!r})")
    if not (path / name).is_dir():
        raise ValueError(f"{latest}: names {name}, which is missing from {path}")
    return path / name


def _read_manifest(version: Path) -> dict[str, Any]:
    """``epmq.json`` of a version, checked against its own checksum."""
    file = version / "epmq.json"
    meta = _read_json(file)
    if meta.get("format") == _UNVERIFIED_FORMAT and isinstance(meta.get("quantized"), dict):
        warnings.warn(f"{version}: written without checksums (format {_UNVERIFIED_FORMAT}); "
                      "loaded unverified. Save it again to add them.", stacklevel=3)
        return meta
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("manifest_sha256") != _manifest_sha256(meta) or not all(
            isinstance(meta.get(k), dict) for k in ("quantized", "arrays", "files")):
        raise ValueError(f"{file}: corrupt (its content does not match its checksum)")
    return meta


def _check_files(version: Path, files: dict[str, Any]) -> None:
    for rel, want in files.items():
        file = version / rel
        if not file.is_file():
            raise ValueError(f"{file}: missing from the checkpoint")
        got = _file_digest(file)
        if got["size"] != want["size"]:
            raise ValueError(f"{file}: truncated or altered ({got['size']} bytes, "
                             f"{want['size']} written)")
        if got["sha256"] != want["sha256"]:
            raise ValueError(f"{file}: corrupt (sha256 differs from the one written)")


def _restore(state: Path) -> dict[str, np.ndarray]:
    """Every array of an orbax checkpoint as a host NumPy array, keyed by stored path."""
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(state.absolute()).item_metadata.tree
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = ckptr.restore(state.absolute(), args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:        # orbax raises bare Exception, ValueError, OSError, ...
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{state}: orbax cannot read it ({type(e).__name__}: {first})") from None
    return {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _check_arrays(version: Path, flat: dict[str, np.ndarray], arrays: dict[str, Any]) -> None:
    for p in sorted(set(flat) | set(arrays)):
        if p not in flat or p not in arrays:
            where = "the manifest" if p in flat else "the stored arrays"
            raise ValueError(f"{version}: array {p!r} is missing from {where}")
        if _digest(flat[p]) != arrays[p]:
            raise ValueError(f"{version}: array {p!r} fails its checksum (dtype, shape or bytes "
                             "differ from what was saved)")


def _sharding(x: Any) -> jax.sharding.Sharding | None:
    """A target leaf's sharding: a Sharding itself, an array's / ShapeDtypeStruct's, or None."""
    if isinstance(x, jax.sharding.Sharding):
        return x
    return getattr(x, "sharding", None)


def _field_shardings(target: Any) -> dict[str, jax.sharding.Sharding | None]:
    """Shardings of a loaded ``QuantizedWeight`` 's arrays for its ``target`` leaf.

    A target ``QuantizedWeight`` gives each field's own sharding. A kernel (array, abstract
    array or sharding of the ``(d_in, d_out)`` kernel) carries its ``d_out`` split over to
    ``packed``, ``scales`` and ``zeros`` (all ``(rows, d_out)``) and replicates ``g_idx`` and
    ``input_scale`` over the same mesh; a sharding other than ``NamedSharding`` is used as is.
    """
    kernel = _sharding(target.packed) if is_quantized(target) else _sharding(target)
    cols = vec = kernel
    if isinstance(kernel, NamedSharding):
        spec = (*kernel.spec, None, None)
        cols = NamedSharding(kernel.mesh, PartitionSpec(None, spec[1]))
        vec = NamedSharding(kernel.mesh, PartitionSpec())
    derived = {"packed": cols, "scales": cols, "zeros": cols, "g_idx": vec, "input_scale": vec}
    if not is_quantized(target):
        return derived
    return {f: _sharding(getattr(target, f)) or derived[f] for f in _ARRAY_FIELDS}


def _place(x: Any, target: Any) -> Any:
    """Host leaf ``x`` (array or QuantizedWeight of host arrays) on ``target`` 's devices."""
    if not is_quantized(x):
        return jax.device_put(x, _sharding(target))
    shardings = _field_shardings(target)
    return dataclasses.replace(x, **{f: jax.device_put(getattr(x, f), shardings[f])
                                     for f in _ARRAY_FIELDS if getattr(x, f) is not None})


def load(path: str | os.PathLike, target: Any = None) -> Any:
    """Loads the current version saved by :func:`save`, on any device topology.

    Every file and every array is checked against the checksums written with the version.

    Args:
      path: the checkpoint directory.
      target: optional tree whose structure the result takes; leaves are matched by path and
        give the placement: an array or ``jax.ShapeDtypeStruct`` (its sharding), a
        ``jax.sharding.Sharding``, a ``QuantizedWeight`` (its fields' shardings) or anything
        else (the default device). A float kernel (or its sharding) where the checkpoint has
        a ``QuantizedWeight`` shards the packed arrays along ``d_out`` like the kernel.

    Returns:
      Nested dicts (or ``target`` 's structure) of arrays on the default device (or placed as
      ``target`` says), ``QuantizedWeight`` leaves rebuilt. NumPy leaves come back as JAX
      arrays (64-bit types narrowed unless ``jax_enable_x64``).

    Raises:
      ValueError: one line naming the file or array: no checkpoint, a corrupt ``LATEST``
        or ``epmq.json``, a missing, truncated or altered file, an array that fails its
        checksum; or ``target`` has paths the checkpoint lacks or a leaf of another shape.
    """
    path = Path(path)
    with _locked(path, exclusive=False):
        version = _current_version(path)
        meta = _read_manifest(version)
        verified = meta["format"] == FORMAT
        if verified:
            _check_files(version, meta["files"])
        flat: dict[str, Any] = _restore(version / "state")
        if verified:
            _check_arrays(version, flat, meta["arrays"])
    for qpath, m in meta["quantized"].items():
        arrays = {f: flat.pop(f"{qpath}/{f}", None) for f in _ARRAY_FIELDS}
        flat[qpath] = QuantizedWeight(**arrays, **{**m, "shape": tuple(m["shape"])})
    if target is None:
        return _nested({p: _place(x, None) for p, x in flat.items()})

    def take(kp, t):
        p = path_str(kp)
        if p not in flat:
            raise ValueError(f"{p}: in target but not in the checkpoint at {version}")
        want = None if isinstance(t, jax.sharding.Sharding) else getattr(t, "shape", None)
        have = tuple(flat[p].shape)
        if want is not None and tuple(want) != have:
            raise ValueError(f"{p}: target has shape {tuple(want)}, the checkpoint at {version} "
                             f"{have}")
        return _place(flat[p], t)
    return jax.tree_util.tree_map_with_path(
        take, target, is_leaf=lambda x: is_quantized(x) or isinstance(x, jax.sharding.Sharding))


def _words(b: np.ndarray) -> np.ndarray:
    """uint8 ``(nbytes, k)`` bitstream bytes along axis 0 -> int32 ``(ceil(nbytes/4), k)``."""
    b = np.pad(b, ((0, -b.shape[0] % 4), (0, 0))).astype(np.uint32)
    w = b[0::4] | (b[1::4] << 8) | (b[2::4] << 16) | (b[3::4] << 24)
    return w.view(np.int32)


def _export_names(path: str, leaf: Any) -> list[str]:
    if not is_quantized(leaf):
        return [path]
    fields = ("qweight", "qzeros", "scales", "g_idx") + (
        ("input_scale",) if leaf.input_scale is not None else ())
    return [f"{path}.{f}" for f in fields]


def export_safetensors(tree: Any, file: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes a param tree to one safetensors file with GPTQ-style packed tensors.

    Args:
      tree: nested dicts / ``nnx.State`` of arrays and ``QuantizedWeight`` s.
      file: the ``.safetensors`` file to write (written to a temporary file beside it, then
        renamed into place; the temporary file is removed on any error).
      overwrite: replace ``file`` if it exists.

    Returns:
      The file path. Naming and layout: see this module's docstring.

    Raises:
      ValueError: before anything is written: ``file`` is a directory, exists (without
        ``overwrite``) or its directory does not; two leaves would export a tensor of the
        same name (e.g. a leaf ``"a.qweight"`` beside a quantized ``"a"``).
    """
    from safetensors.numpy import save_file

    from epmq_jax.quant import pack_codes

    file = Path(file)
    if file.is_dir():
        raise ValueError(f"file: {file} is a directory; expected the path of a .safetensors file")
    if file.exists() and not overwrite:
        raise ValueError(f"file: {file} exists; pass overwrite=True to replace it")
    if not file.parent.is_dir():
        raise ValueError(f"file: directory {file.parent} does not exist")
    leaves = leaves_with_paths(tree, is_leaf=is_quantized)
    source: dict[str, str] = {}
    for path, leaf in leaves:
        for name in _export_names(path, leaf):
            if name in source:
                raise ValueError(f"tree: leaves {source[name]!r} and {path!r} both export the "
                                 f"tensor {name!r}")
            source[name] = path

    tensors, meta = {}, {}
    for path, leaf in leaves:
        if not is_quantized(leaf):
            tensors[path] = np.asarray(leaf)
            continue
        meta[path] = _meta(leaf)
        zeros = np.asarray(leaf.zeros).astype(np.uint8)               # (n_groups, d_out)
        tensors.update(zip(_export_names(path, leaf), [
            _words(np.asarray(leaf.packed)),
            _words(np.asarray(pack_codes(zeros.T, leaf.bits))).T,
            np.asarray(leaf.scales, np.float32),
            np.asarray(leaf.g_idx, np.int32),
            *([np.asarray(leaf.input_scale, np.float32)] if leaf.input_scale is not None else [])]))
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}.tmp")
    try:       # safetensors writes an array's memory as it lies: C order only
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata={"epmq_jax": json.dumps(meta)})
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file

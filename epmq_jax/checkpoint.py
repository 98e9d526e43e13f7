"""Low-bit checkpoints: parameter trees whose leaves are partly ``QuantizedWeight``.

``save(path, tree)`` / ``load(path)`` go through orbax and keep quantized kernels packed.
``export_safetensors(tree, file)`` writes one flat safetensors file for other runtimes.

**Orbax layout** (``path`` is a directory)::

    path/LATEST            name of the current version directory, e.g. "v000003"
    path/v000003/state/    orbax checkpoint of the tree, every QuantizedWeight expanded
                           into {packed, scales, zeros, g_idx[, input_scale]}
    path/v000003/epmq.json {"format": "epmq-jax-tree/1", "quantized": {leaf path: static
                           metadata (bits, group_size, symmetric, shape, dtype)}}

Saves are atomic: a new version is written under a temporary name, renamed into place
(one ``rename``), and only then ``LATEST`` is replaced (``os.replace``); older versions are
removed afterwards. A crash at any point leaves ``LATEST`` naming a complete checkpoint.
``load`` needs no target: it returns nested dicts keyed by the path components (lists come
back as dicts keyed "0", "1", ...); pass ``target`` to get the original structure back
(e.g. an ``nnx.State``).

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

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

from epmq_jax._tree import leaves_with_paths, path_str
from epmq_jax.quant import QuantizedWeight, is_quantized

FORMAT = "epmq-jax-tree/1"
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


def _storable(tree: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The nested dict orbax writes, and the static metadata of the quantized leaves."""
    flat, quantized = {}, {}
    for path, leaf in leaves_with_paths(tree, is_leaf=is_quantized):
        if not path:
            raise ValueError("the tree must be a container of arrays, not a single leaf")
        if is_quantized(leaf):
            quantized[path] = _meta(leaf)
            for f in _ARRAY_FIELDS:
                if getattr(leaf, f) is not None:
                    flat[f"{path}/{f}"] = getattr(leaf, f)
        else:
            flat[path] = leaf
    return _nested(flat), quantized


def _versions(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _VERSION.match(p.name))


def _write_version(tmp: Path, tree: Any) -> None:
    """Writes a complete checkpoint into the fresh directory ``tmp``."""
    import orbax.checkpoint as ocp

    state, quantized = _storable(tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp.absolute() / "state", state)
        ckptr.wait_until_finished()
    (tmp / "epmq.json").write_text(json.dumps({"format": FORMAT, "quantized": quantized}))


def _point_latest(path: Path, name: str) -> None:
    tmp = path / f".LATEST.{uuid.uuid4().hex}"
    tmp.write_text(name)
    os.replace(tmp, path / "LATEST")


def save(path: str | os.PathLike, tree: Any) -> Path:
    """Saves a param tree (``QuantizedWeight`` leaves stay packed) atomically under ``path``.

    Args:
      path: checkpoint directory (created if needed); earlier versions in it are replaced.
      tree: nested dicts / lists / ``nnx.State`` of arrays and ``QuantizedWeight`` s.

    Returns:
      The directory of the version written.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    old = _versions(path)
    name = f"v{int(_VERSION.match(old[-1].name).group(1)) + 1 if old else 0:06d}"
    tmp = path / f".tmp-{name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    _write_version(tmp, tree)
    os.rename(tmp, path / name)
    _point_latest(path, name)
    for p in path.iterdir():          # clean up: older versions and leftovers of crashed saves
        if p.name != name and (p in old or p.name.startswith(".tmp-")):
            shutil.rmtree(p, ignore_errors=True)
    return path / name


def load(path: str | os.PathLike, target: Any = None) -> Any:
    """Loads the current version saved by :func:`save`.

    Args:
      path: the checkpoint directory.
      target: optional tree (arrays, abstract arrays or ``QuantizedWeight`` s) whose structure
        the result takes; leaves are matched by path.

    Returns:
      Nested dicts (or ``target`` 's structure) with ``QuantizedWeight`` leaves rebuilt.

    Raises:
      ValueError: no complete checkpoint under ``path``, or ``target`` has paths the
        checkpoint lacks.
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    latest = path / "LATEST"
    if not latest.is_file():
        raise ValueError(f"{path}: no checkpoint (missing {latest.name})")
    version = path / latest.read_text().strip()
    meta = json.loads((version / "epmq.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{version}: format {meta.get('format')!r}, expected {FORMAT!r}")
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(version.absolute() / "state")
    flat = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    for qpath, m in meta["quantized"].items():
        arrays = {f: flat.pop(f"{qpath}/{f}", None) for f in _ARRAY_FIELDS}
        flat[qpath] = QuantizedWeight(**arrays, **{**m, "shape": tuple(m["shape"])})
    if target is None:
        return _nested(flat)

    def take(kp, _):
        p = path_str(kp)
        if p not in flat:
            raise ValueError(f"{p}: in target but not in the checkpoint at {version}")
        return flat[p]
    return jax.tree_util.tree_map_with_path(take, target, is_leaf=is_quantized)


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

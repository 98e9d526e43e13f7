"""Models streamed from their checkpoint directories: a param tree that reads tensors only when
a subtree (a block) is asked for.

At LLM size T expert models do not fit in memory. :class:`CheckpointTree` stands in for one
expert's pure param tree (nested dicts in the model's own layout: Flax kernels ``(d_in, d_out)``,
the dtypes of the tree it was built ``like``) and holds no tensor:

- ``tree[key]`` on an inner node is a view of that subtree (nothing is read); on a leaf it reads
  that one tensor;
- :func:`materialize` (or :meth:`CheckpointTree.materialize`) reads one subtree, e.g. a decoder
  block, into a pure dict of NumPy arrays;
- :func:`abstract` gives the tree's ``jax.ShapeDtypeStruct`` leaves without reading anything.

Nothing read is cached: the caller holds what it materialised and memory goes when it drops it.
The calibration driver (:func:`epmq_jax.calib.calibrate`) and :func:`epmq_jax.calib.regmean_merge`
take such trees as ``experts``: they materialise expert t's block k when they reach block k,
so memory is about one block times T, not T models; the embedding step reads only the leaves
the adapter's ``embed`` uses.

Checkpoint names map to model paths as :func:`epmq_jax.models.hf.load_into` maps them (a final
``weight`` lands on ``kernel``/``scale``/``embedding``, 2-D kernels are transposed), with a
family's ``rename``/``ignore``; every path of ``like`` must be in the checkpoint with its shape,
which is checked from the files' headers when the tree is built. Family helpers build these
trees, e.g. :func:`epmq_jax.models.llama.experts_from_pretrained`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from epmq_jax._tree import leaves_with_paths
from epmq_jax.models import hf

PyTree = Any


class _Source:
    """What every view of one checkpoint shares: the lazy tensors and the path -> name map."""

    def __init__(self, directory: Path, tensors: hf.CheckpointTensors, names: dict[str, str],
                 specs: dict[str, jax.ShapeDtypeStruct]):
        self.directory, self.tensors, self.names, self.specs = directory, tensors, names, specs

    def read(self, path: str) -> np.ndarray:
        """The tensor of model path ``path`` in the model's layout and dtype (C-contiguous)."""
        spec = self.specs[path]
        value = np.asarray(self.tensors[self.names[path]])
        axes = hf.flax_axes(path.rsplit("/", 1)[-1], value.ndim)
        if axes is not None:
            value = value.transpose(axes)
        return np.ascontiguousarray(value, dtype=spec.dtype)


class CheckpointTree(Mapping):
    """A checkpoint directory as a lazy pure param tree (see the module docstring).

    Args:
      directory: a checkpoint directory (any format :func:`~epmq_jax.models.hf.open_tensors`
        reads; sharded safetensors for LLMs).
      like: the model's param tree (pure nested dicts of arrays or ``jax.ShapeDtypeStruct``),
        giving the structure, shapes and dtypes (tensors are cast to its dtypes when read).
      rename: checkpoint name -> the model's dotted name, or None to skip it (as
        :func:`~epmq_jax.models.hf.load_into`).
      ignore: regexes (``re.search``) of checkpoint names to skip.
      allow_nonfinite: accept NaN/inf in the tensors (refused when read, by default).

    Raises:
      FileNotFoundError: no weights in a supported format.
      epmq_jax.models.hf.CheckpointMismatchError: checkpoint tensors with no place in ``like``,
        paths of ``like`` the checkpoint lacks, or shapes that differ (all listed, from the
        headers, before any tensor is read).
    """

    def __init__(self, directory: str | os.PathLike, like: PyTree, *,
                 rename: Callable[[str], str | None] = lambda name: name,
                 ignore: Iterable[str] = (), allow_nonfinite: bool = False):
        directory = Path(directory)
        tensors = hf.open_tensors(directory, allow_nonfinite=allow_nonfinite)
        specs = {p: jax.ShapeDtypeStruct(tuple(np.shape(x)), np.dtype(x.dtype))
                 for p, x in leaves_with_paths(like)}
        patterns = [re.compile(r) for r in ignore]
        names: dict[str, str] = {}
        unknown, mismatched = [], []
        for name in tensors:
            path = hf.model_path(name, specs, rename, patterns)
            if path is None:
                continue
            if path not in specs or path in names:
                unknown.append(name)
                continue
            shape, _, _ = tensors.info(name)
            axes = hf.flax_axes(path.rsplit("/", 1)[-1], len(shape))
            shape = shape if axes is None else tuple(shape[a] for a in axes)
            if shape != specs[path].shape:
                mismatched.append((name, path, shape, specs[path].shape))
                continue
            names[path] = name
        missing = sorted(set(specs) - set(names) - {m[1] for m in mismatched})
        if unknown or missing or mismatched:
            raise hf.CheckpointMismatchError(sorted(unknown), missing, mismatched)
        self._source = _Source(directory, tensors, names, specs)
        self._skeleton = _skeleton(like, "")
        self._prefix: tuple = ()

    @classmethod
    def _view(cls, source: _Source, skeleton: Mapping, prefix: tuple) -> CheckpointTree:
        view = cls.__new__(cls)
        view._source, view._skeleton, view._prefix = source, skeleton, prefix
        return view

    # -- the Mapping interface: inner nodes are views, leaves are read ------------------------

    def __getitem__(self, key: Any) -> Any:
        node = self._skeleton[key]      # KeyError for a key the model does not have
        if isinstance(node, str):
            return self._source.read(node)
        return CheckpointTree._view(self._source, node, (*self._prefix, key))

    def __iter__(self) -> Iterator:
        return iter(self._skeleton)

    def __len__(self) -> int:
        return len(self._skeleton)

    def __repr__(self) -> str:
        where = "/".join(map(str, self._prefix))
        return f"CheckpointTree({str(self._source.directory)!r}{', at ' + where if where else ''})"

    # -- whole subtrees ------------------------------------------------------------------------

    def materialize(self) -> dict:
        """This subtree read into a pure dict of NumPy arrays (model layout and dtypes)."""
        return _map_skeleton(self._skeleton, self._source.read)

    def abstract(self) -> dict:
        """This subtree with ``jax.ShapeDtypeStruct`` leaves (nothing is read)."""
        return _map_skeleton(self._skeleton, self._source.specs.__getitem__)

    def fingerprint(self) -> str:
        """A short identity of the checkpoint files (names, sizes, modification times) and of
        this view, for resumable runs (a changed file changes it; no tensor is read)."""
        d = self._source.directory
        files = [(f, (d / f).stat().st_size, (d / f).stat().st_mtime_ns)
                 for f in self._source.tensors.files]
        text = repr((str(d.resolve()), files, self._prefix, sorted(self._source.names.items())))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _skeleton(tree: Any, prefix: str) -> Any:
    """The nested-dict structure of ``tree`` with each leaf replaced by its path string."""
    if isinstance(tree, Mapping):
        return {k: _skeleton(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
    return prefix


def _map_skeleton(node: Any, fn: Callable[[str], Any]) -> Any:
    if isinstance(node, str):
        return fn(node)
    return {k: _map_skeleton(v, fn) for k, v in node.items()}


def is_lazy(tree: Any) -> bool:
    """Whether ``tree`` is a streamed :class:`CheckpointTree` (or a view of one)."""
    return isinstance(tree, CheckpointTree)


def materialize(tree: PyTree) -> PyTree:
    """A lazy tree (or view) read into a pure dict of NumPy arrays; anything else as it is."""
    return tree.materialize() if is_lazy(tree) else tree


def abstract(tree: PyTree) -> PyTree:
    """The ``jax.ShapeDtypeStruct`` tree of a lazy tree (nothing read) or of arrays."""
    if is_lazy(tree):
        return tree.abstract()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)

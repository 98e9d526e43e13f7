"""Pytree path helpers shared by merging, quantization and calibration.

A leaf's *path* is the string of its keys joined by "/", e.g. ``"params/encoder/layers/0/fc1/kernel"``
for a linen param dict, an ``nnx.State`` or a plain nested dict. Path filters throughout the
library are regular expressions matched with ``re.search`` against that string.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import jax

PathFilter = str | re.Pattern | Callable[[str], bool] | None


def _key_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k).strip(".[]'\"")


def path_str(keypath: tuple) -> str:
    """Turns a jax key path into the "a/b/0/kernel" form used by path filters.

    The trailing ``.value`` attribute through which an ``nnx.Variable`` flattens is dropped, so
    a leaf of an ``nnx.State`` has the same path as in ``state.to_pure_dict()`` or a linen dict.
    """
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
        keypath = keypath[:-1]
    return "/".join(_key_str(k) for k in keypath)


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """Returns ``[(path, leaf), ...]`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def iter_paths(tree: Any) -> Iterator[str]:
    for p, _ in leaves_with_paths(tree):
        yield p


def compile_filter(filt: PathFilter) -> Callable[[str], bool]:
    """Makes a predicate on path strings: None matches everything, a str/Pattern is ``re.search``."""
    if filt is None:
        return lambda _p: True
    if callable(filt) and not isinstance(filt, re.Pattern):
        return filt
    pat = re.compile(filt) if isinstance(filt, str) else filt
    return lambda p: pat.search(p) is not None


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any,
                  is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """``jax.tree.map`` whose function also receives the leaf's path string first."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, *r: fn(path_str(kp), x, *r), tree, *rest, is_leaf=is_leaf)

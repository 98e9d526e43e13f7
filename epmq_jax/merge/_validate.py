"""Input checks and leaf bookkeeping shared by the merge functions.

Every merge function flattens its inputs with :func:`flatten_inputs`, which checks (eagerly,
before any arithmetic) that the experts match ``base`` leaf by leaf and that no input holds NaN
or inf, and which records, per leaf, whether the path filter selects it for merging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epmq_jax._tree import PathFilter, compile_filter, leaves_with_paths, path_str


@dataclasses.dataclass(frozen=True)
class FlatInputs:
    """The flattened reference tree and experts.

    Attributes:
      treedef: tree structure of the reference tree; merged outputs are built with it.
      paths: leaf path strings (``"a/b/kernel"``) in flattening order.
      ref: leaves of the reference tree (``base``, or the first expert for ``average``).
      experts: ``experts[t][i]`` is leaf ``i`` of expert ``t``.
      selected: ``selected[i]`` is True when leaf ``i`` is merged: its path matches the filter
        and its dtype is floating point. Every other leaf is copied from ``ref``.
    """

    treedef: Any
    paths: list[str]
    ref: list[Any]
    experts: list[list[Any]]
    selected: list[bool]

    def unflatten(self, merged: Sequence[Any]) -> Any:
        """Builds the output tree: ``merged`` holds one leaf per selected leaf, in order."""
        it = iter(merged)
        leaves = [next(it) if s else r for r, s in zip(self.ref, self.selected)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _dtype(x: Any) -> np.dtype:
    return jnp.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_structure(ref_paths: list[str], paths: list[str], ref_name: str, name: str) -> None:
    if paths == ref_paths:
        return
    ref_set, other_set = set(ref_paths), set(paths)
    missing = [p for p in ref_paths if p not in other_set]
    if missing:
        raise ValueError(
            f"{name} has no leaf at path '{missing[0]}' that {ref_name} has "
            f"({len(missing)} missing in all); trees must have the same structure.")
    extra = [p for p in paths if p not in ref_set]
    if extra:
        raise ValueError(
            f"{name} has an extra leaf at path '{extra[0]}' that {ref_name} lacks "
            f"({len(extra)} extra in all); trees must have the same structure.")
    raise ValueError(f"{name} has the same leaf paths as {ref_name} in a different order "
                     f"(first differing position: '{next(p for p, q in zip(paths, ref_paths) if p != q)}').")


def _check_leaves(ref_paths: list[str], ref: list[Any], leaves: list[Any], ref_name: str,
                  name: str) -> None:
    for p, a, b in zip(ref_paths, ref, leaves):
        if _shape(a) != _shape(b):
            raise ValueError(f"Leaf '{p}': {name} has shape {_shape(b)}, expected {_shape(a)} "
                             f"as in {ref_name}.")
        if _dtype(a) != _dtype(b):
            raise ValueError(f"Leaf '{p}': {name} has dtype {_dtype(b)}, expected {_dtype(a)} "
                             f"as in {ref_name}.")


@jax.jit
def _all_finite(leaves: list[Any]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_finite(paths: list[str], leaves: list[Any], name: str) -> None:
    """Raises ValueError naming the first leaf of ``leaves`` holding NaN or inf.

    One small jitted reduction per device leaf runs on the arrays' devices (only booleans reach
    the host); NumPy leaves are checked on the host (nothing is transferred). Tracers (inside
    ``jax.jit``) and ``jax.ShapeDtypeStruct`` leaves (e.g. a streamed checkpoint's, checked when
    read) hold no values and are skipped.
    """
    idx = [i for i, x in enumerate(leaves)
           if not _is_tracer(x) and not isinstance(x, jax.ShapeDtypeStruct)
           and jnp.issubdtype(_dtype(x), jnp.inexact)]
    if not idx:
        return
    on_host = [i for i in idx if isinstance(leaves[i], np.ndarray)]
    on_device = [i for i in idx if not isinstance(leaves[i], np.ndarray)]
    flags = {}
    if on_device:
        flags.update(zip(on_device, jax.device_get(_all_finite([leaves[i] for i in on_device]))))
    flags.update((i, bool(np.isfinite(leaves[i]).all())) for i in on_host)
    for i, good in sorted(flags.items()):
        if not good:
            raise ValueError(f"Leaf '{paths[i]}' of {name} (shape {_shape(leaves[i])}, dtype "
                             f"{_dtype(leaves[i])}) contains NaN or inf.")


def check_expert_list(experts: Any) -> None:
    """Raises ValueError unless ``experts`` is a non-empty list or tuple."""
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence):
        raise ValueError(f"experts must be a list or tuple of trees, got {type(experts).__name__}.")
    if len(experts) == 0:
        raise ValueError("No experts to merge: experts is empty.")


def flatten_inputs(ref: Any, experts: Sequence[Any], *, filter: PathFilter = None,
                   validate: bool = True, ref_name: str = "base",
                   expert_offset: int = 0) -> FlatInputs:
    """Flattens ``ref`` and ``experts``, checks that they match and marks the merged leaves.

    Args:
      ref: the reference tree (``base``; the first expert for ``average``).
      experts: the expert trees, same structure, shapes and dtypes as ``ref``.
      filter: regex (``re.search`` on the leaf path), compiled pattern, predicate on the path,
        or None for all leaves. Only floating-point leaves are ever merged.
      validate: when False, skips the shape, dtype and NaN/inf checks (the structure is still
        needed to flatten and is always compared by path).
      ref_name: how error messages call the reference tree.
      expert_offset: index of ``experts[0]`` in the caller's list, for error messages.

    Returns:
      A :class:`FlatInputs`.

    Raises:
      ValueError: an expert lacks a leaf of ``ref`` or has an extra one (the first
        such path is named); a shape or dtype differs (path and both values named); a leaf
        holds NaN or inf (path named); the filter selects no floating-point leaf.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(ref)
    paths = [path_str(kp) for kp, _ in flat]
    ref_leaves = [x for _, x in flat]
    expert_leaves = []
    for t, e in enumerate(experts):
        name = f"experts[{t + expert_offset}]"
        pl = leaves_with_paths(e)
        _check_structure(paths, [p for p, _ in pl], ref_name, name)
        leaves = [x for _, x in pl]
        if validate:
            _check_leaves(paths, ref_leaves, leaves, ref_name, name)
        expert_leaves.append(leaves)
    if validate:
        check_finite(paths, ref_leaves, ref_name)
        for t, leaves in enumerate(expert_leaves):
            check_finite(paths, leaves, f"experts[{t + expert_offset}]")
    keep = compile_filter(filter)
    selected = [keep(p) and jnp.issubdtype(_dtype(x), jnp.inexact)
                for p, x in zip(paths, ref_leaves)]
    if not any(selected):
        if filter is None:
            raise ValueError(f"{ref_name} has no floating-point leaf to merge.")
        raise ValueError(f"filter {filter!r} selects no floating-point leaf of {ref_name} "
                         f"(its paths look like {paths[:3]}); nothing would be merged.")
    return FlatInputs(treedef, paths, ref_leaves, expert_leaves, selected)


def check_number(name: str, value: Any, *, low: float | None = None) -> None:
    """Raises ValueError unless ``value`` (a number or an array of numbers) is finite (and >= ``low``).

    Traced values (inside ``jax.jit``) cannot be inspected and are skipped.
    """
    if _is_tracer(value):
        return
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if low is not None and np.any(arr < low):
        raise ValueError(f"{name} must be >= {low}, got {value!r}.")


def compute_dtype(x: Any) -> np.dtype:
    """The dtype merge arithmetic runs in: at least float32 (bf16/fp16 leaves are upcast)."""
    return jnp.promote_types(_dtype(x), jnp.float32)

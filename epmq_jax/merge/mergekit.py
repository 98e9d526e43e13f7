"""mergekit recipes (YAML) run by the streaming merge: bring a mergekit ``config.yml`` as it is.

:func:`read_recipe` reads the subset of mergekit's recipe format that maps onto our methods and
refuses everything else in one line naming the key; :func:`merge_recipe` runs it tensor by tensor
(:mod:`epmq_jax.merge.streaming`) into a Hugging Face directory. The format (mergekit's README and
``examples/``)::

    models:
      - model: path/or/hub-id[@revision]
        parameters: {weight: 0.5, density: 0.5}
    base_model: path/or/hub-id
    merge_method: ties          # task_arithmetic | ties | dare_ties | dare_linear | linear
    parameters: {normalize: true, int8_mask: true, lambda: 1.0, rescale: false}
    dtype: bfloat16             # out_dtype too; tokenizer_source: base

Semantics, per tensor, as mergekit's ``GeneralizedTaskArithmeticMerge`` and ``LinearMerge``
compute them (with ``τ_t = θ_t − θ_base`` for each model other than ``base_model``; a model
equal to ``base_model`` in ``models`` is skipped, as mergekit does):

1. Sparsify each τ_t with its ``density`` d_t (default 1: kept whole): ``ties`` keeps the
   ``k = int(d_t · n)`` largest magnitudes of the tensor (per-tensor trim, exactly k entries;
   ties at the cut are kept in index order, where mergekit's ``argsort`` leaves the order
   unspecified); ``dare_*`` keep each entry with probability d_t. With ``rescale`` (default true
   for ``dare_*``, false otherwise) the kept entries are scaled so the tensor's L1 norm is
   unchanged (unless either norm is below 1e-7): current mergekit's rescaling, not DARE's
   ``1/d``.
2. Weight: ``w_t τ_t`` (``weight`` per model, required).
3. ``ties`` and ``dare_ties``: sign consensus: the majority sign is that of ``Σ_t w_t τ_t`` (+ for
   0); only entries ``w_t τ_t`` of that sign are summed, and the divisor is the sum of their
   ``w_t`` (1 where none). Otherwise all are summed and the divisor is ``Σ_t w_t`` (1 if below
   1e-8).
4. ``normalize`` (default true for ``ties``, false for ``task_arithmetic`` and ``dare_*``):
   divide by the divisor. Then multiply by ``lambda`` (default 1) and add to the base.

``linear``: ``Σ_t w_t θ_t`` over all ``models`` (``/ Σ_t w_t`` when ``normalize``, default true);
``base_model``, if given, must be one of them (it is the checkpoint whose ``config.json`` and
tokenizer are copied; else the first model's are).

So ``task_arithmetic`` is our Task Arithmetic with per-expert scaling ``λ w_t`` (``/ Σ w`` when
normalized), ``linear`` with equal weights is :func:`~epmq_jax.merge.average`; ``ties`` differs
from :func:`~epmq_jax.merge.ties_merging` (``trim="per_tensor"``) in keeping exactly k entries
(the TIES reference keeps k + 1), in per-model weights and in the + sign for a zero vote, and
``dare_*`` in the L1 rescaling; these follow mergekit. Differences from mergekit itself: the
arithmetic runs in float32 (or float64 for float64 tensors) and is cast once to the output
dtype, where mergekit computes in ``dtype``; DARE's random masks come from JAX: model t (in
recipe order, base excluded) keeps the entries where ``bernoulli(fold_in(k_name, t), d_t)``,
``k_name`` = :func:`~epmq_jax.merge.streaming.tensor_key` ``(seed, name)``, so they equal
mergekit's in distribution, not draw for draw. ``int8_mask`` only sets mergekit's mask dtype:
accepted, no effect. Shapes must match exactly (mergekit would cut embeddings of a larger
vocabulary to the base's). Output dtype: ``out_dtype``, else ``dtype``, else each tensor's own.

Refused (one line naming the key): ``slices``, ``modules``, ``tokenizer``, ``chat_template``,
a ``tokenizer_source`` other than ``base``, any other merge method, parameters other than those
above, gradients (lists of values over layers), per-tensor ``filter`` lists, LoRA (``+``)
model references.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from epmq_jax.merge._ties import _abs_bits, _kth_smallest_bits
from epmq_jax.merge._validate import compute_dtype
from epmq_jax.merge.streaming import (
    Inputs,
    MergeSummary,
    TensorMerge,
    stream_merge,
    tensor_key,
)
from epmq_jax.models.hf import resolve_checkpoint

#: merge_method -> (sparsification, sign consensus, default normalize, default rescale), as in
#: mergekit's ``merge_methods/registry.py``; ``linear`` is separate.
GTA_METHODS: dict[str, tuple[str | None, bool, bool, bool]] = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
}
SUPPORTED_METHODS = (*GTA_METHODS, "linear")
_TOP_KEYS = ("models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
             "tokenizer_source")
_REFUSED_KEYS = {"slices": "layer slices", "modules": "per-module definitions",
                 "tokenizer": "tokenizer merging", "chat_template": "chat templates"}
_DTYPES = ("float32", "float16", "bfloat16")
_BOOLS = ("normalize", "int8_mask", "rescale")


@dataclasses.dataclass(frozen=True)
class RecipeModel:
    """One input model of a recipe: where it is and its per-model parameters."""

    path: str
    revision: str | None
    weight: float
    density: float


@dataclasses.dataclass(frozen=True)
class MergekitRecipe:
    """A recipe as this module runs it (see the module doc for the semantics).

    Attributes:
      merge_method: one of :data:`SUPPORTED_METHODS`.
      base: ``(path, revision)`` of ``base_model``, or None.
      models: the merged inputs: for task-vector methods the models other than the base; for
        ``linear`` all models, the reference (``base_model``, else the first) first.
      normalize, rescale, lam: the global parameters, defaults filled in (``lam`` = ``lambda``).
      dtype: the output dtype name, or None for each tensor's own.
    """

    merge_method: str
    base: tuple[str, str | None] | None
    models: tuple[RecipeModel, ...]
    normalize: bool
    rescale: bool
    lam: float
    dtype: str | None


class RecipeError(ValueError):
    """A recipe this module does not run (one line naming the key)."""


def _load(recipe: str | os.PathLike | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(recipe, Mapping):
        return recipe, "recipe"
    path = Path(recipe)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: expected a mapping of recipe keys, got "
                          f"{type(data).__name__}")
    return data, str(path)


def _scalar(value: Any, key: str, where: str, kind: str) -> Any:
    if isinstance(value, list):
        what = ("per-tensor filter lists" if any(isinstance(v, Mapping) for v in value)
                else "gradients (lists of values over layers)")
        raise RecipeError(f"{where}: {key}: {what} are not supported; give one value")
    if isinstance(value, Mapping):
        raise RecipeError(f"{where}: {key}: per-tensor (filter) values are not supported; give "
                          "one value")
    if kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}: {key}: expected a finite number, got {value!r}")
    return float(value)


def _model_ref(value: Any, key: str, where: str) -> tuple[str, str | None]:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: {key}: expected a model path or hub id (a string), got "
                          f"{value!r}")
    if "+" in value:
        raise RecipeError(f"{where}: {key}: LoRA references (model+lora) are not supported")
    if value.count("@") > 1:
        raise RecipeError(f"{where}: {key}: more than one '@' in {value!r}")
    path, _, revision = value.partition("@")
    return path, revision or None


def _dtype(value: Any, key: str, where: str) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise RecipeError(f"{where}: {key}: {value!r} is not supported; expected one of {_DTYPES}")
    return name


def read_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> MergekitRecipe:
    """Reads a mergekit recipe (a YAML file or its parsed mapping) and checks it.

    Args:
      recipe: the path of a mergekit YAML recipe, or the mapping it holds.

    Returns:
      The :class:`MergekitRecipe`, defaults filled in as mergekit fills them.

    Raises:
      RecipeError (a ValueError): a key, method, parameter or value this module does not run, a
        missing ``weight``, a method without the ``base_model`` it needs; in one line naming it.
      OSError: the file cannot be read.
    """
    data, where = _load(recipe)
    for key in data:
        if key in _REFUSED_KEYS:
            raise RecipeError(f"{where}: unsupported key {key!r} ({_REFUSED_KEYS[key]}); "
                              f"supported keys: {', '.join(_TOP_KEYS)}")
        if key not in _TOP_KEYS:
            raise RecipeError(f"{where}: unknown key {key!r}; supported keys: "
                              f"{', '.join(_TOP_KEYS)}")
    method = data.get("merge_method")
    if method not in SUPPORTED_METHODS:
        raise RecipeError(f"{where}: merge_method {method!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_METHODS)}")
    gta = GTA_METHODS.get(method)
    per_model = ("weight", "density") if gta else ("weight",)
    global_keys = (*per_model, "normalize", "int8_mask", "rescale", "lambda") if gta else (
        *per_model, "normalize")
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        raise RecipeError(f"{where}: tokenizer_source {source!r} is not supported (only 'base': "
                          "the reference model's tokenizer files are copied)")

    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"{where}: parameters: expected a mapping, got {params!r}")
    glob: dict[str, Any] = {}
    for key, value in params.items():
        if key not in global_keys:
            raise RecipeError(f"{where}: parameters.{key} is not supported by merge_method "
                              f"{method}; supported: {', '.join(global_keys)}")
        glob[key] = _scalar(value, f"parameters.{key}", where,
                            "bool" if key in _BOOLS else "number")

    base = None
    if data.get("base_model") is not None:
        base = _model_ref(data["base_model"], "base_model", where)
    elif gta:
        raise RecipeError(f"{where}: base_model: merge_method {method} needs a base model")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{where}: models: expected a non-empty list of {{model: ..., "
                          "parameters: ...}} entries")
    entries, seen = [], set()
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise RecipeError(f"{where}: {key}: expected a mapping with a 'model' key")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise RecipeError(f"{where}: {key}.{extra[0]} is not supported (model entries take "
                              "model and parameters)")
        ref = _model_ref(entry["model"], f"{key}.model", where)
        if ref in seen:
            raise RecipeError(f"{where}: {key}.model: {entry['model']!r} is listed twice")
        seen.add(ref)
        mp = entry.get("parameters") or {}
        if not isinstance(mp, Mapping):
            raise RecipeError(f"{where}: {key}.parameters: expected a mapping, got {mp!r}")
        for pk in mp:
            if pk not in per_model:
                raise RecipeError(f"{where}: {key}.parameters.{pk} is not supported by "
                                  f"merge_method {method}; supported: {', '.join(per_model)}")
        if gta and ref == base:
            continue   # mergekit skips the base among the models of a task-vector method
        values = {pk: _scalar(mp[pk], f"{key}.parameters.{pk}", where, "number")
                  for pk in mp if mp[pk] is not None}
        weight = values.get("weight", glob.get("weight"))
        if weight is None:
            raise RecipeError(f"{where}: {key}.parameters.weight: missing (required for "
                              f"{entry['model']!r})")
        density = values.get("density", glob.get("density", 1.0))
        if not 0.0 < density <= 1.0:
            raise RecipeError(f"{where}: {key}.parameters.density: {density} is outside (0, 1]")
        entries.append(RecipeModel(ref[0], ref[1], weight, density))
    if not entries:
        raise RecipeError(f"{where}: models: no model besides base_model to merge")
    if not gta:
        refs = [(m.path, m.revision) for m in entries]
        if base is not None and base not in refs:
            raise RecipeError(f"{where}: base_model: merge_method linear averages the listed "
                              "models; base_model must be one of them")
        first = refs.index(base) if base is not None else 0
        entries.insert(0, entries.pop(first))
        if glob.get("normalize", True) and abs(sum(m.weight for m in entries)) == 0:
            raise RecipeError(f"{where}: models: the weights sum to 0, which normalize divides by")
    return MergekitRecipe(
        merge_method=method, base=base, models=tuple(entries),
        normalize=glob.get("normalize", gta[2] if gta else True),
        rescale=glob.get("rescale", gta[3] if gta else False),
        lam=glob.get("lambda", 1.0),
        dtype=_dtype(data.get("out_dtype"), "out_dtype", where) or _dtype(data.get("dtype"),
                                                                           "dtype", where))


# --- the per-tensor formulas -------------------------------------------------------------------


def _top_magnitudes(tv: jax.Array, k: int) -> jax.Array:
    """Mask of the k largest |tv| (ties at the cut in index order), by the exact k-th value."""
    bits = _abs_bits(tv.reshape(-1))
    kth = _kth_smallest_bits([bits[None]], [0], [bits.size - k + 1])[0, 0]   # k-th largest
    above, tie = bits > kth, bits == kth
    keep = above | (tie & (jnp.cumsum(tie) <= k - jnp.sum(above)))
    return keep.reshape(tv.shape)


def _masked(tv: jax.Array, keep: jax.Array, rescale: bool) -> jax.Array:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm."""
    masked = jnp.where(keep, tv, jnp.zeros_like(tv))
    if not rescale:
        return masked
    before, after = jnp.sum(jnp.abs(tv)), jnp.sum(jnp.abs(masked))
    return jnp.where((before < 1e-7) | (after < 1e-7), masked, masked * (before / after))


@functools.partial(jax.jit, static_argnames=("sparsify", "ks", "consensus", "normalize",
                                             "rescale"))
def _gta_tensor(base, experts, weights, densities, key, lam, *, sparsify, ks, consensus,
                normalize, rescale):
    """One tensor of a task-vector recipe; ``ks[t]``: entries kept (None: density >= 1)."""
    ct = compute_dtype(base)
    b = jnp.asarray(base, ct)
    deltas = []
    for t, e in enumerate(experts):
        tv = jnp.asarray(e, ct) - b
        if sparsify == "magnitude" and ks[t] is not None:
            tv = _masked(tv, _top_magnitudes(tv, ks[t]), rescale)
        elif sparsify == "random" and ks[t] is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, t), densities[t], tv.shape)
            tv = _masked(tv, keep, rescale)
        deltas.append(tv)
    d = jnp.stack(deltas)
    w = weights.astype(ct).reshape((-1,) + (1,) * (d.ndim - 1))
    wd = d * w
    if consensus:
        majority = jnp.where(jnp.sum(wd, axis=0) >= 0, 1, -1).astype(ct)
        agree = jnp.sign(wd) == majority
        mixed = jnp.sum(jnp.where(agree, wd, 0), axis=0)
        divisor = jnp.sum(jnp.where(agree, w, 0), axis=0)
        divisor = jnp.where(divisor == 0, 1, divisor)
    else:
        mixed = jnp.sum(wd, axis=0)
        divisor = jnp.sum(weights.astype(ct))
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    return b + mixed * lam


@functools.partial(jax.jit, static_argnames=("normalize",))
def _linear_tensor(tensors, weights, *, normalize):
    ct = compute_dtype(tensors[0])
    x = jnp.stack([jnp.asarray(t, ct) for t in tensors])
    w = weights.astype(ct)
    out = jnp.sum(w.reshape((-1,) + (1,) * (x.ndim - 1)) * x, axis=0)
    return out / jnp.sum(w) if normalize else out


class _RecipeMerge(TensorMerge):
    def __init__(self, recipe: MergekitRecipe, seed: int):
        self.r, self.seed = recipe, seed
        self.weights = jnp.asarray([m.weight for m in recipe.models], jnp.float32)
        self.densities = jnp.asarray([m.density for m in recipe.models], jnp.float32)

    def _ks(self, n: int) -> tuple[int | None, ...]:
        return tuple(None if m.density >= 1 else int(m.density * n) for m in self.r.models)

    def check(self, inputs: Inputs) -> None:
        if self.r.merge_method != "ties":
            return
        for name in inputs.merged:
            n = math.prod(inputs.specs[name][0])
            for m, k in zip(self.r.models, self._ks(n)):
                if k == 0:
                    raise RecipeError(f"density {m.density} of {m.path} keeps no entry of tensor "
                                      f"{name!r} ({n} entries); raise it")

    def merge_tensor(self, name, base, experts):
        if self.r.merge_method == "linear":
            return _linear_tensor((base, *experts), self.weights, normalize=self.r.normalize)
        sparsify, consensus, _, _ = GTA_METHODS[self.r.merge_method]
        return _gta_tensor(base, tuple(experts), self.weights, self.densities,
                           tensor_key(self.seed, name), self.r.lam, sparsify=sparsify,
                           ks=self._ks(base.size), consensus=consensus,
                           normalize=self.r.normalize, rescale=self.r.rescale)


def merge_recipe(recipe: str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike, *,
                 max_shard_size: int | str = "5GB", overwrite: bool = False,
                 progress: bool = False, seed: int = 0) -> MergeSummary:
    """Runs a mergekit recipe tensor by tensor and writes the merged Hugging Face directory.

    Args:
      recipe: a mergekit YAML file (or its mapping); see the module doc for what is supported.
        Model references are local directories (relative ones to the working directory, as
        mergekit reads them) or hub ids, optionally ``@revision``.
      out_dir: the directory to write (see :func:`~epmq_jax.merge.merge_checkpoints`).
      max_shard_size, overwrite, progress: as :func:`~epmq_jax.merge.merge_checkpoints`.
      seed: seeds the masks of ``dare_*`` (see the module doc); a rerun draws the same.

    Returns:
      The :class:`~epmq_jax.merge.streaming.MergeSummary` (one pass over the inputs).

    Raises:
      RecipeError: an unsupported recipe (before any checkpoint is opened).
      ValueError, FileNotFoundError: as :func:`~epmq_jax.merge.merge_checkpoints`.
    """
    r = read_recipe(recipe)
    tm = _RecipeMerge(r, seed)
    dirs = [resolve_checkpoint(m.path, revision=m.revision) for m in r.models]
    roles = [f"model {m.path}" for m in r.models]
    if r.merge_method == "linear":
        ref, rest, ref_role, roles = dirs[0], dirs[1:], roles[0], roles[1:]
    else:
        ref, rest, ref_role = resolve_checkpoint(r.base[0], revision=r.base[1]), dirs, \
            f"base_model {r.base[0]}"
    return stream_merge(ref, rest, out_dir, tm, dtype=r.dtype, max_shard_size=max_shard_size,
                        overwrite=overwrite, progress=progress, ref_role=ref_role,
                        expert_roles=roles)

"""Hugging Face model directories with GPTQ-packed linears, for serving stacks; ``epmq export``.

:func:`save_pretrained` writes what transformers' ``save_pretrained`` writes for a GPTQ model,
so that transformers (optimum / GPTQModel), AutoGPTQ, GPTQModel and vLLM can load it, and
:func:`epmq_jax.models.from_pretrained` reads it back::

    out_dir/config.json              the model's transformers config (regenerated from the Flax
                                     config, or a given config.json dict kept), "torch_dtype",
                                     and "quantization_config" when any kernel is quantized:
                                     {"quant_method": "gptq", "bits", "group_size", "desc_act",
                                      "sym", "checkpoint_format" (and "format", its transformers 5
                                      name), "lm_head", "meta", [block_name_to_quantize,
                                      modules_in_block_to_quantize, true_sequential,
                                      damp_percent, ...]}
    out_dir/quantize_config.json     the same dict for AutoGPTQ (+ "model_file_base_name")
    out_dir/model.safetensors        or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    out_dir/<tokenizer files>        copied from tokenizer_dir

Tensor names and layouts are transformers': each family's ``to_hf`` (the inverse of its
``from_hf`` renaming) gives the name; Flax ``kernel (in, out)`` -> ``weight (out, in)``, conv
HWIO -> OIHW, ``scale`` / ``embedding`` -> ``weight``. A ``QuantizedWeight`` kernel becomes the
GPTQ tensors of :mod:`epmq_jax.models.gptq_format` (``qweight``, ``qzeros``, ``scales``,
``g_idx``) beside the layer's float ``bias``. Every array is written C-contiguous.

One ``quantization_config`` covers the model, so all quantized kernels must share bits, group
size and symmetry; ``desc_act`` is true when some ``g_idx`` is not ``i // group_size``
(act-order). Quantized linears must sit in the model's blocks (transformers' module lists, e.g.
``model.layers``) or be ``lm_head`` (``"lm_head": true``), which is where GPTQ loaders look.
Everything is checked before anything is written; the directory is written under a temporary
name beside ``out_dir`` and renamed into place.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from epmq_jax._tree import leaves_with_paths
from epmq_jax.models import gptq_format
from epmq_jax.quant import QuantizedWeight, is_quantized

#: Files copied from ``tokenizer_dir`` (tokenizers, sentencepiece models, chat templates,
#: CLIP's image processor).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
                   "chat_template.json", "preprocessor_config.json", "processor_config.json")
_DTYPES = ("float16", "bfloat16", "float32")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# quantization_config keys derived from the weights; a given quantization_config may not contradict them.
_DERIVED = ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "format",
            "lm_head")


def _family_modules() -> dict[type, Any]:
    from epmq_jax.models import bert, clip, llama, t5

    return {llama.LlamaConfig: llama, clip.CLIPVisionConfig: clip, clip.CLIPConfig: clip,
            t5.T5Config: t5, bert.BertConfig: bert}


def _resolve_model(model_or_config: Any, params: Any) -> tuple[dict[str, Any], Any, Any]:
    """``(config.json dict, family module, params)`` of ``save_pretrained``'s first two arguments."""
    from flax import nnx

    from epmq_jax.models import hf

    config = getattr(model_or_config, "config", None) if isinstance(model_or_config, nnx.Module) \
        else model_or_config
    if isinstance(model_or_config, nnx.Module) and params is None:
        params = nnx.to_pure_dict(nnx.state(model_or_config, nnx.Param))
    if params is None:
        raise ValueError("params: None; pass the param tree (None only with a model, whose own "
                         "params are written)")
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    families = _family_modules()
    if type(config) in families:
        family = families[type(config)]
        return family.hf_config(config), family, params
    if isinstance(config, Mapping) and config.get("model_type") in hf.FAMILIES:
        return dict(config), importlib.import_module(hf.FAMILIES[config["model_type"]]), params
    raise ValueError(f"model_or_config: {type(model_or_config).__name__}; expected a model of "
                     f"epmq_jax.models, its config ({', '.join(c.__name__ for c in families)}) "
                     f"or a config.json dict with a model_type in {sorted(hf.FAMILIES)}")


def parse_size(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or ``"5GB"``, ``"500MB"``, ``"2GiB"`` (transformers' units)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size={size!r}: expected a positive number of bytes or a size "
                         "like '5GB', '500MB', '2GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor to write: its name, shape, dtype and how to compute it (read when writing)."""

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    value: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _hf_name(path: str, family: Any, model_type: str) -> str:
    """Flax leaf path ``a/b/kernel`` -> checkpoint name (``a.b.weight``, renamed by the family)."""
    *mods, leaf = path.split("/")
    leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    return family.to_hf(".".join([*mods, leaf]), model_type)


def _torch_axes(leaf: str, ndim: int) -> tuple[int, ...]:
    """The axes that take a Flax leaf to torch layout (the inverse of ``hf.load_into``'s
    conversion): a 2-D kernel ``(in, out)`` -> ``(out, in)``, a conv kernel HWIO -> OIHW."""
    if leaf == "kernel" and ndim == 2:
        return (1, 0)
    if leaf == "kernel" and ndim == 4:
        return (3, 2, 0, 1)
    return tuple(range(ndim))


def _float_tensor(path: str, name: str, x: Any, dtype: np.dtype) -> _Tensor:
    """A float (or integer) leaf, checked to fit ``dtype``."""
    leaf = path.rsplit("/", 1)[-1]
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"params: leaf {path!r} is a {type(x).__name__}, not an array")
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    out = dtype if floating else np.dtype(x.dtype)
    if floating and np.dtype(out) != np.float32:
        big = float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)))) if x.size else 0.0
        if not np.isfinite(big) or big > float(jnp.finfo(out).max):
            raise ValueError(f"params: leaf {path!r} holds values up to {big:.4g}, beyond "
                             f"{np.dtype(out).name}'s range; export with dtype='float32'")
    axes = _torch_axes(leaf, len(x.shape))
    return _Tensor(name, path, tuple(x.shape[a] for a in axes), np.dtype(out),
                   lambda: np.asarray(x).transpose(axes).astype(out, order="C"))


def _gptq_tensors(path: str, name: str, qw: QuantizedWeight, fmt: str) -> list[_Tensor]:
    if path.rsplit("/", 1)[-1] != "kernel" or len(qw.shape) != 2:
        raise ValueError(f"params: {path!r} is quantized but is not a linear kernel; GPTQ "
                         "checkpoints quantize linear layers only")
    if not name.endswith(".weight"):
        raise ValueError(f"params: {path!r} maps to checkpoint name {name!r}, not a '<layer>.weight'")
    gptq_format.check_exportable(path, qw, fmt)
    base, (d_in, d_out), b = name.removesuffix(".weight"), qw.shape, qw.bits
    groups = qw.scales.shape[0]
    shapes = {"qweight": ((d_in * b // 32, d_out), np.int32), "qzeros": ((groups, d_out * b // 32), np.int32),
              "scales": ((groups, d_out), np.float16), "g_idx": ((d_in,), np.int32)}
    cache: dict[str, np.ndarray] = {}

    def part(suffix: str) -> Callable[[], np.ndarray]:
        def value() -> np.ndarray:
            if not cache:
                cache.update(gptq_format.to_gptq(qw, fmt))
            return cache.pop(suffix)
        return value

    return [_Tensor(f"{base}.{s}", path, shape, np.dtype(dt), part(s))
            for s, (shape, dt) in shapes.items()]


def _block_of(name: str) -> tuple[str, str] | None:
    """``"model.layers.3.mlp.up_proj"`` -> ``("model.layers", "mlp.up_proj")``: the module list a
    layer sits in and its name inside one block; None outside any list."""
    m = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
    return (m.group(1), m.group(3)) if m else None


def _quantization_config(quantized: dict[str, QuantizedWeight], linears: list[str], fmt: str,
                         extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``quantization_config`` of the quantized layers ``{checkpoint base name: kernel}``.

    ``linears``: the base names of every 2-D kernel (quantized or not), to tell whether the
    blocks hold float linears too.
    """
    from epmq_jax import __version__

    specs = {(q.bits, q.group_size, q.symmetric) for q in quantized.values()}
    if len(specs) > 1:
        raise ValueError(f"params: quantized kernels of several grids (bits, group_size, symmetric) "
                         f"{sorted(specs)}; a GPTQ checkpoint's quantization_config holds one")
    (bits, group_size, sym), = specs
    outside = [n for n in quantized if n != "lm_head" and _block_of(n) is None]
    if outside:
        raise ValueError(f"params: quantized layer {outside[0]!r} is outside the model's blocks; "
                         "GPTQ loaders look for quantized linears in the blocks (and lm_head) only")
    lists = sorted({_block_of(n)[0] for n in quantized if n != "lm_head"})
    names = sorted({_block_of(n)[1] for n in quantized if n != "lm_head"})
    left = [n for n in linears if n not in quantized and (_block_of(n) or ("", ""))[0] in lists]
    clash = [n for n in left if _block_of(n)[1] in names]
    if clash:
        raise ValueError(f"params: {clash[0]!r} is a float linear where the other blocks quantize "
                         f"'{_block_of(clash[0])[1]}'; a GPTQ checkpoint quantizes the same layers "
                         "in every block")

    def trivial(q: QuantizedWeight) -> bool:
        g = q.shape[0] // q.scales.shape[0]
        return bool(np.array_equal(np.asarray(q.g_idx), np.arange(q.shape[0]) // g))

    qc: dict[str, Any] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
        "desc_act": not all(trivial(q) for q in quantized.values()),
        "checkpoint_format": fmt, "format": fmt, "lm_head": "lm_head" in quantized,
        "meta": {"quantizer": [f"epmq-jax:{__version__}"]}}
    if len(lists) == 1:
        qc["block_name_to_quantize"] = lists[0]
    if left:
        qc["modules_in_block_to_quantize"] = [names]
    for key, value in (extra or {}).items():
        if key in _DERIVED and qc[key] != value:
            raise ValueError(f"quantization_config: {key}={value!r}, but the quantized weights "
                             f"say {qc[key]!r}")
        qc[key] = {**qc["meta"], **value} if key == "meta" and isinstance(value, Mapping) else value
    return qc


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses an ``out_dir`` that cannot be (re)written, before anything is written (also
    called by ``epmq export`` before it loads the checkpoint)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"out_dir: {out_dir} is a file; expected a directory to write")
        if not overwrite:
            raise ValueError(f"out_dir: {out_dir} exists; pass overwrite=True (--overwrite) to "
                             "replace it")
        if any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
            raise ValueError(f"out_dir: {out_dir} is not empty and holds no config.json; "
                             "overwrite replaces only a model directory")
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"out_dir: {ancestor} (a parent of {out_dir}) is a file")


def _tokenizer_files(tokenizer_dir: str | os.PathLike | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise ValueError(f"tokenizer_dir: {d} is not a directory")
    files = [d / f for f in TOKENIZER_FILES if (d / f).is_file()]
    if not files:
        raise ValueError(f"tokenizer_dir: {d} holds none of the tokenizer files {TOKENIZER_FILES}")
    return files


def _shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    """Consecutive tensors in files of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write(tmp: Path, config: dict[str, Any], qc: dict[str, Any] | None, shards: list[list[_Tensor]],
           tokenizer: list[Path]) -> None:
    from safetensors.numpy import save_file

    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if qc is not None:
        (tmp / "quantize_config.json").write_text(
            json.dumps({**qc, "model_file_base_name": "model"}, indent=2, sort_keys=True) + "\n")
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                  for i in range(n)]
    for file, shard in zip(files, shards):
        arrays = {}
        for t in shard:
            a = np.asarray(t.value(), order="C")    # safetensors writes memory as it lies
            if a.shape != t.shape or a.dtype != t.dtype:   # a bug here would be silent on load
                raise AssertionError(f"{t.name}: planned {t.shape} {t.dtype}, got {a.shape} {a.dtype}")
            arrays[t.name] = a
        save_file(arrays, str(tmp / file), metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
                 "weight_map": {t.name: f for f, s in zip(files, shards) for t in s}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for f in tokenizer:
        shutil.copy2(f, tmp / f.name)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Moves the finished ``tmp`` to ``out_dir``, replacing an existing one."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model_or_config: Any, params: Any, out_dir: str | os.PathLike, *,
                    tokenizer_dir: str | os.PathLike | None = None,
                    checkpoint_format: str = "gptq", max_shard_size: int | str = "5GB",
                    dtype: str = "float16", quantization_config: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Writes a Hugging Face model directory; ``QuantizedWeight`` kernels as GPTQ tensors.

    Args:
      model_or_config: a model of :mod:`epmq_jax.models` (Llama family, CLIP vision tower or
        two-tower CLIP, T5, BERT), its config (``config.json`` is regenerated from it), or a
        ``config.json`` dict (kept as it is, e.g. ``hf.load_config(base_dir)``).
      params: the model's param tree (nested dicts or ``nnx.State``, leaves at the model's
        paths, kernels ``(d_in, d_out)`` float or ``QuantizedWeight``); None with a model
        writes the model's own params.
      out_dir: the directory to write (parents are created).
      tokenizer_dir: a directory whose tokenizer / processor files (:data:`TOKENIZER_FILES`)
        are copied.
      checkpoint_format: ``"gptq"`` (v1: zero points stored minus one; read by AutoGPTQ,
        transformers and vLLM) or ``"gptq_v2"`` (GPTQModel; zero points as they are).
      max_shard_size: largest weights file (bytes or ``"5GB"``); above it the weights are
        sharded with a ``model.safetensors.index.json``.
      dtype: storage dtype of the float tensors and ``torch_dtype`` of the config:
        ``"float16"`` (what GPTQ kernels compute in), ``"bfloat16"`` or ``"float32"``. GPTQ
        scales are float16 whatever it is.
      quantization_config: more ``quantization_config`` entries the weights do not tell, e.g.
        ``{"damp_percent": 0.01, "true_sequential": True, "static_groups": False}``; entries
        the weights determine (bits, group_size, sym, desc_act, checkpoint_format, lm_head)
        must agree with them.
      overwrite: replace an existing ``out_dir`` (an empty directory or a model directory,
        i.e. one holding ``config.json``).

    Returns:
      ``out_dir``.

    Raises:
      ValueError: before anything is written: an unknown model/config, a ``checkpoint_format``
        or ``dtype`` outside the choices, quantization the GPTQ format cannot hold (bits not in
        2/3/4/8, AWQ ``input_scale``, dimensions not multiples of 32, several grids, a quantized
        layer that is not a linear in the blocks or ``lm_head``, zero points of 0 in v1, scales
        or floats beyond the dtype's range), two leaves with one checkpoint name, an existing
        ``out_dir`` without ``overwrite``, a ``tokenizer_dir`` without tokenizer files.
    """
    if checkpoint_format not in gptq_format.CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; expected one of "
                         f"{gptq_format.CHECKPOINT_FORMATS}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {_DTYPES}")
    max_bytes = parse_size(max_shard_size)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    tokenizer = _tokenizer_files(tokenizer_dir)
    config, family, params = _resolve_model(model_or_config, params)
    model_type = config["model_type"]
    store = np.dtype(jnp.dtype(dtype))

    tensors: list[_Tensor] = []
    quantized: dict[str, QuantizedWeight] = {}
    linears: list[str] = []
    for path, leaf in leaves_with_paths(params, is_leaf=is_quantized):
        name = _hf_name(path, family, model_type)
        if path.rsplit("/", 1)[-1] == "kernel" and len(leaf.shape) == 2:
            linears.append(name.removesuffix(".weight"))
        if is_quantized(leaf):
            tensors += _gptq_tensors(path, name, leaf, checkpoint_format)
            quantized[name.removesuffix(".weight")] = leaf
        else:
            tensors.append(_float_tensor(path, name, leaf, store))
    seen: dict[str, str] = {}
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"params: leaves {seen[t.name]!r} and {t.path!r} both give the "
                             f"checkpoint tensor {t.name!r}")
        seen[t.name] = t.path
    qc = (_quantization_config(quantized, linears, checkpoint_format, quantization_config)
          if quantized else None)
    if quantization_config and not quantized:
        raise ValueError("quantization_config: given, but no kernel of params is quantized")
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    config.update({"torch_dtype": dtype, "dtype": dtype}, **({"quantization_config": qc} if qc else {}))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        _write(tmp, config, qc, _shards(tensors, max_bytes), tokenizer)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

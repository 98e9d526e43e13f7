"""The GPTQ tensor format of Hugging Face checkpoints: ``QuantizedWeight`` <-> GPTQ tensors, and back.

This is the layout AutoGPTQ defined and transformers (through optimum / GPTQModel), GPTQModel
and vLLM load. A quantized ``torch.nn.Linear`` ``<name>`` (``weight (out_features,
in_features)``, the transpose of the Flax kernel ``(d_in, d_out)``) with ``b`` bits and ``G``
groups is stored as:

- ``<name>.qweight``: int32 ``(in_features * b / 32, out_features)``: the codes of each output
  column packed along the input dimension, 32 codes in ``b`` words, as a little-endian bitstream
  (code ``i`` at stream bits ``[i*b, (i+1)*b)``; word ``k`` holds stream bits ``[32k, 32k+32)``).
  For 2, 4 and 8 bits that is ``32 / b`` whole codes per word, row ``i`` in bits
  ``b * (i % (32/b))`` of word ``i // (32/b)``; for 3 bits codes 10 and 21 of every 32 straddle
  two words, as AutoGPTQ's packer writes them.
- ``<name>.qzeros``: int32 ``(G, out_features * b / 32)``: the zero points packed the same way
  along the output dimension. ``checkpoint_format="gptq"`` (v1: AutoGPTQ, transformers, vLLM)
  stores ``zero - 1``; ``"gptq_v2"`` (GPTQModel) stores ``zero``.
- ``<name>.scales``: float16 ``(G, out_features)``.
- ``<name>.g_idx``: int32 ``(in_features,)``, the group of each input row (``i // group_size``
  unless GPTQ ran with act-order, ``desc_act``).
- ``<name>.bias`` unchanged, if any.

The weight is ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])``.

What the format cannot hold (:func:`check_exportable` refuses it): bits other than 2, 3, 4, 8;
AWQ's per-input-channel ``input_scale``; dimensions that are not multiples of 32 (the tensor
shapes above are ``in_features // 32 * b`` rows and ``out_features // 32 * b`` columns); groups
of unequal size (act-order permutes which rows form a group, every group still has
``group_size`` rows); scales outside float16's range; and, in v1, a zero point of 0 (stored as
-1, it wraps to ``2**b - 1`` and the readers' ``+ 1`` overflows into the next code).

Reading (:class:`GPTQTensors`) turns the four tensors of each quantized linear into one
``<name>.weight`` entry holding a packed :class:`~epmq_jax.quant.QuantizedWeight` (Flax layout),
which :func:`epmq_jax.models.hf.load_into` places on the model's kernel;
:func:`finish_model` then dequantizes those kernels or swaps their linears for
:class:`~epmq_jax.nn.QuantLinear`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epmq_jax.quant import QuantizedWeight, is_quantized, pack_codes, unpack_codes

#: Code widths the format holds.
BITS = (2, 3, 4, 8)
#: ``checkpoint_format`` values: v1 (zero points stored minus one) and GPTQModel's v2.
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
#: The tensors of one quantized linear, ``<name>.<suffix>``.
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQSettings:
    """What a checkpoint's ``quantization_config`` says about its GPTQ tensors."""

    bits: int
    group_size: int
    sym: bool
    checkpoint_format: str


def _words(b: np.ndarray) -> np.ndarray:
    """uint8 bitstream bytes ``(4m, k)`` along axis 0 -> int32 little-endian words ``(m, k)``."""
    u = b.astype(np.uint32).reshape(-1, 4, b.shape[1])
    w = u[:, 0] | (u[:, 1] << 8) | (u[:, 2] << 16) | (u[:, 3] << 24)
    return w.view(np.int32)


def _bytes(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_words`: int32 ``(m, k)`` -> uint8 ``(4m, k)``."""
    u = np.asarray(w).astype(np.int32).view(np.uint32)
    parts = [((u >> (8 * j)) & 0xFF).astype(np.uint8) for j in range(4)]
    return np.stack(parts, axis=1).reshape(-1, u.shape[1])


def check_exportable(path: str, qw: QuantizedWeight, checkpoint_format: str) -> None:
    """Raises ValueError (naming ``path``) if the GPTQ format cannot hold ``qw`` exactly.

    Args:
      path: the leaf path, for messages.
      qw: a kernel ``(d_in, d_out)``.
      checkpoint_format: ``"gptq"`` or ``"gptq_v2"``.
    """
    d_in, d_out = qw.shape
    if qw.input_scale is not None:
        raise ValueError(f"{path}: carries AWQ's per-input-channel input_scale, which the GPTQ "
                         "format has no tensor for; export a GPTQ/E-PMQ/RTN quantization instead")
    if qw.bits not in BITS:
        raise ValueError(f"{path}: {qw.bits}-bit codes; the GPTQ format holds {BITS} bits")
    if d_in % 32 or d_out % 32:
        raise ValueError(f"{path}: kernel shape {qw.shape}; the GPTQ format packs 32 codes per "
                         f"{qw.bits} int32 words along both dimensions, so d_in and d_out must "
                         "be multiples of 32")
    scales = np.asarray(qw.scales, np.float32)
    zeros = np.asarray(qw.zeros, np.float32)
    g_idx = np.asarray(qw.g_idx)
    n_groups = scales.shape[0]
    if n_groups != qw.spec.n_groups(d_in, path=path):
        raise ValueError(f"{path}: {n_groups} groups of scales for d_in={d_in} and group_size="
                         f"{qw.group_size}")
    counts = np.bincount(g_idx.clip(0, n_groups), minlength=n_groups + 1)
    if g_idx.min() < 0 or g_idx.max() >= n_groups or np.any(counts[:n_groups] != d_in // n_groups):
        raise ValueError(f"{path}: g_idx does not put {d_in // n_groups} input rows in each of the "
                         f"{n_groups} groups; the GPTQ format (act-order or not) has groups of "
                         "group_size rows")
    maxq = (1 << qw.bits) - 1
    if not np.all((zeros == np.round(zeros)) & (zeros >= 0) & (zeros <= maxq)):
        raise ValueError(f"{path}: zero points outside the integers 0..{maxq}")
    if qw.symmetric and not np.all(zeros == 1 << (qw.bits - 1)):
        raise ValueError(f"{path}: symmetric, but its zero points are not all {1 << (qw.bits - 1)}")
    if checkpoint_format == "gptq" and np.any(zeros == 0):
        raise ValueError(f"{path}: {int(np.sum(zeros == 0))} zero points are 0, which "
                         "checkpoint_format='gptq' (v1, stored as zero - 1) cannot hold; use "
                         "checkpoint_format='gptq_v2' or a symmetric grid")
    half = scales.astype(np.float16)
    if not np.all(np.isfinite(scales)) or np.any(np.abs(scales) > _FP16_MAX) or np.any(
            (half == 0) & (scales != 0)):
        raise ValueError(f"{path}: scales outside float16's range (the GPTQ format stores "
                         f"float16 scales; |scale| in [{np.abs(scales).min():.3g}, "
                         f"{np.abs(scales).max():.3g}])")


def to_gptq(qw: QuantizedWeight, checkpoint_format: str) -> dict[str, np.ndarray]:
    """The GPTQ tensors of one quantized kernel (check it with :func:`check_exportable` first).

    Args:
      qw: a kernel ``(d_in, d_out)``, ``d_in`` and ``d_out`` multiples of 32.
      checkpoint_format: ``"gptq"`` (zero points stored minus one) or ``"gptq_v2"``.

    Returns:
      ``{"qweight": int32 (d_in*b/32, d_out), "qzeros": int32 (G, d_out*b/32),
      "scales": float16 (G, d_out), "g_idx": int32 (d_in,)}``, C-contiguous.
    """
    zeros = np.asarray(qw.zeros).astype(np.int64) - (1 if checkpoint_format == "gptq" else 0)
    packed_zeros = np.asarray(pack_codes(zeros.T.astype(np.uint8), qw.bits))     # (d_out*b/8, G)
    return {"qweight": np.ascontiguousarray(_words(np.asarray(qw.packed))),
            "qzeros": np.ascontiguousarray(_words(packed_zeros).T),
            "scales": np.ascontiguousarray(np.asarray(qw.scales).astype(np.float16)),
            "g_idx": np.ascontiguousarray(np.asarray(qw.g_idx, np.int32))}


def from_gptq(tensors: Mapping[str, np.ndarray], settings: GPTQSettings, *,
              dtype: str = "float32", name: str = "") -> QuantizedWeight:
    """One quantized linear's GPTQ tensors -> a packed ``QuantizedWeight`` (Flax layout).

    Args:
      tensors: ``{"qweight", "qzeros", "scales"[, "g_idx"]}`` as stored (a missing ``g_idx``
        means ``i // group_size``).
      settings: the checkpoint's bits, group size, symmetry and ``checkpoint_format``.
      dtype: what the weight dequantizes to.
      name: the linear's checkpoint name, for messages.

    Returns:
      The kernel ``(in_features, out_features)``; v1 zero points are read back plus one.

    Raises:
      ValueError: shapes that do not fit together or the settings.
    """
    b = settings.bits
    qweight, qzeros = np.asarray(tensors["qweight"]), np.asarray(tensors["qzeros"])
    scales = np.asarray(tensors["scales"], np.float32)
    if qweight.ndim != 2 or qzeros.ndim != 2 or scales.ndim != 2 or (qweight.shape[0] * 32) % b \
            or (qzeros.shape[1] * 32) % b or (qweight.shape[0] * 32 // b) % 8:
        raise ValueError(f"{name}: GPTQ tensors qweight {qweight.shape}, qzeros {qzeros.shape}, "
                         f"scales {scales.shape} do not fit {b}-bit packing")
    d_in, d_out = qweight.shape[0] * 32 // b, qweight.shape[1]
    n_groups = 1 if settings.group_size == -1 else d_in // settings.group_size
    if settings.group_size != -1 and d_in % settings.group_size:
        raise ValueError(f"{name}: in_features={d_in} is not a multiple of group_size="
                         f"{settings.group_size}")
    if scales.shape != (n_groups, d_out) or qzeros.shape != (n_groups, d_out * b // 32):
        raise ValueError(f"{name}: scales {scales.shape} and qzeros {qzeros.shape}; expected "
                         f"({n_groups}, {d_out}) and ({n_groups}, {d_out * b // 32}) for a "
                         f"({d_out}, {d_in}) weight with group_size={settings.group_size}")
    g_idx = tensors.get("g_idx")
    g_idx = (np.arange(d_in) // (d_in // n_groups) if g_idx is None
             else np.asarray(g_idx).astype(np.int32))
    if g_idx.shape != (d_in,) or g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise ValueError(f"{name}: g_idx of shape {g_idx.shape} with values outside 0..{n_groups - 1}")
    zeros = np.asarray(unpack_codes(_bytes(qzeros.T), b, d_out)).T.astype(np.float32)
    if settings.checkpoint_format == "gptq":
        zeros = zeros + 1
    return QuantizedWeight(packed=jnp.asarray(_bytes(qweight)), scales=jnp.asarray(scales),
                           zeros=jnp.asarray(zeros), g_idx=jnp.asarray(g_idx, jnp.int32),
                           bits=b, group_size=settings.group_size, symmetric=settings.sym,
                           shape=(d_in, d_out), dtype=dtype)


def read_settings(config: Mapping[str, Any], directory: str | Path) -> GPTQSettings | None:
    """The GPTQ settings of a checkpoint directory, or None when it is not quantized.

    Read from ``config.json``'s ``quantization_config``, else from AutoGPTQ's
    ``quantize_config.json`` beside it. ``checkpoint_format`` (or transformers 5's ``format``)
    defaults to ``"gptq"``, ``sym`` to True (AutoGPTQ's defaults).

    Raises:
      ValueError: another ``quant_method``, or bits / group size / format the format lacks.
    """
    qc = config.get("quantization_config")
    where = f"{directory}/config.json quantization_config"
    if qc is None and (Path(directory) / "quantize_config.json").is_file():
        where = f"{directory}/quantize_config.json"
        try:
            qc = json.loads((Path(directory) / "quantize_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
    if qc is None:
        return None
    method = str(qc.get("quant_method", "gptq")).lower() if isinstance(qc, Mapping) else None
    if method != "gptq":
        raise ValueError(f"{where}: quant_method {method!r} is not supported; epmq_jax reads "
                         "'gptq' checkpoints")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in BITS or fmt not in CHECKPOINT_FORMATS or not isinstance(group_size, int) or not (
            group_size == -1 or group_size > 0):
        raise ValueError(f"{where}: bits={bits!r}, group_size={group_size!r}, checkpoint_format="
                         f"{fmt!r}; expected bits in {BITS}, group_size -1 or > 0, a format in "
                         f"{CHECKPOINT_FORMATS}")
    return GPTQSettings(bits=bits, group_size=group_size, sym=bool(qc.get("sym", True)),
                        checkpoint_format=fmt)


class GPTQTensors(Mapping):
    """A checkpoint's tensors with each GPTQ linear's tensors read as one packed ``<name>.weight``.

    ``<name>.qweight``, ``.qzeros``, ``.scales`` and ``.g_idx`` are hidden; ``<name>.weight``
    is a :class:`~epmq_jax.quant.QuantizedWeight` in Flax layout ``(in, out)``, read when looked
    up. Every other tensor passes through unchanged.

    Attributes:
      quantized: the checkpoint names ``<name>.weight`` of the quantized linears.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], settings: GPTQSettings, *,
                 dtype: str = "float32"):
        self._tensors, self.settings, self.dtype = tensors, settings, dtype
        bases = [n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")]
        for base in bases:
            lacking = [s for s in ("qzeros", "scales") if f"{base}.{s}" not in tensors]
            if lacking or f"{base}.weight" in tensors:
                what = (f"lacks {', '.join(f'{base}.{s}' for s in lacking)}" if lacking
                        else f"also holds a float {base}.weight")
                raise ValueError(f"GPTQ checkpoint: {base}.qweight is there but the checkpoint {what}")
        self.quantized = {f"{b}.weight": b for b in bases}
        hidden = {f"{b}.{s}" for b in bases for s in SUFFIXES}
        self._names = [f"{n.removesuffix('.qweight')}.weight" if n.endswith(".qweight") else n
                       for n in tensors if n not in hidden or n.endswith(".qweight")]
        self._name_set = set(self._names)

    def __getitem__(self, name: str) -> Any:
        base = self.quantized.get(name)
        if base is None:
            if name not in self._name_set:
                raise KeyError(name)
            return self._tensors[name]
        parts = {s: self._tensors[f"{base}.{s}"] for s in SUFFIXES if f"{base}.{s}" in self._tensors}
        return from_gptq(parts, self.settings, dtype=self.dtype, name=base)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def finish_model(model: nnx.Module, quantized: str) -> nnx.Module:
    """Turns the ``QuantizedWeight`` kernels :func:`~epmq_jax.models.hf.load_into` placed into usable layers.

    Args:
      model: a model whose quantized linears hold a ``QuantizedWeight`` as ``kernel``.
      quantized: ``"dequantize"``: every such kernel becomes its float kernel (the model runs
        unchanged); ``"packed"``: every such ``nnx.Linear`` becomes an
        :class:`~epmq_jax.nn.QuantLinear` holding the packed kernel.

    Returns:
      ``model``, changed in place.
    """
    from epmq_jax.nn import quantize_linears

    state = nnx.state(model, nnx.Param)
    paths = {"/".join(map(str, p)) for p, v in nnx.to_flat_state(state) if is_quantized(v.get_value())}
    if quantized == "packed":
        def refuse(path: str, _kernel: Any) -> QuantizedWeight:
            raise ValueError(f"{path}: not quantized in the checkpoint")

        quantize_linears(model, paths.__contains__, refuse)
    else:
        nnx.update(model, jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x,
                                       nnx.to_pure_dict(state), is_leaf=is_quantized))
    return model

"""Packed low-bit kernels: b-bit code packing and the ``QuantizedWeight`` pytree.

Codes of a ``(d_in, d_out)`` kernel are packed along ``d_in`` (the contraction axis), so a
kernel sharded over output channels stays sharded the same way once packed. Each column is
a little-endian bitstream: code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` and byte ``k``
holds stream bits ``[8k, 8k+8)``. For 4 bits that is two codes per byte, low nibble first;
``d_in`` is padded with zero codes to a multiple of 8, so the packed array is
``(ceil(d_in / 8) * bits, d_out)`` uint8. Four consecutive bytes read as a little-endian
int32 give GPTQ's ``qweight`` word (see ``epmq_jax.checkpoint.export_safetensors``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from epmq_jax.quant._grid import QuantSpec


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Packs integer codes along the first axis.

    Args:
      codes: ``(d_in, d_out)`` integers in ``[0, 2**bits)``.
      bits: code width, 2..8.

    Returns:
      uint8 ``(ceil(d_in / 8) * bits, d_out)``.
    """
    d_in, d_out = codes.shape
    n8 = -(-d_in // 8)
    c = jnp.pad(codes.astype(jnp.uint8), ((0, n8 * 8 - d_in), (0, 0))).reshape(n8, 8, 1, d_out)
    stream = (c >> jnp.arange(bits, dtype=jnp.uint8)[:, None]) & 1        # (n8, 8, bits, d_out)
    stream = stream.reshape(n8, bits, 8, d_out)                            # byte, bit-in-byte
    weights = (jnp.uint8(1) << jnp.arange(8, dtype=jnp.uint8))[:, None]
    return jnp.sum(stream * weights, axis=2, dtype=jnp.uint8).reshape(n8 * bits, d_out)


def unpack_codes(packed: jax.Array, bits: int, d_in: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: uint8 ``(ceil(d_in/8)*bits, d_out)`` -> uint8 ``(d_in, d_out)``."""
    nbytes, d_out = packed.shape
    n8 = nbytes // bits
    p = packed.astype(jnp.uint8).reshape(n8, bits, 1, d_out)
    stream = (p >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1            # (n8, bits, 8, d_out)
    stream = stream.reshape(n8, 8, bits, d_out)                            # code, bit-in-code
    weights = (jnp.uint8(1) << jnp.arange(bits, dtype=jnp.uint8))[:, None]
    codes = jnp.sum(stream * weights, axis=2, dtype=jnp.uint8)
    return codes.reshape(n8 * 8, d_out)[:d_in]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "scales", "zeros", "g_idx", "input_scale"],
    meta_fields=["bits", "group_size", "symmetric", "shape", "dtype"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized Flax kernel ``W`` of shape ``(d_in, d_out)``, held packed.

    Attributes:
      packed: uint8 ``(ceil(d_in/8)*bits, d_out)``, the codes packed along ``d_in``.
      scales: float32 ``(n_groups, d_out)``.
      zeros: float32 ``(n_groups, d_out)``, integer-valued zero points.
      g_idx: int32 ``(d_in,)``, the group of each input row (``i // group_size`` unless
        GPTQ ran with act-order and dynamic groups).
      input_scale: optional float32 ``(d_in,)``; when present the effective kernel is
        ``dequant(codes)[i, :] / input_scale[i]`` (AWQ's per-input-channel scale).
      bits, group_size, symmetric: the :class:`QuantSpec` it was made with.
      shape: ``(d_in, d_out)``.
      dtype: name of the dtype :meth:`dequantize` returns (the original kernel's).
    """

    packed: jax.Array
    scales: jax.Array
    zeros: jax.Array
    g_idx: jax.Array
    input_scale: jax.Array | None = None
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    shape: tuple[int, int] = (0, 0)
    dtype: str = "float32"

    @classmethod
    def from_codes(cls, codes: jax.Array, scales: jax.Array, zeros: jax.Array,
                   g_idx: jax.Array, spec: QuantSpec, dtype=jnp.float32,
                   input_scale: jax.Array | None = None) -> QuantizedWeight:
        """Packs ``(d_in, d_out)`` codes with their ``(n_groups, d_out)`` scales and zeros."""
        return cls(packed=pack_codes(codes, spec.bits),
                   scales=scales.astype(jnp.float32), zeros=zeros.astype(jnp.float32),
                   g_idx=g_idx.astype(jnp.int32), input_scale=input_scale,
                   bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                   shape=tuple(int(s) for s in codes.shape), dtype=np.dtype(dtype).name)

    def __repr__(self) -> str:
        scaled = "" if self.input_scale is None else ", input_scale"
        return (f"QuantizedWeight(shape={self.shape}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, "
                f"dtype={self.dtype}{scaled})")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def codes(self) -> jax.Array:
        """The unpacked codes, uint8 ``(d_in, d_out)``."""
        return _codes(self)

    def dequantize(self) -> jax.Array:
        """The effective float kernel ``(d_in, d_out)`` in :attr:`dtype`."""
        return _dequantize(self)


@jax.jit
def _codes(qw: QuantizedWeight) -> jax.Array:
    return unpack_codes(qw.packed, qw.bits, qw.shape[0])


@jax.jit
def _dequantize(qw: QuantizedWeight) -> jax.Array:
    q = unpack_codes(qw.packed, qw.bits, qw.shape[0]).astype(jnp.float32)
    w = qw.scales[qw.g_idx] * (q - qw.zeros[qw.g_idx])
    if qw.input_scale is not None:
        w = w / qw.input_scale[:, None]
    return w.astype(qw.dtype)


def is_quantized(x) -> bool:
    """True for a :class:`QuantizedWeight` (use as ``is_leaf`` when mapping over param trees)."""
    return isinstance(x, QuantizedWeight)

"""Quantization of Flax kernels ``(d_in, d_out)``: the grid, packing, RTN, GPTQ and AWQ's pieces.

Every quantizer maps a kernel (and, for the data-aware ones, statistics) to a packed
:class:`QuantizedWeight`; ``.dequantize()`` gives the float kernel back. AWQ over whole blocks
(scales shared by the layers reading one input, folded into the op before them) is
:mod:`epmq_jax.calib.awq`.
"""

from epmq_jax.quant._awq import (
    awq,
    awq_ratios,
    awq_scales,
    clip_kernel,
    clip_search,
    group_grams,
    quantize_clipped,
    sample_stride,
    scaled_fake_quant,
)
from epmq_jax.quant._gptq import GPTQInfo, damped_factor, gptq
from epmq_jax.quant._grid import QuantSpec, fit_scale_zero, group_params, quantize_codes
from epmq_jax.quant._packing import QuantizedWeight, is_quantized, pack_codes, unpack_codes
from epmq_jax.quant._rtn import rtn

__all__ = [
    "GPTQInfo",
    "QuantSpec",
    "QuantizedWeight",
    "awq",
    "awq_ratios",
    "awq_scales",
    "clip_kernel",
    "clip_search",
    "damped_factor",
    "fit_scale_zero",
    "gptq",
    "group_grams",
    "group_params",
    "is_quantized",
    "pack_codes",
    "quantize_codes",
    "quantize_clipped",
    "rtn",
    "sample_stride",
    "scaled_fake_quant",
    "unpack_codes",
]

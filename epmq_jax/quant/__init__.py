"""Quantization of Flax kernels ``(d_in, d_out)``: the grid, packing, RTN and GPTQ.

Every quantizer maps a kernel (and, for the data-aware ones, statistics) to a packed
:class:`QuantizedWeight`; ``.dequantize()`` gives the float kernel back.
"""

from epmq_jax.quant._awq import awq, awq_search
from epmq_jax.quant._gptq import GPTQInfo, gptq
from epmq_jax.quant._grid import QuantSpec, fit_scale_zero, group_params, quantize_codes
from epmq_jax.quant._packing import QuantizedWeight, is_quantized, pack_codes, unpack_codes
from epmq_jax.quant._rtn import rtn

__all__ = [
    "GPTQInfo",
    "QuantSpec",
    "QuantizedWeight",
    "awq",
    "awq_search",
    "fit_scale_zero",
    "gptq",
    "group_params",
    "is_quantized",
    "pack_codes",
    "quantize_codes",
    "rtn",
    "unpack_codes",
]

"""Running quantized weights in Flax models.

- :func:`quantize_params` / :func:`dequantize_params`: swap kernels in any param pytree
  (linen dict, ``nnx.State``) for packed ``QuantizedWeight`` s and back (``dequantize_params``
  lets a user's unchanged model apply the quantized weights).
- :class:`QuantDense` (linen) and :class:`QuantLinear` (nnx): ``x @ W + b`` from the packed
  kernel; :func:`quantize_linears` swaps the ``nnx.Linear`` s of a model in place.
"""

from epmq_jax.nn._linen import QuantDense
from epmq_jax.nn._nnx import QuantLinear, quantize_linears
from epmq_jax.nn._ops import qdot
from epmq_jax.nn._params import dequantize_params, quantize_params

__all__ = [
    "QuantDense",
    "QuantLinear",
    "dequantize_params",
    "qdot",
    "quantize_linears",
    "quantize_params",
]

"""Round-to-nearest (RTN) quantization of a Flax kernel: the data-free baseline."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from epmq_jax.quant._grid import QuantSpec, check_kernel, group_params, quantize_codes
from epmq_jax.quant._packing import QuantizedWeight


@functools.partial(jax.jit, static_argnames="spec")
def _rtn(w: jax.Array, spec: QuantSpec) -> QuantizedWeight:
    d_in = w.shape[0]
    scales, zeros = group_params(w, spec)
    g_idx = jnp.arange(d_in, dtype=jnp.int32) // spec.group_len(d_in)
    codes = quantize_codes(w.astype(jnp.float32), scales[g_idx], zeros[g_idx], spec.maxq)
    return QuantizedWeight.from_codes(codes, scales, zeros, g_idx, spec, dtype=w.dtype)


def rtn(w: jax.Array, spec: QuantSpec) -> QuantizedWeight:
    """Rounds every entry of a kernel to the nearest point of its group's min-max grid.

    Args:
      w: float kernel ``(d_in, d_out)`` (Flax layout); ``spec.group_size`` must divide ``d_in``.
      spec: the grid.

    Returns:
      The packed :class:`QuantizedWeight`; ``.dequantize()`` gives the rounded kernel.

    Raises:
      ValueError: ``w`` is not 2-D float, contains NaN/inf, or the group size does not divide
        ``d_in``.
    """
    check_kernel(w, spec)
    return _rtn(jnp.asarray(w), spec)

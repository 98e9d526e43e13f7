"""The packed-kernel matmul shared by the linen and nnx inference modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from epmq_jax.quant import QuantizedWeight, QuantSpec


def qdot(x: jax.Array, kernel: QuantizedWeight) -> jax.Array:
    """``x @ W`` for a packed kernel ``W (d_in, d_out)``; ``x`` is ``(..., d_in)``.

    The codes are unpacked and scaled inside the same jit as the matmul (XLA fuses the
    dequantization into the matmul's operand); the result has ``x``'s float dtype.
    """
    if not isinstance(kernel, QuantizedWeight):
        raise ValueError(
            f"expected a QuantizedWeight kernel, got {type(kernel).__name__} of shape "
            f"{getattr(kernel, 'shape', None)}; quantize the params first "
            "(epmq_jax.nn.quantize_params)")
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"input of shape {tuple(x.shape)} does not match a kernel of shape "
                         f"{kernel.shape} (expected last axis {kernel.shape[0]})")
    dtype = jnp.result_type(x.dtype, jnp.float32) if not jnp.issubdtype(
        x.dtype, jnp.floating) else x.dtype
    return jnp.matmul(x, kernel.dequantize().astype(dtype))


def empty_qweight(shape: tuple[int, int], spec: QuantSpec) -> QuantizedWeight:
    """A placeholder packed kernel (all codes 0, unit scales) giving modules their param shapes."""
    d_in, d_out = shape
    n_groups = spec.n_groups(d_in)
    return QuantizedWeight.from_codes(
        jnp.zeros(shape, jnp.uint8), jnp.ones((n_groups, d_out)), jnp.zeros((n_groups, d_out)),
        jnp.arange(d_in, dtype=jnp.int32) // spec.group_len(d_in), spec)

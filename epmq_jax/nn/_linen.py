"""linen ``QuantDense``: a ``nn.Dense`` whose kernel param is a packed ``QuantizedWeight``."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from epmq_jax.nn._ops import empty_qweight, qdot
from epmq_jax.quant import QuantSpec


class QuantDense(nn.Module):
    """``y = x @ W + b`` with ``W (d_in, features)`` held packed.

    Drop-in for ``nn.Dense`` in inference: same param names (``kernel``, ``bias``), so the
    tree from ``quantize_params(dense_params, r"kernel", spec)`` applies directly.

    Attributes:
      features: ``d_out``.
      spec: the grid of the placeholder kernel made by ``init``; applied params may carry
        any grid (the kernel's own metadata is used).
      use_bias: add a bias ``(features,)``.
      bias_init: initializer for the bias.
    """

    features: int
    spec: QuantSpec = QuantSpec()
    use_bias: bool = True
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x (..., d_in)`` -> ``(..., features)``."""
        if self.has_variable("params", "kernel"):   # any spec; qdot checks type and shape
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", lambda _rng, shape: empty_qweight(shape, self.spec),
                                (jnp.shape(x)[-1], self.features))
        y = qdot(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(y.dtype)
        return y

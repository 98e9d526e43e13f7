"""nnx ``QuantLinear``: an ``nnx.Linear`` whose kernel is a packed ``QuantizedWeight``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from epmq_jax._tree import PathFilter, compile_filter
from epmq_jax.nn._ops import empty_qweight, qdot
from epmq_jax.nn._params import Quantizer, quantize_kernel
from epmq_jax.quant import QuantSpec


class QuantLinear(nnx.Module):
    """``y = x @ W + b`` with ``W (in_features, out_features)`` held packed.

    Build one from a trained layer with :meth:`from_linear`, or swap every matching
    ``nnx.Linear`` of a model with :func:`quantize_linears`.
    """

    def __init__(self, in_features: int, out_features: int, *, spec=None,
                 use_bias: bool = True, kernel=None, bias=None):
        """Args:
          in_features, out_features: kernel shape ``(d_in, d_out)``.
          spec: grid of the placeholder kernel (ignored when ``kernel`` is given).
          use_bias: add a bias.
          kernel: a ``QuantizedWeight (in_features, out_features)``; default a placeholder.
          bias: ``(out_features,)``; default zeros.
        """
        if kernel is None:
            kernel = empty_qweight((in_features, out_features), spec or QuantSpec())
        if tuple(kernel.shape) != (in_features, out_features):
            raise ValueError(f"kernel of shape {kernel.shape} given for a "
                             f"({in_features}, {out_features}) QuantLinear")
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(kernel)
        if use_bias:
            self.bias = nnx.Param(jnp.zeros(out_features) if bias is None else jnp.asarray(bias))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nnx.Linear, quantizer: Quantizer, path: str = "kernel"):
        """Quantizes a trained ``nnx.Linear`` (``quantizer`` as in ``quantize_params``; a kernel
        that already is a ``QuantizedWeight`` is kept)."""
        kernel = quantize_kernel(path, linear.kernel.get_value(), quantizer)
        bias = None if linear.bias is None else linear.bias[...]
        return cls(linear.in_features, linear.out_features, kernel=kernel,
                   use_bias=bias is not None, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x (..., in_features)`` -> ``(..., out_features)``."""
        y = qdot(x, self.kernel.get_value())
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def quantize_linears(model: nnx.Module, rule: PathFilter, quantizer: Quantizer) -> list[str]:
    """Replaces, in place, every ``nnx.Linear`` of ``model`` whose kernel path matches ``rule``.

    The kernel path is the module path plus ``"/kernel"`` (e.g. ``"blocks/0/mlp/kernel"``).

    Returns:
      The module paths that were replaced.
    """
    match = compile_filter(rule)
    todo = [(path, m) for path, m in nnx.iter_modules(model)
            if isinstance(m, nnx.Linear) and match("/".join(map(str, path)) + "/kernel")]
    for path, linear in todo:
        kernel_path = "/".join(map(str, path)) + "/kernel"
        new = QuantLinear.from_linear(linear, quantizer, path=kernel_path)
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return ["/".join(map(str, p)) for p, _ in todo]

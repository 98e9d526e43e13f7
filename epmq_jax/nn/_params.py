"""Swapping the kernels of any parameter pytree for packed ``QuantizedWeight`` s, and back.

Works on linen param dicts, ``nnx.State`` and plain nested dicts. Leaves are chosen by a
path rule (a regex searched in the leaf path of :func:`epmq_jax._tree.path_str`, e.g.
``"params/Dense_0/kernel"`` in linen, ``"l1/kernel"`` in an ``nnx.State``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from epmq_jax._tree import PathFilter, compile_filter, map_with_path
from epmq_jax.quant import QuantizedWeight, QuantSpec, is_quantized, rtn
from epmq_jax.quant._grid import check_kernel

Quantizer = QuantSpec | Callable[[str, jax.Array], QuantizedWeight]


def quantize_params(params: Any, rule: PathFilter, quantizer: Quantizer) -> Any:
    """Replaces the kernels whose path matches ``rule`` by ``QuantizedWeight`` s.

    Args:
      params: any pytree of arrays (linen params, ``nnx.State``, nested dicts). Leaves that
        are already ``QuantizedWeight`` are kept.
      rule: regex (``re.search`` on the leaf path), compiled pattern, predicate or None (all).
        Every matched leaf must be a 2-D float kernel ``(d_in, d_out)``.
      quantizer: a :class:`QuantSpec` (round-to-nearest with that grid) or a function
        ``(path, kernel) -> QuantizedWeight`` (e.g. GPTQ with that layer's Hessian).

    Returns:
      The same tree with the matched kernels replaced.

    Raises:
      ValueError: a matched leaf is not a 2-D float kernel, contains NaN/inf, or its ``d_in``
        is not divisible by the group size; the message names the leaf path.
    """
    match = compile_filter(rule)

    def one(path: str, leaf: Any) -> Any:
        if is_quantized(leaf) or not match(path):
            return leaf
        return quantize_kernel(path, leaf, quantizer)

    return map_with_path(one, params, is_leaf=is_quantized)


def quantize_kernel(path: str, w: jax.Array, quantizer: Quantizer) -> QuantizedWeight:
    """Quantizes one kernel ``(d_in, d_out)`` (a ``QuantizedWeight`` is returned as it is);
    errors name ``path``. See :func:`quantize_params`."""
    if is_quantized(w):
        return w
    if isinstance(quantizer, QuantSpec):
        check_kernel(w, quantizer, name=path)
        return rtn(w, quantizer)
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"{path}: the rule matched a leaf of shape "
                         f"{getattr(w, 'shape', None)}; expected a 2-D kernel (d_in, d_out)")
    try:
        return quantizer(path, w)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def dequantize_params(params: Any) -> Any:
    """Replaces every ``QuantizedWeight`` by its float kernel, so any Flax model can apply it.

    ``model.apply(dequantize_params(qparams), x)`` (linen) or
    ``nnx.update(model, dequantize_params(qstate))`` (nnx) runs the user's own model with
    the quantized weights; for packed inference use ``QuantDense`` / ``QuantLinear``.
    """
    return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, params,
                        is_leaf=is_quantized)

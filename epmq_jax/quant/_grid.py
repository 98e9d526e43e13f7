"""The b-bit quantization grid: what a spec means and how scales and zero points are fitted.

A Flax kernel ``W`` of shape ``(d_in, d_out)`` is quantized in groups of ``group_size``
consecutive input rows; every (group, output channel) pair gets its own ``scale`` and
integer ``zero``, and an entry is stored as the code ``q = clip(round(w / scale) + zero,
0, 2**bits - 1)`` standing for ``scale * (q - zero)``.

Fitting follows the GPTQ reference (IST-DASLab ``quant.py``, ``Quantizer.find_params``):
min and max are taken over the group with 0 included, an all-zero group gets the range
[-1, 1]; asymmetric: ``scale = (max - min) / maxq``, ``zero = round(-min / scale)``;
symmetric: ``max = max(|min|, max)``, ``min = -max`` when ``min < 0`` (a group with no
negative entry keeps ``min = 0``, as the reference does), ``zero = (maxq + 1) / 2``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How a kernel is quantized.

    Attributes:
      bits: code width, 2..8.
      group_size: number of consecutive input rows sharing a scale and zero point;
        -1 means one group spanning all of ``d_in`` (per output channel).
      symmetric: symmetric grid (zero point fixed at ``2**(bits-1)``) instead of min-max.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be an int in 2..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or not (
                self.group_size == -1 or self.group_size > 0):
            raise ValueError(
                f"QuantSpec.group_size must be -1 or a positive int, got {self.group_size!r}")

    @property
    def maxq(self) -> int:
        """The largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def group_len(self, d_in: int) -> int:
        """Rows per group for a kernel with ``d_in`` input rows (``d_in`` when group_size=-1)."""
        return d_in if self.group_size == -1 else self.group_size

    def n_groups(self, d_in: int, *, path: str = "") -> int:
        """Number of groups along ``d_in``; raises ValueError if group_size does not divide it."""
        if self.group_size != -1 and d_in % self.group_size:
            where = f"{path}: " if path else ""
            raise ValueError(
                f"{where}d_in={d_in} is not divisible by group_size={self.group_size}; "
                "use a group size that divides the input dimension, or group_size=-1")
        return d_in // self.group_len(d_in)


def fit_scale_zero(w: jax.Array, spec: QuantSpec, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """Fits the grid to ``w`` by min-max over ``axis`` (the input rows of one group).

    Args:
      w: float array, e.g. ``(g, d_out)`` for one group or ``(n_groups, g, d_out)``.
      spec: the grid.
      axis: the reduced axis.

    Returns:
      ``(scale, zero)``, float32 with ``axis`` removed; ``zero`` is integer-valued in
      ``[0, maxq]``.
    """
    w = w.astype(jnp.float32)
    xmin = jnp.minimum(w.min(axis=axis), 0.0)
    xmax = jnp.maximum(w.max(axis=axis), 0.0)
    if spec.symmetric:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    if spec.symmetric:
        zero = jnp.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = jnp.clip(jnp.round(-xmin / scale), 0, spec.maxq)
    return scale, zero


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """Codes ``clip(round(w / scale) + zero, 0, maxq)`` as float32 (broadcasting)."""
    return jnp.clip(jnp.round(w / scale) + zero, 0, maxq)


def group_params(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Scales and zeros of every group of a kernel.

    Args:
      w: ``(d_in, d_out)`` kernel; ``spec.group_size`` must divide ``d_in``.
      spec: the grid.

    Returns:
      ``(scales, zeros)``, each float32 ``(n_groups, d_out)``.
    """
    d_in, d_out = w.shape
    g = spec.group_len(d_in)
    return fit_scale_zero(w.reshape(d_in // g, g, d_out), spec, axis=1)


def is_concrete(x) -> bool:
    """False while ``x`` is traced (inside jit), where value checks cannot run."""
    return not isinstance(x, jax.core.Tracer)


def check_kernel(w, spec: QuantSpec, *, name: str = "w") -> None:
    """Raises ValueError unless ``w`` is a finite float ``(d_in, d_out)`` kernel the spec fits.

    The finiteness check runs only on concrete arrays (not under an outer ``jit``).
    """
    shape = getattr(w, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D kernel (d_in, d_out), got shape {shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a float kernel, got dtype {w.dtype}")
    spec.n_groups(shape[0], path=name)
    if is_concrete(w) and not bool(jnp.isfinite(w).all()):
        raise ValueError(f"{name}: kernel of shape {tuple(shape)} contains NaN or inf")

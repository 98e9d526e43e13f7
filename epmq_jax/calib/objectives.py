"""Layer objectives: what one linear layer should match, as a quadratic system (H, B, const).

Every objective is a quadratic in the layer's kernel Q ``(d_in, d_out)``,

    L(Q) = tr(QᵀHQ) − 2·tr(QᵀB) + const = tr((Q − W*)ᵀH(Q − W*)) + L(W*),   W* = H⁻¹B,

so "what to match" (this module) is separate from "how to round" (:mod:`epmq_jax.calib.solve`).
From the accumulated statistics H_d = Σ_t ω_t X_tᵀX_t, B_d = Σ_t ω_t X_tᵀ(X̃_t W_t)
(:mod:`epmq_jax.calib.stats`) and the merged kernel W_m (METHOD.md §4):

- ``gptq``: targets from the merged weights, H = H_d, B = H_d W_m (so W* = W_m).
- ``epmq``: expert targets with an anchor of strength λ toward W_m:
  ``weight``: H = H_d + λcI, B = B_d + λcW_m, c = mean(diag H_d);
  ``output``: H = (1+λ)H_d, B = B_d + λH_d W_m.
- ``regmean``: the λ = 0 relaxation with X̃_t = X_t, H = H_d, B = Σ_t ω_t X_tᵀX_t W_t (RegMean
  with Gram matrices taken on the path being merged, sequentially).

For ``epmq`` the target-side input X̃_t (``target``) is ``expert`` (the input the layer sees in
expert t's own forward pass), ``merged`` (X̃_t = X_t) or ``mix`` (α·expert + (1−α)·X_t).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from epmq_jax.calib.stats import TASK_WEIGHTINGS, Moments, TaskWeighting

_HI = jax.lax.Precision.HIGHEST
KINDS = ("gptq", "epmq", "regmean")
ANCHORS = ("weight", "output")
TARGETS = ("expert", "merged", "mix")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    """A layer objective and its switches (METHOD.md §4; defaults are the method's).

    Attributes:
      kind: ``gptq`` (match the merged layer), ``epmq`` (match the experts, anchored to the
        merge) or ``regmean`` (match the experts, no anchor).
      lam: anchor strength λ ≥ 0 (``epmq`` only).
      anchor: ``output`` (Σ_t ω_t‖X_t(Q − W_m)‖²) or ``weight`` (c‖Q − W_m‖²_F, c = mean diag H_d).
      target: target-side input X̃_t of ``epmq``: ``expert``, ``merged`` or ``mix``
        (``regmean`` always uses X̃_t = X_t).
      alpha: the expert share α of ``mix``.
      task_weights: ω_t: ``uniform`` (1), ``tokens`` (1/n_t) or ``frobenius`` (1/‖X_tᵀX_t‖_F).
        Default (None): ``uniform`` for ``gptq`` (all calibration rows alike, as GPTQ on
        concatenated data) and ``frobenius`` otherwise.
    """

    kind: Literal["gptq", "epmq", "regmean"] = "epmq"
    lam: float = 0.1
    anchor: Literal["weight", "output"] = "output"
    target: Literal["expert", "merged", "mix"] = "expert"
    alpha: float = 0.25
    task_weights: TaskWeighting | None = None

    def __post_init__(self):
        if self.task_weights is None:
            object.__setattr__(self, "task_weights", "uniform" if self.kind == "gptq" else "frobenius")
        if self.kind not in KINDS:
            raise ValueError(f"objective kind must be one of {KINDS}, got {self.kind!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.task_weights not in TASK_WEIGHTINGS:
            raise ValueError(f"task_weights must be one of {TASK_WEIGHTINGS}, got {self.task_weights!r}")
        if not (isinstance(self.lam, numbers.Real) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not (isinstance(self.alpha, numbers.Real) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")

    @property
    def needs_targets(self) -> bool:
        """Whether B must be accumulated from expert targets (False for ``gptq``)."""
        return self.kind != "gptq"

    @property
    def needs_expert_inputs(self) -> bool:
        """Whether X̃_t comes from the expert paths (so they must be run beside the quantized one)."""
        return self.kind == "epmq" and self.target != "merged"


class System(NamedTuple):
    """The quadratic L(Q) = tr(QᵀHQ) − 2tr(QᵀB) + const of one layer.

    Attributes:
      h: ``(d_in, d_in)``; b: ``(d_in, d_out)``; const: scalar.
    """

    h: jax.Array
    b: jax.Array
    const: jax.Array


def target_input(x: jax.Array, x_expert: jax.Array | None, objective: Objective) -> jax.Array:
    """X̃_t from the quantized-path input ``x`` and the expert-path input ``x_expert`` (same shape)."""
    if not objective.needs_expert_inputs:
        return x
    if x_expert is None:
        raise ValueError(f"target={objective.target!r} needs the expert-path inputs")
    if objective.target == "expert":
        return x_expert
    return objective.alpha * x_expert + (1.0 - objective.alpha) * x


def _tr_ab(a: jax.Array, b: jax.Array, total: Callable[[jax.Array], jax.Array] = jnp.sum
           ) -> jax.Array:
    """tr(aᵀb) for two matrices of the same shape (``total``: how all entries are summed)."""
    return total(a * b)


def layer_system(objective: Objective, m: Moments, w_merged: jax.Array,
                 lam: float | jax.Array | None = None) -> System:
    """Builds (H, B, const) of one layer from its accumulated moments.

    Args:
      objective: the objective.
      m: ω-weighted moments; ``m.b`` = Σ_t ω_t X_tᵀ(X̃_t W_t) (ignored, may be None, for ``gptq``).
      w_merged: the merged kernel W_m ``(d_in, d_out)``.
      lam: overrides ``objective.lam`` (may be traced, so a λ sweep compiles once).

    Returns:
      The :class:`System`.
    """
    return system_and_merged(objective, m, w_merged, lam)[0]


def system_and_merged(objective: Objective, m: Moments, w_merged: jax.Array,
                      lam: float | jax.Array | None = None, *,
                      total: Callable[[jax.Array], jax.Array] = jnp.sum) -> tuple[System, jax.Array]:
    """:func:`layer_system` and H·W_m ``(d_in, d_out)``, which it computes on the way (one matmul).

    With H·W_m, L(W_m) = tr(W_mᵀ(H W_m)) − 2tr(W_mᵀB) + const costs no further matmul.
    ``total`` sums all entries of a ``(d_in, d_out)`` array (default ``jnp.sum``; the driver
    passes a fixed-order sum when the columns are split over devices).
    """
    h_d = m.h
    w_m = w_merged.astype(jnp.float32)
    hw = jnp.matmul(h_d, w_m, precision=_HI)
    if objective.kind == "gptq":
        return System(h_d, hw, _tr_ab(w_m, hw, total)), hw
    if m.b is None:
        raise ValueError(f"objective {objective.kind!r} needs target moments B")
    lam = (objective.lam if lam is None else lam) if objective.kind == "epmq" else 0.0
    if objective.anchor == "weight":
        c = jnp.mean(jnp.diag(h_d))
        eye = jnp.eye(h_d.shape[0], dtype=h_d.dtype)
        return (System(h_d + lam * c * eye, m.b + lam * c * w_m,
                       m.yy + lam * c * _tr_ab(w_m, w_m, total)), hw + lam * c * w_m)
    return (System((1.0 + lam) * h_d, m.b + lam * hw, m.yy + lam * _tr_ab(w_m, hw, total)),
            (1.0 + lam) * hw)


def value_from_product(system: System, q: jax.Array, hq: jax.Array, *,
                       total: Callable[[jax.Array], jax.Array] = jnp.sum) -> jax.Array:
    """L(Q) from Q and H·Q (no matmul): tr(QᵀHQ) − 2tr(QᵀB) + const (``total``: as
    :func:`system_and_merged`)."""
    return _tr_ab(q, hq, total) - 2.0 * _tr_ab(q, system.b, total) + system.const


def objective_value(system: System, q: jax.Array) -> jax.Array:
    """L(Q) = tr(QᵀHQ) − 2tr(QᵀB) + const (float32, HIGHEST precision)."""
    q = q.astype(jnp.float32)
    return value_from_product(system, q, jnp.matmul(system.h, q, precision=_HI))

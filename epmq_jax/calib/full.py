"""E-PMQ-full, this project's extension of E-PMQ (docs/method.md, "E-PMQ-full").

Behind ``CalibConfig(full=FullConfig(...))`` the sequential driver (:mod:`epmq_jax.calib.driver`)
does, block by block and in the same compiled-scan style, more than E-PMQ's kernel solve. Each
piece is a switch of :class:`FullConfig`:

- ``bias``: each linear layer with a bias solves kernel and bias together against the experts'
  affine outputs Y_t = X̃_t W_t + b_t, on inputs augmented with a constant 1 (x̄ = [x, 1],
  W̄ = [W; b], so the bias is the last row of an augmented kernel). Only the kernel rows are
  rounded: GPTQ (or RTN) on the Schur complement S = H_KK − h_Kb h_bK / h_bb (the weighted
  covariance of the inputs); the bias stays float and takes its closed form given the rounded
  kernel Q, b = b* + h_bK (W*_K − Q) / h_bb: it absorbs the mean rounding error
  (:func:`affine_layer_step`). Layers without a bias leaf are solved as in E-PMQ.
- ``norms``: each norm layer the adapter names (:class:`~epmq_jax.calib.adapter.NormSpec`) fits
  its per-channel scale γ and shift β to the experts' normalised outputs y_t = γ_t ẑ_t + β_t from
  its own normalised input ẑ: per channel a 2x2 (1x1 without a shift) least squares, anchored
  and damped like the kernels (:func:`norm_step`).
- ``token_reach`` / ``token_rest``: in the last ``token_reach`` blocks, the rows of a capture
  that the task does not read (the adapter's ``readout``) get weight ``token_rest`` (1: off).
- ``rho``: the anchor's centre (and the damping's) is ρ·W_m + (1 − ρ)·W_base for every
  calibrated leaf instead of W_m (the driver needs ``base=``); ρ > 1 extrapolates the merge.
- ``leaves``: the adapter's stem and head pseudo blocks (``leaf_kinds``) are calibrated too, in
  float (no rounding): e.g. a ViT's patch embedding and pre-LayerNorm before block 0, its
  post-LayerNorm and projection after the last block.
- ``residual``: a layer whose output is added to a residual stream r (the adapter's
  ``residuals``) also corrects the stream's accumulated error: its target becomes
  X̃_t W_t + b_t + (r̃_t − r), r̃_t the stream on the expert path, so the sum r + XQ + b matches
  the expert's r̃_t + X̃_t W_t + b_t (the block's output, not only the layer's).
- ``heads`` (with ``leaves``): the head pseudo block's last layer P, whose output each task reads
  through its own linear head (``calibrate(readout_heads=...)``, e.g. a classifier's class
  embeddings), is refitted in each task's readout metric: with U_t the task's head (d_out, C_t),
  centred over its classes (a logit shift common to all classes changes no prediction) so that
  M_t = U_t (I − 11ᵀ/C_t) U_tᵀ, P minimises Σ_t ω_t ‖(X̃_t P − Y_t) M_t^½‖² + μ ‖X̃ (P − P̂)‖²_δ,
  P̂ the layer's solution without the metric (the directions no head reads stay there) and
  μ = ``head_lam`` (:func:`metric_solve`). The normal equations Σ_t H_t P M_t + μ H̄_δ P = Σ_t B_t M_t
  + μ H̄_δ P̂ have no closed form for several tasks; they are solved by preconditioned conjugate
  gradients on the correction P − P̂.

Every statistic is float32 at ``Precision.HIGHEST``; nothing inside a block waits for the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epmq_jax.calib import stats as st
from epmq_jax.calib.adapter import FullAdapter, NormSpec, capture_rows, get_path, key_path, set_path
from epmq_jax.calib.objectives import Objective, target_input
from epmq_jax.calib.solve import (
    _in_dtype,
    _relax,
    _report,
    effective_kernel,
    finish_stats,
    layer_step,
    round_weight,
    stat_float,
)

PyTree = Any
_HI = jax.lax.Precision.HIGHEST
#: The pieces of E-PMQ-full, by the name rows use (``"all"`` = every piece, ``"none"`` = none).
PIECES = ("bias", "norms", "tokens", "anchor", "leaves", "residual", "heads")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullConfig:
    """E-PMQ-full's switches (module docstring); all off is E-PMQ.

    Attributes:
      bias: solve kernel and bias together (augmented inputs); the bias absorbs the rounding error.
      norms: calibrate the norm layers' per-channel scale and shift.
      token_reach: the number of last blocks whose unread rows are down-weighted (0: none).
      token_rest: the weight of unread rows there, in [0, 1] (1: every row alike).
      rho: the anchor's centre ρ·W_m + (1 − ρ)·W_base (1: the merge; needs the base otherwise).
      leaves: calibrate the stem and head pseudo blocks (in float).
      residual: layers writing into a residual stream also correct its error (block outputs
        matched, not only layer outputs).
      heads: refit the head's last layer in each task's readout metric (needs ``leaves`` and the
        tasks' heads: ``calibrate(readout_heads=...)``).
      head_lam: μ, the pull of that refit toward the layer's solution without the metric (> 0).
    """

    bias: bool = True
    norms: bool = True
    token_reach: int = 0
    token_rest: float = 1.0
    rho: float = 1.0
    leaves: bool = False
    residual: bool = False
    heads: bool = False
    head_lam: float = 0.01

    def __post_init__(self):
        for name in ("bias", "norms", "leaves", "residual", "heads"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"full.{name} must be true or false, got {getattr(self, name)!r}")
        r = self.token_reach
        if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0:
            raise ValueError(f"full.token_reach must be an int >= 0, got {r!r}")
        if not (isinstance(self.token_rest, numbers.Real) and 0.0 <= self.token_rest <= 1.0):
            raise ValueError(f"full.token_rest must be in [0, 1], got {self.token_rest!r}")
        if not (isinstance(self.rho, numbers.Real) and math.isfinite(self.rho) and self.rho >= 0):
            raise ValueError(f"full.rho must be a finite number >= 0, got {self.rho!r}")
        mu = self.head_lam
        if not (isinstance(mu, numbers.Real) and not isinstance(mu, bool) and math.isfinite(mu) and mu > 0):
            raise ValueError(f"full.head_lam must be a finite number > 0, got {mu!r}")
        if self.heads and not self.leaves:
            raise ValueError("full.heads refits the head pseudo block's last layer: it needs full.leaves=True")

    @property
    def tokens(self) -> bool:
        """Whether token weighting changes anything (some reach and a rest weight below 1)."""
        return self.token_reach > 0 and self.token_rest < 1.0

    def settings(self) -> dict[str, Any]:
        """The switches as a JSON-able dict (what a row records)."""
        return {f"full_{k}": v for k, v in dataclasses.asdict(self).items()}


def piece_config(piece: str, chosen: FullConfig) -> FullConfig:
    """The :class:`FullConfig` of one ablation row: ``piece`` alone with ``chosen``'s values.

    ``"all"`` is ``chosen`` itself; ``"none"`` turns every piece off (E-PMQ); ``"tokens"`` keeps
    ``chosen``'s reach and rest weight, ``"anchor"`` its ρ; ``"heads"`` needs the head pseudo
    block, so it runs with ``leaves`` (compare it with the ``"leaves"`` row).

    Raises:
      ValueError: an unknown piece.
    """
    off = FullConfig(bias=False, norms=False, token_reach=0, token_rest=1.0, rho=1.0, leaves=False,
                     residual=False, heads=False, head_lam=chosen.head_lam)
    if piece == "all":
        return chosen
    if piece == "none":
        return off
    if piece in ("bias", "norms", "leaves", "residual"):
        return dataclasses.replace(off, **{piece: True})
    if piece == "tokens":
        return dataclasses.replace(off, token_reach=chosen.token_reach, token_rest=chosen.token_rest)
    if piece == "anchor":
        return dataclasses.replace(off, rho=chosen.rho)
    if piece == "heads":
        return dataclasses.replace(off, leaves=True, heads=True)
    raise ValueError(f"E-PMQ-full piece {piece!r}: expected one of {('all', 'none', *PIECES)}")


# ----------------------------------------------------------------------------- checks


def check(config, adapter, params: PyTree, base: PyTree | None, readout_heads: Sequence[Any] | None = None,
          n_tasks: int | None = None) -> None:
    """Refuses, before any work, what E-PMQ-full cannot run: the wrong objective or rounder, an
    adapter without the :class:`~epmq_jax.calib.adapter.FullAdapter` methods a switch needs, or a
    missing / mismatched base for ρ ≠ 1, or ``heads`` without a head pseudo block whose last
    group is one layer, or without one readout head ``(d_out, C_t >= 2)`` per task."""
    full = config.full
    if config.objective.kind != "epmq":
        raise ValueError(f"CalibConfig.full needs objective kind 'epmq', got {config.objective.kind!r}")
    if config.rounder not in ("gptq", "rtn", "none"):
        raise ValueError(f"CalibConfig.full rounds with 'gptq', 'rtn' or 'none', got {config.rounder!r}")
    needs = [n for n, on in (("norms", full.norms), ("token weights", full.tokens),
                             ("leaves", full.leaves), ("residual", full.residual)) if on]
    if needs and not isinstance(adapter, FullAdapter):
        raise ValueError(f"E-PMQ-full's {', '.join(needs)} need an adapter with the FullAdapter "
                         f"methods (full_norms, run_block_full, readout, leaf_kinds, residuals); "
                         f"{type(adapter).__name__} has none")
    if full.rho != 1.0:
        if base is None:
            raise ValueError(f"full.rho={full.rho:g} anchors toward rho*W_m + (1-rho)*W_base: pass "
                             "base= (the pretrained params) to calibrate")
        from epmq_jax.merge._validate import flatten_inputs

        try:
            flatten_inputs(params, [base], ref_name="params", validate=True)
        except ValueError as e:
            raise ValueError(str(e).replace("experts[0]", "base")) from None
    if full.heads:
        _check_heads(readout_heads, head_readout_path(adapter, params)[1], n_tasks)


def head_readout_path(adapter, params: PyTree) -> tuple[str, int]:
    """``(kernel path, d_out)`` of the layer ``heads`` refits: the head pseudo block's last group,
    which must hold one kernel.

    Raises:
      ValueError: the adapter has no head pseudo block, or its last group is not one layer.
    """
    head = adapter.leaf_kinds()[1] if isinstance(adapter, FullAdapter) else None
    groups = adapter.linear_groups(head) if head is not None else ()
    if not groups or len(groups[-1]) != 1:
        raise ValueError(f"full.heads refits the head pseudo block's last layer: "
                         f"{type(adapter).__name__} has "
                         + ("no head pseudo block" if head is None else f"head groups {groups}")
                         + " (expected a last group of one kernel, e.g. (('visual_projection/kernel',),))")
    path = groups[-1][0]
    w = _leaf(params, path)
    if getattr(w, "ndim", 0) < 2:
        raise ValueError(f"full.heads: no kernel at '{path}' in params (got {getattr(w, 'shape', None)})")
    return path, int(w.shape[-1])


def _check_heads(heads, d_out: int, n_tasks: int | None) -> None:
    if heads is None:
        raise ValueError("full.heads needs readout_heads=: one linear head (d_out, n_classes) per task "
                         "(e.g. the tasks' classifier or zero-shot class embeddings)")
    heads = list(heads)
    if n_tasks is not None and len(heads) != n_tasks:
        raise ValueError(f"readout_heads has {len(heads)} heads for {n_tasks} tasks")
    for t, h in enumerate(heads):
        shape = tuple(getattr(h, "shape", ()))
        if len(shape) != 2 or shape[0] != d_out or shape[1] < 2:
            raise ValueError(f"readout_heads[{t}] has shape {shape}; expected ({d_out}, n_classes >= 2) "
                             f"(rows: the head layer's {d_out} outputs)")
        if not np.all(np.isfinite(np.asarray(h, np.float64))):
            raise ValueError(f"readout_heads[{t}] has NaN or inf entries")


def readout_metrics(heads: Sequence[Any]) -> list[jax.Array]:
    """Each head's output metric M_t = U_t (I − 11ᵀ/C_t) U_tᵀ, float32 ``(d_out, d_out)``: the
    squared distance it gives two outputs is the squared difference of their class logits
    after removing the shift common to all classes (which changes no prediction)."""
    out = []
    for h in heads:
        u = jnp.asarray(h, jnp.float32)
        uc = u - jnp.mean(u, axis=1, keepdims=True)      # U C (C symmetric and idempotent)
        out.append(jnp.matmul(uc, uc.T, precision=_HI))
    return out


@functools.partial(jax.jit, static_argnames=("maxiter",))
def metric_solve(hs: jax.Array, bs: jax.Array, ms: jax.Array, p_hat: jax.Array, mu, damp, *,
                 maxiter: int = 500):
    """P minimising Σ_t ‖(X_t P − Y_t) M_t^½‖² + μ‖X̄ (P − P̂)‖² + μδc‖P − P̂‖² (``heads``).

    Args:
      hs, bs: per task the ω_t-weighted moments H_t = ω_t X_tᵀX_t ``(T, d_in, d_in)`` and
        B_t = ω_t X_tᵀY_t ``(T, d_in, d_out)``.
      ms: per task the output metric M_t ``(T, d_out, d_out)`` (:func:`readout_metrics`).
      p_hat: P̂ ``(d_in, d_out)``, the solution without the metric (the start, and the anchor).
      mu: the anchor's weight μ; damp: δ (c = mean live diagonal of H̄ = Σ_t H_t).

    The normal equations Σ_t H_t P M_t + μ H̄_δ P = Σ_t B_t M_t + μ H̄_δ P̂ (H̄_δ = H̄ + δcI) are
    solved by conjugate gradients on the correction P − P̂, preconditioned by P ↦ H̄_δ⁻¹ P (M̄ + μI)⁻¹ with
    M̄ = Σ_t tr(H_t) M_t / tr(H̄) (exact when every H_t is proportional to H̄).

    Returns:
      ``(P, {"head_rel_resid": ‖residual‖/‖right side‖, "head_obj_drop": F(P̂) − F(P)})`` with F
      the minimised objective up to its constant.
    """
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    hs, bs, ms, p_hat = f32(hs), f32(bs), f32(ms), f32(p_hat)
    mm = functools.partial(jnp.matmul, precision=_HI)
    h_bar = jnp.sum(hs, 0)
    diag = jnp.diag(h_bar)
    live = diag != 0
    c = jnp.where(jnp.any(live), jnp.sum(jnp.where(live, diag, 0.0)) / jnp.maximum(jnp.sum(live), 1), 1.0)
    h_d = h_bar + damp * c * jnp.eye(h_bar.shape[0], dtype=jnp.float32)

    def op(p):
        return jnp.sum(mm(mm(hs, p), ms), 0) + mu * mm(h_d, p)

    rhs = jnp.sum(mm(bs, ms), 0) + mu * mm(h_d, p_hat)
    tr = jnp.trace(hs, axis1=1, axis2=2)
    m_bar = jnp.einsum("t,tij->ij", tr, ms, precision=_HI) / jnp.maximum(jnp.sum(tr), 1e-30)
    l_h = jnp.linalg.cholesky(h_d)
    l_m = jnp.linalg.cholesky(m_bar + mu * jnp.eye(m_bar.shape[0], dtype=jnp.float32))
    cho = jax.scipy.linalg.cho_solve
    precond = lambda r: cho((l_h, True), cho((l_m, True), r.T).T)  # noqa: E731
    # for the correction D = P − P̂ (from 0): the tolerance is relative to the correction's right
    # side, so directions the data hardly constrain (curvature ~ μδc) stay at P̂ instead of
    # carrying float32 noise of the size of the whole right side
    d, _ = jax.scipy.sparse.linalg.cg(op, rhs - op(p_hat), tol=1e-6, maxiter=maxiter, M=precond)
    p = p_hat + d
    value = lambda q: jnp.sum(q * op(q)) - 2.0 * jnp.sum(q * rhs)  # noqa: E731  (F up to a constant)
    resid = jnp.linalg.norm(op(p) - rhs) / jnp.maximum(jnp.linalg.norm(rhs), 1e-30)
    return p, {"head_rel_resid": resid, "head_obj_drop": value(p_hat) - value(p)}


def leaf_kinds(adapter, full: FullConfig | None) -> tuple[Hashable | None, Hashable | None]:
    """The adapter's ``(stem, head)`` pseudo-block kinds when ``leaves`` is on, else (None, None)."""
    if full is None or not full.leaves:
        return None, None
    return tuple(adapter.leaf_kinds())


def anchor_tree(merged: PyTree, base: PyTree | None, rho: float) -> PyTree:
    """ρ·merged + (1 − ρ)·base on the float leaves (in their dtype); ``merged`` itself for ρ = 1."""
    if rho == 1.0:
        return merged

    def mix(m, b):
        if not jnp.issubdtype(jnp.asarray(m).dtype, jnp.floating):
            return m
        return (rho * m.astype(jnp.float32) + (1.0 - rho) * b.astype(jnp.float32)).astype(m.dtype)

    return jax.tree.map(mix, merged, base)


# ----------------------------------------------------------------------------- leaves of a block


def _set(tree: PyTree, rel: str, value: Any) -> PyTree:
    return set_path(tree, key_path(rel), value)


def _leaf(tree: PyTree, rel: str) -> Any:
    try:
        return get_path(tree, key_path(rel))
    except (KeyError, IndexError, TypeError):
        return None


def _kernel2d(tree: PyTree, rel: str, where: str) -> jax.Array:
    """A kernel as ``(d_in, d_out)`` (a stem/head kernel of more dimensions flattened over the leading ones)."""
    w = _leaf(tree, rel)
    if getattr(w, "ndim", 0) < 2:
        raise ValueError(f"{where}: no kernel at '{rel}' (expected an array (d_in, d_out), got "
                         f"{getattr(w, 'shape', None)})")
    return w.reshape(-1, w.shape[-1])


def bias_path(rel: str) -> str:
    """``".../kernel"`` -> ``".../bias"``."""
    return rel[: -len("kernel")] + "bias" if rel.endswith("kernel") else rel + "/bias"


def _group_has_bias(block: PyTree, group: Sequence[str], where: str) -> bool:
    has = [_leaf(block, bias_path(p)) is not None for p in group]
    if any(has) and not all(has):
        raise ValueError(f"{where}: E-PMQ-full's bias solve needs every layer of group {tuple(group)} "
                         f"to have a bias or none to (biases: {dict(zip(group, has))})")
    return all(has)


# ----------------------------------------------------------------------------- statistics


def run_block(adapter, kind, block_params, carry):
    """The adapter's ``run_block_full`` (norm captures too), or its ``run_block`` when it has no
    E-PMQ-full extension (then only the bias and anchor pieces run)."""
    if isinstance(adapter, FullAdapter):
        return adapter.run_block_full(kind, block_params, carry)
    return adapter.run_block(kind, block_params, carry)


def _augment(x: jax.Array) -> jax.Array:
    """``x (..., d)`` -> ``[x, 1] (..., d + 1)`` in float32."""
    x = x.astype(jnp.float32)
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), jnp.float32)], axis=-1)


def _row_weights(adapter, kind, path, carry, cap, mask, weighted: bool, rest):
    """The capture's rows, their weights (padding x token weights) and the read rows' weight."""
    x, w = capture_rows(cap, mask)
    read = adapter.readout(kind, path, carry) if weighted else None
    if read is None:
        return x, w, jnp.sum(w)
    read = jnp.broadcast_to(read, w.shape).astype(jnp.float32)
    w = w * (rest + (1.0 - rest) * read)
    return x, w, jnp.sum(w * read)


def _scan_sum(batch, n_batches: int):
    """Σ over batches of ``batch(i)`` (a pytree of arrays), in one compiled loop."""
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch, 0))
    return jax.lax.fori_loop(0, n_batches, lambda i, a: jax.tree.map(jnp.add, a, batch(i)), zero)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6), donate_argnums=(15,))
def _group_moments(adapter, kind, group, objective, bias, weighted, residual, block_params, carry, mask,
                   x_expert, expert_kernels, expert_biases, r_expert, rest, total):
    """One task's moments of a group (inputs augmented with 1 when ``bias``), ω_t-added to ``total``.

    Targets are X̃_t W_t (+ b_t): ``expert_kernels`` ``{path: W_t (d_in, d_out)}``,
    ``expert_biases`` ``{path: b_t}`` or None; ``residual`` = ``((path, norm path), ...)`` adds
    r̃ − r to a layer's target (r: the norm's raw input on this path; ``r_expert[path]`` the
    expert path's). Returns ``(total, ω_t, read weight, row weight)``.
    """
    def batch(i):
        c = jax.tree.map(lambda a: a[i], carry)
        _, caps = run_block(adapter, kind, block_params, c)
        x, w, read = _row_weights(adapter, kind, group[0], c, caps[group[0]], mask[i], weighted, rest)
        xa = _augment(x) if bias else x
        m = st.moments(xa, None, w)
        out = {"h": m.h, "n": m.n, "read": read, "b": {}, "yy": {}}
        xt = target_input(x, None if x_expert is None else x_expert[i], objective).astype(jnp.float32)
        for p in group:
            y = jnp.matmul(xt, expert_kernels[p].astype(jnp.float32), precision=_HI)
            if bias:
                y = y + expert_biases[p].astype(jnp.float32)
            for path, norm in residual:
                if path == p:
                    r = caps[f"{norm}:input"]
                    r = (r[0] if isinstance(r, tuple) else r).astype(jnp.float32)
                    y = y + target_input(r, r_expert[p][i], objective).astype(jnp.float32) - r
            out["b"][p], out["yy"][p] = st.cross_moments(xa, y, w)
        return out

    acc = _scan_sum(batch, mask.shape[0])
    new, omega = {}, None
    for p in group:
        task = st.Moments(acc["h"], acc["b"][p], acc["yy"][p], acc["n"],
                          jnp.zeros(acc["h"].shape[0], jnp.float32))
        new[p], omega = st.fold_task(None if total is None else total[p], task, objective.task_weights)
    return new, omega, acc["read"], acc["n"]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(13,))
def _norm_moments(adapter, kind, path, objective, shift, weighted, block_params, carry, mask,
                  z_expert, gamma_t, beta_t, rest, total):
    """One task's per-channel sums of a norm fit, ω_t-added to ``total``.

    With ẑ the normalised input on the path being calibrated and y = γ_t ẑ̃ + β_t the expert's
    output (ẑ̃ the target-side normalised input), per channel: ``zz`` = Σw ẑ², ``z`` = Σw ẑ,
    ``one`` = Σw, ``zy`` = Σw ẑy, ``y`` = Σw y, ``yy`` = Σw y². ω_t follows the objective's
    ``task_weights`` on the Gram matrix of ẑ (``frobenius``), the row weight (``tokens``) or 1.
    Returns ``(total, ω_t, read weight, row weight)``.
    """
    def batch(i):
        c = jax.tree.map(lambda a: a[i], carry)
        _, caps = run_block(adapter, kind, block_params, c)
        z, w, read = _row_weights(adapter, kind, path, c, caps[path], mask[i], weighted, rest)
        zt = target_input(z, None if z_expert is None else z_expert[i], objective)
        z, w = st.flatten_rows(z, w)
        zt = zt.reshape(z.shape).astype(jnp.float32)
        y = zt * gamma_t.astype(jnp.float32)
        if shift:
            y = y + beta_t.astype(jnp.float32)
        wz = z * w[:, None]
        out = {"zz": jnp.sum(wz * z, 0), "z": jnp.sum(wz, 0), "one": jnp.sum(w) + jnp.zeros(z.shape[1]),
               "zy": jnp.sum(wz * y, 0), "y": jnp.sum(w[:, None] * y, 0),
               "yy": jnp.sum(w[:, None] * y * y, 0), "read": read, "n": jnp.sum(w)}
        if objective.task_weights == "frobenius":
            out["gram"] = jnp.matmul(wz.T, z, precision=_HI)
        return out

    acc = _scan_sum(batch, mask.shape[0])
    gram = acc.pop("gram", jnp.zeros((1, 1), jnp.float32))
    read, n = acc.pop("read"), acc.pop("n")
    omega = st.task_weight(st.Moments(gram, None, jnp.zeros(()), n, jnp.zeros(1)), objective.task_weights)
    scaled = {k: omega * v for k, v in acc.items()}
    new = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
    return new, omega, read, n


# ----------------------------------------------------------------------------- solves


@functools.partial(jax.jit, static_argnames=("spec", "rounding", "options", "dtype", "bias_dtype"))
def _round_affine(w_star, h_round, ridge_b, damp, *, spec, rounding: str, options: tuple,
                  dtype: str, bias_dtype: str):
    """Rounds the kernel rows of W̄* = [W*_K; b*] on the Schur complement and closes the bias.

    S = H_KK − h_Kb h_bKᵀ / (h_bb + r_b); Q = rounder(W*_K, S); b = b* + h_bK (W*_K − Q) / (h_bb + r_b)
    (r_b: the solve's damping on the bias row, so that Q = W*_K gives b = b*).
    """
    k, b_star = w_star[:-1], w_star[-1]
    h_kk, h_kb, h_bb = h_round[:-1, :-1], h_round[:-1, -1], h_round[-1, -1] + ridge_b
    s = h_kk - jnp.outer(h_kb, h_kb) / h_bb
    q, info = round_weight(k, s, spec, rounding, damp=damp, **dict(options))
    q = _in_dtype(q, dtype)
    eff = effective_kernel(q)
    b = b_star + jnp.matmul(h_kb, k - eff.astype(jnp.float32), precision=_HI) / h_bb
    return q, eff, b.astype(bias_dtype), info


@jax.jit
def _bias_ridge(h, damp_used):
    """The solve's damping on the bias row: δ·μ, μ the mean live diagonal of H (:mod:`.solve`)."""
    d = jnp.diag(h)
    live = d != 0
    mu = jnp.where(jnp.any(live), jnp.sum(jnp.where(live, d, 0.0)) / jnp.maximum(jnp.sum(live), 1), 1.0)
    return damp_used * mu


def affine_layer_step(objective: Objective, m: st.Moments, w_anchor: jax.Array, b_anchor: jax.Array,
                      spec, *, rounding: str = "gptq", damp: float = 0.01, damp_center: str = "merged",
                      gptq_damp: float | None = None, **options: Any):
    """E-PMQ's objective → solve → rounding for a layer with a bias, on augmented moments.

    Args:
      objective: the layer objective (λ, anchor form).
      m: ω-weighted moments of the augmented inputs: ``h (d_in+1, d_in+1)``, ``b (d_in+1, d_out)``.
      w_anchor: the anchor's kernel ``(d_in, d_out)`` (W_m, or the extrapolated anchor); its
        dtype is the rounded kernel's.
      b_anchor: the anchor's bias ``(d_out,)``; its dtype is the bias's.
      spec, rounding, damp, damp_center, gptq_damp, options: as :func:`epmq_jax.calib.solve.layer_step`.

    Returns:
      ``(q, effective kernel, bias, {name: device scalar})``: the statistics of
      :func:`~epmq_jax.calib.solve.layer_step`, with objective values of the augmented objective
      (``obj_rounded`` = L(Q, b)).
    """
    w_bar = jnp.concatenate([w_anchor.astype(jnp.float32), b_anchor.astype(jnp.float32)[None]], 0)
    w_star, h, h_round, resid, obj_m, obj_r, _, info = _relax(
        jnp.float32(objective.lam), m, w_bar, jnp.float32(damp),
        objective=dataclasses.replace(objective, lam=0.0), damp_center=damp_center, columns=None)
    ridge_b = _bias_ridge(h, info["damp"])
    q, eff, bias, rinfo = _round_affine(
        w_star, h_round, ridge_b, jnp.float32(damp if gptq_damp is None else gptq_damp), spec=spec,
        rounding=rounding, options=tuple(sorted(options.items())),
        dtype=np.dtype(w_anchor.dtype).name, bias_dtype=np.dtype(b_anchor.dtype).name)
    eff_bar = jnp.concatenate([eff.astype(jnp.float32), bias.astype(jnp.float32)[None]], 0)
    stats = {**_report(h, w_bar, w_star, eff_bar, resid, obj_r), "obj_merged": obj_m,
             "obj_relaxed": obj_r, **info, **rinfo}
    return q, eff, bias, stats


@functools.partial(jax.jit, static_argnames=("anchor", "shift", "damp_center"))
def _norm_solve(lam, mom, gamma_a, beta_a, damp, *, anchor: str, shift: bool, damp_center: str):
    """Per channel: θ = (γ, β) minimising Σ_t ω_t‖γẑ + β − y_t‖² + λ R(θ), damped (see :func:`norm_step`)."""
    ga = gamma_a.astype(jnp.float32)
    ba = beta_a.astype(jnp.float32) if shift else jnp.zeros_like(ga)
    a00, a01, a11 = mom["zz"], mom["z"], mom["one"]
    b0, b1, c = mom["zy"], mom["y"], mom["yy"]
    if not shift:
        a01, a11, b1 = jnp.zeros_like(a00), jnp.ones_like(a00), jnp.zeros_like(a00)
    quad = lambda g, b, h00, h01, h11: h00 * g * g + 2 * h01 * g * b + h11 * b * b
    if anchor == "weight":
        cw = jnp.mean(a00 + (a11 if shift else 0.0)) / (2.0 if shift else 1.0)
        h00, h01, h11 = a00 + lam * cw, a01, a11 + (lam * cw if shift else 0.0)
        b0, b1 = b0 + lam * cw * ga, b1 + (lam * cw * ba if shift else 0.0)
        c = c + lam * cw * (ga * ga + ba * ba)
    else:
        h00, h01, h11 = (1 + lam) * a00, (1 + lam) * a01, (1 + lam) * a11 if shift else a11
        ag = a00 * ga + a01 * ba
        b0, b1 = b0 + lam * ag, b1 + (lam * (a01 * ga + a11 * ba) if shift else 0.0)
        c = c + lam * quad(ga, ba, a00, a01, a11 if shift else 0.0)
    value = lambda g, b: jnp.sum(quad(g, b, h00, h01, h11 if shift else 0.0) - 2 * (g * b0 + b * b1) + c)
    # as the kernels' solve: μ = the channel's mean live diagonal; a dead scale (ẑ = 0 on every
    # row) gets H00 = μ, B0 = μγ_a (it keeps γ_a) and no ridge; the live entries get δμ
    dead = h00 == 0
    n_live = (1.0 - dead) + (1.0 if shift else 0.0)
    mu = jnp.where(n_live > 0, (jnp.where(dead, 0.0, h00) + (h11 if shift else 0.0)) / jnp.maximum(n_live, 1.0), 1.0)
    g00, r0 = jnp.where(dead, mu, h00), jnp.where(dead, mu * ga, b0)
    g01 = jnp.where(dead, 0.0, h01)
    reg = damp * mu
    center = damp_center == "merged"
    g00 = g00 + jnp.where(dead, 0.0, reg)
    r0 = r0 + jnp.where(dead, 0.0, reg * ga if center else 0.0)
    if shift:
        g11, r1 = h11 + reg, b1 + (reg * ba if center else 0.0)
        det = g00 * g11 - g01 * g01
        gamma = (r0 * g11 - r1 * g01) / det
        beta = (r1 * g00 - r0 * g01) / det
    else:
        det = g00
        gamma, beta = r0 / g00, jnp.zeros_like(ga)
    ok = jnp.all(det > 0) & jnp.all(jnp.isfinite(gamma)) & jnp.all(jnp.isfinite(beta))
    theta_a = jnp.concatenate([ga, ba])
    dist = jnp.linalg.norm(jnp.concatenate([gamma, beta]) - theta_a) / jnp.maximum(jnp.linalg.norm(theta_a), 1e-30)
    return gamma, beta, {"obj_merged": value(ga, ba), "obj_relaxed": value(gamma, beta), "rel_dist": dist,
                         "ok": ok, "n_dead": jnp.sum(dead).astype(jnp.int32)}


def norm_step(objective: Objective, mom: dict, gamma_a: jax.Array, beta_a: jax.Array | None, *,
              damp: float = 0.01, damp_center: str = "merged"):
    """Fits one norm layer's per-channel scale γ (and shift β) to the experts' normalised outputs.

    Per channel, with A = Σ_t ω_t Σ_i w_i [ẑ_i² ẑ_i; ẑ_i 1] and r = Σ_t ω_t Σ_i w_i y_ti [ẑ_i; 1]
    (``mom`` from the driver's norm statistics), the objective is the layer objective's with
    θ = (γ, β) for the kernel: ``output`` anchor H = (1+λ)A, B = r + λAθ_a; ``weight`` anchor
    H = A + λcI, B = r + λcθ_a (c = mean diagonal of A over channels). The solve adds δμ_c to
    the diagonal (μ_c the channel's mean live diagonal of H) and, with centre ``merged``, δμ_cθ_a
    to B, as the kernels' solve does; a dead channel (ẑ = 0 on every row) keeps γ_a (its shift is
    still fitted). Without a shift (RMSNorm) the system is 1x1 in γ.

    Args:
      objective: λ and the anchor form.
      mom: per-channel sums ``zz, z, one, zy, y, yy`` (each ``(d,)``).
      gamma_a, beta_a: the anchor's scale and shift ``(d,)`` (β None: no shift).
      damp, damp_center: as the kernels' solve.

    Returns:
      ``(γ, β or None, {name: device scalar})`` in the anchor's dtypes; the statistics hold
      ``obj_merged`` = L(θ_a), ``obj_relaxed`` = L(θ) of the undamped objective, ``rel_dist``,
      ``ok`` and ``n_dead``.
    """
    lam = objective.lam if objective.kind == "epmq" else 0.0
    gamma, beta, info = _norm_solve(jnp.float32(lam), mom, gamma_a,
                                    gamma_a if beta_a is None else beta_a, jnp.float32(damp),
                                    anchor=objective.anchor, shift=beta_a is not None,
                                    damp_center=damp_center)
    return (gamma.astype(gamma_a.dtype), None if beta_a is None else beta.astype(beta_a.dtype), info)


# ----------------------------------------------------------------------------- one block


def calibrate_block(adapter, kind, block, anchor_block, expert_blocks, q_carry, x_expert, masks,
                    config, where: str, *, weighted: bool, float_only: bool = False, readout=None):
    """E-PMQ-full on one block (or a stem/head pseudo block): norms and groups in execution order.

    Args:
      adapter: the model's adapter (a :class:`~epmq_jax.calib.adapter.FullAdapter` when norms,
        token weights or leaves are on).
      kind: the block's kind (or the pseudo kind).
      block: the block's params as they stand (float).
      anchor_block: the anchor W_a of every leaf (the merged block, or ρ-extrapolated).
      expert_blocks: per task the expert's block, or None (no targets).
      q_carry: per task the stacked carries on the path being calibrated.
      x_expert: per task ``{capture path: target-side input (n_batches, ...)}`` (empty dicts
        when the objective has no expert-side inputs).
      masks: per task ``(n_batches, batch_size)``.
      config: the driver's :class:`~epmq_jax.calib.CalibConfig` (with ``full``).
      where: the block's path, for messages.
      weighted: whether token weights apply in this block.
      float_only: keep the solves in float (the stem and head).
      readout: per task the output metric M_t of the last group's layer (``heads``, the head
        pseudo block; :func:`readout_metrics`), or None.

    Returns:
      ``(block with every calibrated leaf written (effective kernels), pending entries)``: pass
      the entries to :func:`finish_block`.
    """
    full = config.full
    groups = adapter.linear_groups(kind)
    norms = adapter.full_norms(kind) if full.norms else ()
    pending = []
    for gi in range(len(groups) + 1):
        for norm in norms:
            if norm.before == gi:
                block, entry = _calibrate_norm(adapter, kind, norm, block, anchor_block, expert_blocks,
                                               q_carry, x_expert, masks, config, where, weighted)
                pending.append({**entry, "group": gi})
        if gi < len(groups):
            block, entries = _calibrate_group(adapter, kind, groups[gi], block, anchor_block,
                                              expert_blocks, q_carry, x_expert, masks, config, where,
                                              weighted, float_only,
                                              readout if gi == len(groups) - 1 else None)
            pending += [{**e, "group": gi} for e in entries]
    return block, pending


def _calibrate_norm(adapter, kind, norm: NormSpec, block, anchor_block, expert_blocks, q_carry,
                    x_expert, masks, config, where, weighted):
    obj, full = config.objective, config.full
    gamma_a = _leaf(anchor_block, f"{norm.path}/scale")
    if gamma_a is None:
        raise ValueError(f"{where}: norm '{norm.path}' has no 'scale' leaf")
    beta_a = _leaf(anchor_block, f"{norm.path}/bias")
    static_obj = dataclasses.replace(obj, lam=0.0, anchor="output")
    total, omegas, read, rows = None, [], 0.0, 0.0
    for t in range(len(q_carry)):
        eb = expert_blocks[t]
        g_t, b_t = _leaf(eb, f"{norm.path}/scale"), _leaf(eb, f"{norm.path}/bias")
        total, om, rd, n = _norm_moments(adapter, kind, norm.path, static_obj, beta_a is not None, weighted,
                                         block, q_carry[t], masks[t], x_expert[t].get(norm.path), g_t,
                                         g_t if b_t is None else b_t, jnp.float32(full.token_rest), total)
        omegas.append(om)
        read, rows = read + rd, rows + n
    gamma, beta, raw = norm_step(obj, total, gamma_a, beta_a, damp=config.damp, damp_center=config.damp_center)
    block = _set(block, f"{norm.path}/scale", gamma)
    if beta is not None:
        block = _set(block, f"{norm.path}/bias", beta)
    return block, {"kind": "norm", "rel": norm.path, "gamma": gamma, "beta": beta, "raw": raw,
                   "n": rows, "read": read, "omegas": omegas}


def _calibrate_group(adapter, kind, group, block, anchor_block, expert_blocks, q_carry, x_expert,
                     masks, config, where, weighted, float_only, readout=None):
    obj, full = config.objective, config.full
    static_obj = dataclasses.replace(obj, lam=0.0, anchor="output")
    for p in group:
        _kernel2d(block, p, where)
    bias = full.bias and _group_has_bias(block, group, where)
    residual = residual_pairs(adapter, kind, full, group)
    total, omegas, read, rows = None, [], 0.0, 0.0
    per_task = []     # ω_t-weighted moments of each task (the readout refit needs them apart)
    for t in range(len(q_carry)):
        eb = expert_blocks[t]
        e_kern = {p: _kernel2d(eb, p, f"experts[{t}]/{where}") for p in group}
        e_bias = {p: _leaf(eb, bias_path(p)) for p in group} if bias else None
        r_exp = {p: x_expert[t].get(f"{n}:input") for p, n in residual} if residual else None
        own, om, rd, n = _group_moments(adapter, kind, tuple(group), static_obj, bias, weighted, residual,
                                        block, q_carry[t], masks[t], x_expert[t].get(group[0]), e_kern,
                                        e_bias, r_exp, jnp.float32(full.token_rest),
                                        None if readout is not None else total)
        if readout is not None:
            per_task.append(own)
            own = own if total is None else {p: st.add(total[p], own[p]) for p in group}
        total = own
        omegas.append(om)
        read, rows = read + rd, rows + n
    rounding = "none" if float_only else config.rounder
    options = config.rounder_options() if rounding == "gptq" else {}
    entries = []
    for rel in group:
        shape = _leaf(block, rel).shape
        w_a = _kernel2d(anchor_block, rel, where)
        kw = dict(rounding=rounding, damp=config.damp, damp_center=config.damp_center,
                  gptq_damp=config.gptq_damp, **options)
        if bias:
            q, eff, b, raw = affine_layer_step(obj, total[rel], w_a, _leaf(anchor_block, bias_path(rel)),
                                               config.spec, **kw)
            block = _set(block, bias_path(rel), b)
        else:
            q, eff, raw = layer_step(obj, total[rel], w_a, config.spec, **kw)
            b = None
        if readout is not None:     # heads: refit in the tasks' readout metrics (float)
            p_hat = eff if b is None else jnp.concatenate([eff, b[None].astype(eff.dtype)], 0)
            p, info = metric_solve(jnp.stack([m[rel].h for m in per_task]),
                                   jnp.stack([m[rel].b for m in per_task]), jnp.stack(readout),
                                   p_hat, jnp.float32(full.head_lam), jnp.float32(config.damp))
            raw = {**raw, **info}
            if b is None:
                eff = p.astype(eff.dtype)
            else:
                eff, b = p[:-1].astype(eff.dtype), p[-1].astype(b.dtype)
                block = _set(block, bias_path(rel), b)
            q = eff
        if float_only:
            q = eff = eff.reshape(shape)
        block = _set(block, rel, eff)
        entries.append({"kind": "linear", "rel": rel, "q": q, "bias": b, "raw": raw, "rounding": rounding,
                        "shape": (w_a.shape[0] + int(bias),) * 2, "n": rows, "read": read, "omegas": omegas})
    return block, entries


def residual_pairs(adapter, kind, full: FullConfig, group: Sequence[str] | None = None
                   ) -> tuple[tuple[str, str], ...]:
    """``((kernel path, norm path), ...)`` of the residual writers (of ``group``, or of the block)
    when ``residual`` is on, else ``()``."""
    if not full.residual:
        return ()
    pairs = adapter.residuals(kind)
    return tuple((p, n) for p, n in pairs.items() if group is None or p in group)


def finish_block(pending: list[dict], block_id, config, bpath: Sequence, kernels: dict,
                 weighted: bool) -> list[dict]:
    """Host side of a block (one round trip): checks the flags, records every calibrated leaf in
    ``kernels`` (full path -> value) and returns the JSON-able statistics.

    Each entry gets the driver's fields plus ``kind`` (``linear`` / ``norm``), ``bias`` (solved
    with a bias), ``token_rest`` (the unread rows' weight used, 1 where none) and ``read_share``
    (the share of the statistics' row weight on read rows).

    Raises:
      ValueError: a solve whose H is not positive definite (kernels) or a singular norm fit.
    """

    prefix = "/".join(str(p) for p in bpath)
    full_path = lambda rel: f"{prefix}/{rel}" if prefix else rel
    raw = jax.device_get([(e["raw"], e["n"], e["read"], e["omegas"]) for e in pending])
    out = []
    rest = config.full.token_rest if weighted else 1.0
    for e, (r, n, read, om) in zip(pending, raw):
        path = full_path(e["rel"])
        if e["kind"] == "norm":
            if not bool(r["ok"]):
                raise ValueError(f"{path}: the norm fit's 2x2 systems are singular even with damping "
                                 f"{config.damp:g} (non-finite statistics?)")
            s = {"path": path, "kind": "norm", "rounding": "none",
                 **{k: (int(v) if k == "n_dead" else stat_float(v)) for k, v in r.items() if k != "ok"}}
            kernels[f"{path}/scale"] = e["gamma"]
            if e["beta"] is not None:
                kernels[f"{path}/bias"] = e["beta"]
        else:
            s = finish_stats(r, path=path, shape=e["shape"], objective=config.objective,
                             rounding=e["rounding"], damp=config.damp, damp_center=config.damp_center,
                             gptq_damp=config.gptq_damp)
            s.update(kind="linear", bias=e["bias"] is not None)
            kernels[path] = e["q"]
            if e["bias"] is not None:
                kernels[full_path(bias_path(e["rel"]))] = e["bias"]
        s.update(block=block_id, group=e["group"], n_rows=stat_float(n), task_weights=[stat_float(o) for o in om],
                 token_rest=rest, read_share=stat_float(read / n) if n > 0 else None)
        out.append(s)
    return out


def replay(block: PyTree, bpath: Sequence, kernels: dict) -> PyTree:
    """A finished block as calibrated (resume): every recorded leaf under ``bpath`` written in
    (kernels as their effective float kernel)."""
    prefix = "/".join(str(p) for p in bpath) + "/"
    for path, v in kernels.items():
        if path.startswith(prefix):
            block = _set(block, path[len(prefix):], effective_kernel(v))
    return block

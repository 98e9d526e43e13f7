"""The runner's stages as plain functions: merge, choose coefficients on validation, calibrate.

Each takes the pools (:mod:`epmq_jax.pipeline.pools`) and the config and returns params or
numbers; none of them knows the model family.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from epmq_jax.pipeline.pools import Context, Log, ModelPool, Params, TaskPool, say, scores
from epmq_jax.pipeline.variants import FULL_METHODS, Variant

# ----------------------------------------------------------------------------- helpers


def dequantize_tree(params: Any) -> Any:
    """Replaces every ``QuantizedWeight`` leaf by its effective float kernel ``(d_in, d_out)``."""
    from epmq_jax.quant import is_quantized

    return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized)


def make_mesh(spec: str) -> tuple[Any, str | None]:
    """The mesh of ``run.mesh``: ``""`` -> no mesh; ``"auto"`` -> all devices on axis ``data``;
    ``"NAME:SIZE"`` -> the first SIZE devices on axis NAME.

    Raises:
      ValueError: a malformed spec, or more devices than there are.
    """
    spec = (spec or "").strip()
    if not spec:
        return None, None
    if spec == "auto":
        name, size = "data", jax.device_count()
    else:
        name, sep, size_s = spec.partition(":")
        if not sep or not name or not size_s.isdigit() or int(size_s) < 1:
            raise ValueError(f"run.mesh={spec!r}: expected '', 'auto' or 'NAME:SIZE' (e.g. 'data:8')")
        size = int(size_s)
        if size > jax.device_count():
            raise ValueError(f"run.mesh={spec!r} asks for {size} devices; {jax.device_count()} are visible")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:size]), (name,),
                             axis_types=(jax.sharding.AxisType.Auto,))
    return mesh, name


def score(task_pool: TaskPool, ctx: Context, params: Params | Sequence[Params], split: str,
          ) -> dict[str, dict[str, float]]:
    """The task pool's evaluation of float-ized ``params`` (timed under ``evaluate_<split>``)."""
    trees = [dequantize_tree(p) for p in params] if isinstance(params, list | tuple) else dequantize_tree(params)
    with ctx.timed(f"evaluate_{split}"):
        return task_pool.evaluate(trees, split)


# ----------------------------------------------------------------------------- merging


def merge_trees(mcfg: ml_collections.ConfigDict, base: Params, experts: Sequence[Params], method: str,
                scaling: float) -> Params:
    """Merges ``experts`` into ``base`` with ``method`` (``ta`` / ``ties``) at coefficient ``scaling``.

    Args:
      mcfg: the config's ``merge`` section (``filter``, ``ties_density``, ``ties_trim``).
      base, experts: parameter trees of equal structure.
      method: ``"ta"`` (Task Arithmetic) or ``"ties"`` (TIES-Merging).
      scaling: the merge coefficient.

    Raises:
      ValueError: an unknown method.
    """
    from epmq_jax import merge

    filt = mcfg.get("filter") or None
    if method == "ta":
        return merge.task_arithmetic(base, list(experts), scaling=scaling, filter=filt)
    if method == "ties":
        return merge.ties_merging(base, list(experts), scaling=scaling, density=float(mcfg.ties_density),
                                  trim=mcfg.ties_trim, filter=filt)
    raise ValueError(f"merge.methods: {method!r} is not a coefficient merge; expected 'ta' or 'ties'")


def select_best(candidates: Sequence[float], evaluate: Callable[[float], Mapping[str, float]],
                what: str, *, log: Log = say) -> tuple[float, dict[float, float]]:
    """The candidate with the best average validation score (ties go to the smaller value).

    Args:
      candidates: the values to try.
      evaluate: ``value -> {task: validation score}``.
      what: a name for the log line (``"ta merge coefficient"``).

    Returns:
      ``(best, {candidate: validation average})``.
    """
    results = {float(c): float(np.mean(list(evaluate(float(c)).values()))) for c in candidates}
    best = max(results, key=lambda c: (results[c], -c))
    log(f"[epmq] {what} {best:g} chosen on validation "
        f"({', '.join(f'{c:g}: {v:.1f}' for c, v in results.items())})")
    return best, results


def select_scaling(mcfg: ml_collections.ConfigDict, method: str, evaluate: Callable[[float], Mapping[str, float]],
                   *, log: Log = say) -> tuple[float, dict[float, float]]:
    """``merge.scaling`` if set, else the best of ``merge.scalings`` on validation (:func:`select_best`)."""
    fixed = mcfg.get("scaling")
    if fixed is not None:
        return float(fixed), {}
    return select_best(mcfg.scalings, evaluate, f"{method}: merge coefficient", log=log)


def _needs_selection(ctx: Context, task_pool: TaskPool, fixed: Any, key: str) -> None:
    if fixed is None and task_pool.select_split is None:
        raise ValueError(f"{key} is None, but task pool '{task_pool.kind}' has no split to choose it on "
                         f"(its reported split is {task_pool.report_split!r}); set {key}")


@dataclasses.dataclass
class Merge:
    """A merged model and how it was made.

    Attributes:
      params: the merged param tree.
      scaling: the merge coefficient (TA / TIES), else None.
      settings: what else defines it (RegMean's α, Gram source, ...), recorded in every row.
      validation: ``{candidate: validation average}`` of the selection, if one was made.
    """

    params: Params
    scaling: float | None
    settings: dict[str, Any]
    validation: dict[float, float]


def merge_method(ctx: Context, model_pool: ModelPool, task_pool: TaskPool, method: str,
                 calib_inputs: Callable[[], list[Any]]) -> Merge:
    """Merges the pool's experts with ``method``, choosing its coefficient on validation.

    ``ta`` / ``ties``: ``merge.scaling`` or the best of ``merge.scalings``; ``regmean``:
    ``merge.regmean_alpha`` or the best of ``merge.regmean_alphas`` (expert-own Gram matrices
    from ``calib_inputs()``, :func:`epmq_jax.calib.regmean_merge`).
    """
    cfg = ctx.cfg
    mcfg = cfg.merge
    base, experts = ctx.replicate(model_pool.base()), ctx.replicate(model_pool.experts())

    def val(params: Params) -> dict[str, float]:
        return scores(score(task_pool, ctx, params, task_pool.select_split))

    if method == "regmean":
        from epmq_jax import calib

        fixed = mcfg.get("regmean_alpha")
        _needs_selection(ctx, task_pool, fixed, "merge.regmean_alpha")
        alphas = [float(fixed)] if fixed is not None else [float(a) for a in mcfg.regmean_alphas]
        with ctx.timed("merge"):
            merges, stats = calib.regmean_merge(
                model_pool.adapter(), base, experts, calib_inputs(), alphas,
                filter=mcfg.get("filter") or None, damp=float(mcfg.get("regmean_damp", 0.0)),
                batch_size=int(cfg.calib.batch_size), mesh=ctx.mesh, axis=ctx.axis, progress=ctx.progress)
        if fixed is None:
            alpha, results = select_best(alphas, lambda a: val(merges[a]), "regmean: alpha", log=ctx.log)
        else:
            alpha, results = float(fixed), {}
        damps = [s["damp"] for s in stats if s["alpha"] == alpha]
        settings = {"gram_source": "expert", "alpha": alpha, "gram_sum": "plain",
                    "nonlinear": "average", "n_per_task": int(cfg.calib.n_per_task),
                    "damp_max": max(damps) if damps else 0.0}
        return Merge(merges[alpha], None, settings, results)
    fixed = mcfg.get("scaling")
    _needs_selection(ctx, task_pool, fixed, "merge.scaling")

    def merged(s: float) -> Params:
        with ctx.timed("merge"):
            return merge_trees(mcfg, base, experts, method, s)

    scaling, results = select_scaling(mcfg, method, lambda s: val(merged(s)), log=ctx.log)
    settings = {"ties_density": float(mcfg.ties_density), "ties_trim": mcfg.ties_trim} if method == "ties" else {}
    return Merge(merged(scaling), scaling, settings, results)


# ----------------------------------------------------------------------------- calibration


def quant_spec(cfg: ml_collections.ConfigDict, bits: int):
    """The :class:`epmq_jax.quant.QuantSpec` of ``bits`` with the config's group size and symmetry."""
    from epmq_jax.quant import QuantSpec

    return QuantSpec(bits=int(bits), group_size=int(cfg.quant.group_size), symmetric=bool(cfg.quant.symmetric))


def calib_config(cfg: ml_collections.ConfigDict, v: Variant, full: FullChoice | None = None
                 ) -> tuple[Any, bool]:
    """The driver config (:class:`epmq_jax.calib.CalibConfig`) of a variant and whether it needs the experts.

    - ``rtn`` / ``gptq``: the ``gptq`` objective (targets from the merged layer, W* = W_m),
      rounded by RTN or GPTQ;
    - ``awq``: the ``gptq`` objective with AWQ rounding (llm-awq: :mod:`epmq_jax.calib.awq`);
    - ``epmq`` / ``epmq_unrounded``: the E-PMQ objective with the variant's switches, rounded by
      its ``rounding`` (``none`` keeps W*);
    - ``epmq_full`` / ``epmq_full_unrounded``: the same objective (λ from the variant's switches,
      the chosen one) with ``full``'s E-PMQ-full switches for the variant's piece
      (:func:`epmq_jax.calib.full.piece_config`) and its solve damping; GPTQ's damping stays
      ``quant.damp``.

    Returns:
      ``(config, needs_experts)``: ``needs_experts`` is False only for the ``gptq`` objective.
    """
    from epmq_jax import calib
    from epmq_jax.calib.full import piece_config

    ccfg = cfg.calib
    bits = v.bits if v.bits is not None else int(cfg.quant.bits[0])  # spec unused when unrounded
    extra: dict[str, Any] = {}
    if v.method in FULL_METHODS:
        if full is None:
            raise ValueError(f"variant {v.name}: E-PMQ-full needs its chosen settings (stages.select_full)")
        extra = {"full": piece_config(v.piece, full.full), "damp": full.damp,
                 "gptq_damp": float(cfg.quant.damp)}
    if v.method in ("rtn", "gptq", "awq"):
        objective, rounding = calib.Objective(kind="gptq"), v.method
    elif v.method in ("epmq", "epmq_unrounded", *FULL_METHODS):
        sw = v.sw
        objective = calib.Objective(kind="epmq", lam=sw["lam"], anchor=sw["anchor"], target=sw["target"],
                                    alpha=sw["alpha"] if sw["alpha"] is not None else float(ccfg.alpha),
                                    task_weights=sw["task_weights"])
        rounding = sw["rounding"]
    else:
        raise ValueError(f"variant {v.name}: method {v.method!r} is not calibrated")
    config = calib.CalibConfig(**{"objective": objective, "rounding": rounding, "spec": quant_spec(cfg, bits),
                                  "damp": float(cfg.quant.damp), "damp_center": ccfg.get("damp_center", "merged"),
                                  "batch_size": int(ccfg.batch_size), **extra})
    return config, objective.kind != "gptq"


def damping_settings(config: Any) -> dict[str, Any]:
    """What a row records of the damping: the solve's size and centre (E-PMQ) and GPTQ's size."""
    solved = config.objective.kind != "gptq"
    return {"damp": config.damp if solved else None,
            "damp_center": config.damp_center if solved else None,
            "gptq_damp": (config.damp if config.gptq_damp is None else config.gptq_damp)
            if config.rounder == "gptq" else None}


def calibrate_variant(ctx: Context, model_pool: ModelPool, v: Variant, start: Params,
                      calib_inputs: list[Any], resume_dir: str | None = None,
                      full: FullChoice | None = None, timer: str = "calibrate",
                      task_pool: TaskPool | None = None) -> tuple[Params, list[dict], dict[str, Any]]:
    """Runs the sequential driver for one variant (:func:`calib_config`) from the float model ``start``.

    With ``resume_dir`` the driver checkpoints every block there and resumes from it. E-PMQ-full
    variants need ``full`` (:func:`select_full`); the base model is passed for its anchor, and
    for the ``heads`` piece ``task_pool``'s readout heads (:func:`readout_heads`).

    Returns:
      ``(params, stats, settings)``: ``start`` with every calibrated kernel replaced
      (``QuantizedWeight``, or float for unrounded variants), the per-layer solver statistics and
      the settings the row records: the damping (:func:`damping_settings`) and, for E-PMQ-full,
      its switches and piece.
    """
    from epmq_jax import calib

    config, needs_experts = calib_config(ctx.cfg, v, full)
    base = heads = None
    if config.full is not None and config.full.rho != 1.0:
        base = ctx.replicate(model_pool.base())
    if config.full is not None and config.full.heads:
        heads = readout_heads(task_pool)
    with ctx.timed(timer):
        result = calib.calibrate(model_pool.adapter(), ctx.replicate(start), calib_inputs, config,
                                 experts=ctx.replicate(model_pool.experts()) if needs_experts else None,
                                 mesh=ctx.mesh, axis=ctx.axis,
                                 checkpoint_dir=resume_dir,
                                 progress=ctx.progress, base=base, readout_heads=heads)
    settings = damping_settings(config)
    if config.full is not None:
        settings.update(config.full.settings(), full_piece=v.piece)
    return result.params, result.stats, settings


def readout_heads(task_pool: TaskPool | None) -> list[np.ndarray]:
    """The task pool's per-task linear heads ``(d_out, n_classes)`` (E-PMQ-full's ``heads``):
    its optional ``readout_heads()`` method.

    Raises:
      ValueError: the pool has none (e.g. generative tasks read through the shared LM head).
    """
    get = getattr(task_pool, "readout_heads", None)
    heads = get() if get is not None else None
    if heads is None:
        raise ValueError(f"calib.full.settings.heads: task pool {getattr(task_pool, 'kind', None)!r} has no "
                         "per-task linear heads to read the model's output; set heads=False")
    return heads


# ----------------------------------------------------------------------------- E-PMQ-full's settings


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """One run of the driver: its config (:func:`calib_config`) and :func:`calibrate_variant`'s result."""

    config: Any
    params: Params
    stats: list[dict]
    settings: dict[str, Any]


#: Keys of ``calib.full.settings`` / ``calib.full.grid``: the FullConfig switches, λ and the solve's damping.
FULL_KEYS = ("bias", "norms", "token_reach", "token_rest", "rho", "leaves", "residual", "heads", "head_lam",
             "lam", "damp")


@dataclasses.dataclass(frozen=True)
class FullChoice:
    """E-PMQ-full's settings for one merge, chosen on validation.

    Attributes:
      full: the :class:`~epmq_jax.calib.full.FullConfig` of the default row (every piece).
      lam: the anchor strength λ.
      damp: the solve's damping δ.
      validation: ``{candidate label: validation average}`` of the selection (empty when fixed).
      calibrated: the selection's calibration of the chosen setting, which the row with the same
        driver config reuses (:meth:`reusable`); None when no selection ran.
    """

    full: Any
    lam: float
    damp: float
    validation: dict[str, float]
    calibrated: Calibrated | None = dataclasses.field(default=None, compare=False, repr=False)

    def reusable(self, config: Any) -> Calibrated | None:
        """The selection's calibration if it ran with exactly the driver config ``config``, else None."""
        return self.calibrated if self.calibrated is not None and self.calibrated.config == config else None

    def settings(self) -> dict[str, Any]:
        """What the selection chose (JSON-able)."""
        return {**self.full.settings(), "lam": self.lam, "damp": self.damp}


def full_candidates(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Every setting of the grid: ``calib.full.settings`` (λ and δ default to ``calib.lam`` and
    ``quant.damp``) with each combination of ``calib.full.grid`` applied, in grid order."""
    fcfg = cfg.calib.full
    fixed = dict(fcfg.settings)
    fixed.setdefault("lam", float(cfg.calib.lam))
    fixed.setdefault("damp", float(cfg.quant.damp))
    grid = dict(fcfg.get("grid") or {})
    keys = list(grid)
    return [{**fixed, **dict(zip(keys, values))} for values in itertools.product(*(grid[k] for k in keys))]


#: The FullConfig fields given as numbers that the config may write as ints.
FULL_FLOAT_KEYS = ("rho", "token_rest", "head_lam")


def _full_choice(setting: Mapping[str, Any], validation: dict[str, float]) -> FullChoice:
    from epmq_jax.calib.full import FullConfig

    s = dict(setting)
    lam, damp = float(s.pop("lam")), float(s.pop("damp"))
    s = {k: (float(v) if k in FULL_FLOAT_KEYS else v) for k, v in s.items()}
    return FullChoice(FullConfig(**s), lam, damp, validation)


def _label(setting: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ",".join(f"{k}={setting[k]:g}" if isinstance(setting[k], float) else f"{k}={setting[k]}"
                    for k in keys) or "fixed"


def select_full(ctx: Context, model_pool: ModelPool, task_pool: TaskPool, merge: str, start: Params,
                calib_inputs: list[Any]) -> FullChoice:
    """E-PMQ-full's settings for ``merge``: the best of :func:`full_candidates` on the selection split.

    Each candidate (every piece per ``calib.full.settings``, the grid's values applied) is
    calibrated at ``calib.full.select_bits`` bits from the merge ``start`` and scored on
    ``task_pool.select_split``; the best average wins (ties: the earlier candidate). A grid of one
    candidate is taken as it is, without scoring. The chosen candidate's calibration is kept in
    :attr:`FullChoice.calibrated`: its row (``epmq_full`` at ``select_bits``, every piece) runs
    the driver with the same config on the same merge and inputs, so the runner reuses it.

    Raises:
      ValueError: the grid has several candidates but the task pool no selection split.
    """
    cfg = ctx.cfg
    fcfg = cfg.calib.full
    candidates = full_candidates(cfg)
    keys = list(fcfg.get("grid") or {})
    if len(candidates) == 1:
        return _full_choice(candidates[0], {})
    if task_pool.select_split is None:
        raise ValueError(f"calib.full.grid has {len(candidates)} candidates, but task pool "
                         f"'{task_pool.kind}' has no split to choose them on; give one value per key")
    bits = int(fcfg.select_bits)
    results: dict[str, float] = {}
    best: tuple[float, dict[str, Any], Calibrated] | None = None   # the best so far (ties: the earlier)
    for setting in candidates:
        choice = _full_choice(setting, {})
        v = with_full_choice(cfg, Variant(merge, "epmq_full", bits), choice)
        params, stats, settings = calibrate_variant(ctx, model_pool, v, start, calib_inputs, full=choice,
                                                    timer="select_full", task_pool=task_pool)
        value = float(np.mean(list(scores(score(task_pool, ctx, params, task_pool.select_split)).values())))
        results[_label(setting, keys)] = value
        if best is None or value > best[0]:
            best = (value, setting, Calibrated(calib_config(cfg, v, choice)[0], params, stats, settings))
    _, chosen, calibrated = best
    ctx.log(f"[epmq] {merge}: E-PMQ-full settings {_label(chosen, keys)} chosen on validation at "
            f"{bits} bits ({', '.join(f'{k}: {v:.1f}' for k, v in results.items())})")
    return dataclasses.replace(_full_choice(chosen, results), calibrated=calibrated)


def with_full_choice(cfg: ml_collections.ConfigDict, v: Variant, choice: FullChoice) -> Variant:
    """An E-PMQ-full variant with its switches resolved: the config's E-PMQ switches, the chosen λ."""
    from epmq_jax.pipeline.variants import epmq_switches

    rounding = cfg.calib.rounding if v.bits is not None else "none"
    return dataclasses.replace(v, switches=epmq_switches(cfg.calib, lam=float(choice.lam), rounding=rounding))

"""Checks a whole config before any data is built, model trained or checkpoint loaded.

:func:`check_config` looks at the config alone (types, ranges, names, non-empty lists, regexes);
:func:`check_companions` loads the companion configs ``epmq run`` runs after it
(``run.companions``) and checks each the same way; :func:`check_against_model` at the model's structure (the merge filter selects at least one leaf,
the group size divides every calibrated kernel's input dimension, ``quant.filter`` selects
exactly the calibrated kernels), which the model pool gives without loading weights or
training. Every problem is one :class:`ConfigError` line naming the key, the value and what was
expected; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

from epmq_jax.config import ConfigError, companion_specs, load_companion
from epmq_jax.pipeline.variants import MERGES, QUANTIZERS, parse_ablation

_ROUNDINGS = ("gptq", "rtn", "none")   # E-PMQ's rounding (AWQ is a method of its own: quant.methods)
_ANCHORS = ("output", "weight")
_TARGETS = ("expert", "merged", "mix")
_WEIGHTINGS = ("uniform", "tokens", "frobenius")


def _need(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"--config.{key}={value!r}: expected {expected}")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _seq(cfg: ml_collections.ConfigDict, key: str, value: Any, *, allow_empty: bool = False) -> list:
    _need(isinstance(value, list | tuple), key, value, "a list")
    _need(allow_empty or len(value) > 0, key, value, "a non-empty list")
    return list(value)


def _choice_list(key: str, value: Any, choices: tuple[str, ...], *, allow_empty: bool = False) -> list:
    _need(isinstance(value, list | tuple) and (allow_empty or len(value) > 0), key, value,
          f"a non-empty list of {', '.join(choices)}")
    bad = [v for v in value if v not in choices]
    _need(not bad, key, value, f"items among {', '.join(choices)} (unknown: {', '.join(map(str, bad))})")
    _need(len(set(value)) == len(value), key, value, "no repeated items")
    return list(value)


def _regex(key: str, value: Any) -> None:
    _need(isinstance(value, str), key, value, "a regular expression (string)")
    try:
        re.compile(value)
    except re.error as e:
        raise ConfigError(f"--config.{key}={value!r}: not a valid regular expression ({e})") from None


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Static checks of the sections every run uses (``merge``, ``quant``, ``calib``, ``eval``, ``run``).

    Raises:
      ConfigError: the first problem found, in one line.
    """
    from epmq_jax.pipeline.kinds import pool_kinds

    try:
        pool_kinds(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for section in ("merge", "quant", "calib", "eval", "run"):
        if section not in cfg:
            raise ConfigError(f"the config has no '{section}' section")
    m, q, c, e, r = cfg.merge, cfg.quant, cfg.calib, cfg.eval, cfg.run

    merges = _choice_list("merge.methods", m.methods, MERGES, allow_empty=True)
    if any(x in merges for x in ("ta", "ties")) and m.get("scaling") is None:
        sc = _seq(cfg, "merge.scalings", m.scalings)
        _need(all(_number(s) and s >= 0 for s in sc), "merge.scalings", m.scalings, "finite numbers >= 0")
    if m.get("scaling") is not None:
        _need(_number(m.scaling) and m.scaling >= 0, "merge.scaling", m.scaling, "a finite number >= 0")
    if "ties" in merges:
        _need(_number(m.ties_density) and 0 < m.ties_density <= 1, "merge.ties_density", m.ties_density,
              "a number in (0, 1]")
        _need(m.ties_trim in ("global", "per_tensor"), "merge.ties_trim", m.ties_trim, "'global' or 'per_tensor'")
    if "regmean" in merges:
        if m.get("regmean_alpha") is not None:
            _need(_number(m.regmean_alpha) and 0 <= m.regmean_alpha <= 1, "merge.regmean_alpha",
                  m.regmean_alpha, "a number in [0, 1]")
        else:
            al = _seq(cfg, "merge.regmean_alphas", m.get("regmean_alphas"))
            _need(all(_number(a) and 0 <= a <= 1 for a in al), "merge.regmean_alphas", m.regmean_alphas,
                  "numbers in [0, 1]")
    _regex("merge.filter", m.get("filter") or "")

    bits = _seq(cfg, "quant.bits", q.bits)
    _need(all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in bits), "quant.bits",
          q.bits, "integers from 2 to 8")
    _need(len(set(bits)) == len(bits), "quant.bits", q.bits, "no repeated bit widths")
    _choice_list("quant.methods", q.methods, QUANTIZERS)
    for merge, methods in (q.get("methods_by_merge") or {}).items():
        _need(merge in MERGES, f"quant.methods_by_merge.{merge}", methods, f"a merge among {', '.join(MERGES)}")
        _choice_list(f"quant.methods_by_merge.{merge}", methods, QUANTIZERS)
    gs = q.group_size
    _need(isinstance(gs, int) and (gs == -1 or gs > 0), "quant.group_size", gs, "-1 (per channel) or a positive integer")
    _need(isinstance(q.symmetric, bool), "quant.symmetric", q.symmetric, "true or false")
    _need(_number(q.damp) and q.damp >= 0, "quant.damp", q.damp, "a finite number >= 0")
    _choice_list("quant.checkpoint_methods", q.checkpoint_methods, QUANTIZERS, allow_empty=True)
    if q.checkpoint_methods:
        _need(q.checkpoint_bits in bits, "quant.checkpoint_bits", q.checkpoint_bits, f"one of quant.bits {tuple(bits)}")
    if q.get("filter"):
        _regex("quant.filter", q.filter)

    _need(_number(c.lam) and c.lam >= 0, "calib.lam", c.lam, "a finite number >= 0")
    _need(c.anchor in _ANCHORS, "calib.anchor", c.anchor, " or ".join(map(repr, _ANCHORS)))
    _need(c.target in _TARGETS, "calib.target", c.target, " or ".join(map(repr, _TARGETS)))
    _need(_number(c.alpha) and 0 <= c.alpha <= 1, "calib.alpha", c.alpha, "a number in [0, 1]")
    _need(c.task_weights in _WEIGHTINGS, "calib.task_weights", c.task_weights, " or ".join(map(repr, _WEIGHTINGS)))
    _need(c.rounding in _ROUNDINGS, "calib.rounding", c.rounding, " or ".join(map(repr, _ROUNDINGS)))
    _need(c.get("damp_center", "merged") in ("merged", "zero"), "calib.damp_center", c.get("damp_center"),
          "'merged' (the solve's damping pulls toward the merge) or 'zero'")
    for key in ("n_per_task", "batch_size"):
        v = c[key]
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"calib.{key}", v, "an integer >= 1")
    sweep = _seq(cfg, "calib.lam_sweep", c.lam_sweep, allow_empty=True)
    _need(all(_number(x) and x >= 0 for x in sweep), "calib.lam_sweep", c.lam_sweep, "finite numbers >= 0")
    ablations = _seq(cfg, "calib.ablations", c.ablations, allow_empty=True)
    for text in ablations:
        try:
            changes = parse_ablation(text)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for k, v in changes.items():
            allowed = {"anchor": _ANCHORS, "target": _TARGETS, "task_weights": _WEIGHTINGS,
                       "rounding": _ROUNDINGS}.get(k)
            if allowed is not None:
                _need(v in allowed, "calib.ablations", text, f"{k} among {', '.join(allowed)}")
            elif k == "alpha":
                _need(0 <= v <= 1, "calib.ablations", text, "alpha in [0, 1]")
            else:
                _need(v >= 0 and math.isfinite(v), "calib.ablations", text, "lam >= 0")
    if sweep or ablations:
        _need(c.sweep_merge in merges, "calib.sweep_merge", c.sweep_merge, f"one of merge.methods {tuple(merges)}")
        _need(c.sweep_bits in bits, "calib.sweep_bits", c.sweep_bits, f"one of quant.bits {tuple(bits)}")
        _need("epmq" in q.methods, "quant.methods", q.methods, "to include 'epmq' when calib.lam_sweep or "
              "calib.ablations ask for E-PMQ rows")

    if c.get("full"):
        _check_full(c.full, merges, bits)

    _need(isinstance(e.batch_size, int) and e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
    if e.get("length_multiple") is not None:
        _need(isinstance(e.length_multiple, int) and e.length_multiple >= 1, "eval.length_multiple",
              e.length_multiple, "an integer >= 1")
    if e.get("limit") is not None:
        _need(isinstance(e.limit, int) and e.limit >= 1, "eval.limit", e.limit, "an integer >= 1 (or None)")
    mesh = r.get("mesh") or ""
    _need(isinstance(mesh, str) and (mesh in ("", "auto") or re.fullmatch(r"\w+:\d+", mesh) is not None),
          "run.mesh", mesh, "'', 'auto' or 'NAME:SIZE' (e.g. 'data:8')")
    companions = r.get("companions") or ()
    _need(isinstance(companions, list | tuple) and all(isinstance(x, str) and x.strip() for x in companions),
          "run.companions", companions, "a list of companion config files 'PATH[:ARG]'")
    _need(len(set(companions)) == len(companions), "run.companions", companions, "no repeated configs")


#: Folders of a run directory that a companion's own folder (``WORKDIR/<name>``) must not be.
_RUN_FOLDERS = ("cache", "checkpoints", "solver_stats", "resume")


def check_companions(cfg: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """Loads ``run.companions`` (:func:`epmq_jax.config.load_companion`) and checks each one.

    A companion must load, have no companions of its own (nothing recurses), pass
    :func:`check_config`, and have a name (its run folder ``WORKDIR/<name>``) that no other
    companion and no folder of the run directory has.

    Returns:
      The companion configs, in order (empty if there are none).

    Raises:
      ConfigError: the first problem, in one line naming ``run.companions`` and the companion.
    """
    out, names = [], {}
    for spec in companion_specs(cfg):
        companion = load_companion(cfg, spec)
        name = str(companion.get("name", ""))
        where = f"--config.run.companions: {name} ({spec})"
        own = companion.run.get("companions") or ()
        if own:
            raise ConfigError(f"{where} has companions of its own {tuple(own)!r}; a companion config must "
                              "set run.companions=() (companions do not nest)")
        if not name or name in _RUN_FOLDERS or name in names or "/" in name:
            taken = (f"taken by the companion {names[name]}" if name in names else
                     f"a folder of the run directory ({', '.join(_RUN_FOLDERS)})" if name in _RUN_FOLDERS
                     else "not a folder name")
            raise ConfigError(f"{where}: its name {name!r} is {taken}; give the config another name "
                              "(its run folder is WORKDIR/<name>)")
        try:
            check_config(companion)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        names[name] = spec
        out.append(companion)
    return out


def _check_full(f: ml_collections.ConfigDict, merges: list, bits: list) -> None:
    """``calib.full``: E-PMQ-full's merges, pieces, fixed settings and selection grid."""
    from epmq_jax.calib.full import PIECES, FullConfig
    from epmq_jax.pipeline.stages import FULL_FLOAT_KEYS, FULL_KEYS

    fm = _choice_list("calib.full.merges", f.merges, MERGES)
    _need(set(fm) <= set(merges), "calib.full.merges", f.merges, f"merges among merge.methods {tuple(merges)}")
    _choice_list("calib.full.pieces", f.pieces, PIECES, allow_empty=True)
    _need(f.select_bits in bits, "calib.full.select_bits", f.select_bits, f"one of quant.bits {tuple(bits)}")
    if f.get("piece_bits") is not None:
        _need(isinstance(f.piece_bits, list | tuple) and set(f.piece_bits) <= set(bits), "calib.full.piece_bits",
              f.piece_bits, f"bit widths among quant.bits {tuple(bits)}")
    settings, grid = dict(f.settings), dict(f.get("grid") or {})
    for key, value in [*settings.items(), *grid.items()]:
        _need(key in FULL_KEYS, f"calib.full.settings.{key}" if key in settings else f"calib.full.grid.{key}",
              value, f"a key among {', '.join(FULL_KEYS)}")
    for key, values in grid.items():
        _need(isinstance(values, list | tuple) and len(values) > 0, f"calib.full.grid.{key}", values,
              "a non-empty list of candidates")
    for key in ("lam", "damp"):
        for v in [*([settings[key]] if key in settings else []), *grid.get(key, [])]:
            _need(_number(v) and v >= 0, f"calib.full.{key}", v, "finite numbers >= 0")
    first = {k: v for k, v in settings.items() if k not in ("lam", "damp")}
    first.update({k: vs[0] for k, vs in grid.items() if k not in ("lam", "damp")})
    try:
        FullConfig(**{k: float(v) if k in FULL_FLOAT_KEYS else v for k, v in first.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--config.calib.full.settings={settings!r}: {err}") from None
    for key, values in grid.items():
        for v in values if key not in ("lam", "damp") else ():
            try:
                FullConfig(**{**first, key: float(v) if key in FULL_FLOAT_KEYS else v})
            except (TypeError, ValueError) as err:
                raise ConfigError(f"--config.calib.full.grid.{key}={values!r}: {err}") from None


def uses_heads(cfg: ml_collections.ConfigDict) -> bool:
    """Whether some E-PMQ-full row of the config refits the head in the tasks' readout metrics."""
    f = cfg.calib.get("full")
    if not f or not list(f.merges):
        return False
    grid = dict(f.get("grid") or {})
    return bool(dict(f.settings).get("heads")) or any(grid.get("heads", ())) or "heads" in tuple(f.pieces)


def check_task_pool(cfg: ml_collections.ConfigDict, task_pool: Any) -> None:
    """What the config asks of the task pool, checked once the pools are built (before any work).

    Raises:
      ConfigError: E-PMQ-full's ``heads`` with a task pool that has no per-task linear heads.
    """
    if uses_heads(cfg) and getattr(task_pool, "readout_heads", None) is None:
        raise ConfigError(f"--config.calib.full.settings.heads: task pool {cfg.task_pool.kind!r} has no "
                          "per-task linear heads for E-PMQ-full's 'heads' piece (the image suites have); "
                          "set heads=False and leave 'heads' out of calib.full.pieces")


def calibrated_kernels(adapter: Any, params: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``[(leaf path, shape), ...]`` of every kernel the adapter calibrates, in order."""
    from epmq_jax.calib.adapter import get_path, key_path

    out = []
    for k, bpath in enumerate(adapter.block_paths(params)):
        block = get_path(params, bpath)
        for group in adapter.linear_groups(adapter.block_kind(k)):
            for rel in group:
                leaf = get_path(block, key_path(rel))
                out.append(("/".join(str(p) for p in (*bpath, rel)), tuple(leaf.shape)))
    return out


def check_against_model(cfg: ml_collections.ConfigDict, abstract_params: Any, adapter: Any) -> None:
    """Checks the config against the model's structure (shapes only; nothing loaded).

    Raises:
      ConfigError: ``merge.filter`` selects no leaf, ``quant.group_size`` does not divide a
        calibrated kernel's input dimension, or ``quant.filter`` (when set) does not select
        exactly the calibrated kernels.
    """
    from epmq_jax._tree import iter_paths

    paths = list(iter_paths(abstract_params))
    filt = cfg.merge.get("filter") or ""
    if filt and not any(re.search(filt, p) for p in paths):
        raise ConfigError(f"--config.merge.filter={filt!r} selects none of the model's {len(paths)} leaves "
                          f"(e.g. {paths[0]!r}); the merge would be the base model")
    kernels = calibrated_kernels(adapter, abstract_params)
    gs = int(cfg.quant.group_size)
    for path, shape in kernels:
        if gs != -1 and shape[0] % gs:
            raise ConfigError(f"--config.quant.group_size={gs}: does not divide the input dimension of "
                              f"{path} {shape} (d_in {shape[0]}); use a divisor of it or -1")
    pattern = cfg.quant.get("filter") or ""
    if pattern:
        names = [p for p, _ in kernels]
        selected = {p for p in paths if p.endswith("kernel") and re.search(pattern, p)}
        missed = sorted(set(names) - selected)
        extra = sorted(selected - set(names))
        if missed or extra:
            raise ConfigError(f"--config.quant.filter={pattern!r} must select exactly the {len(names)} kernels "
                              f"the calibration adapter quantizes (e.g. {names[0]}); it misses {missed[:3]} "
                              f"and adds {extra[:3]}")

"""One runner for every config: check -> merge -> calibrate & round -> evaluate -> report -> save.

:func:`run` is what ``epmq run`` calls, whatever the model family: it builds the config's model
pool and task pool (:mod:`epmq_jax.pipeline.kinds`), checks the whole config against the
model's structure before any work, then computes every row of :func:`~epmq_jax.pipeline.variants.plan`:

1. the FP experts (each task with its own expert);
2. per merge method (``merge.methods``): the merge, its coefficient (TA / TIES) or RegMean's α
   chosen on the task pool's selection split (validation) unless the config fixes it; the FP
   merge, E-PMQ unrounded (the relaxation W* kept in float) and every quantizer at every bit
   width, each calibrated by the sequential driver from the same per-task calibration inputs;
3. the E-PMQ anchor-strength sweep and switch ablations;
4. E-PMQ-full's rows (``calib.full``): per merge its settings chosen on the selection split
   (:func:`~epmq_jax.pipeline.stages.select_full`), then the default rows and each piece alone
   (the default row at the selection's bit width reuses the selection's calibration);

scores each on the task pool's reported split, and writes into ``WORKDIR``: results.json / .md /
.csv (:mod:`epmq_jax.report`), ``solver_stats/<variant>.json``, the plots, and packed checkpoints
of ``quant.checkpoint_methods`` at ``quant.checkpoint_bits`` (:mod:`~epmq_jax.pipeline.checkpoints`).

With ``run.resume`` a rerun of the same config skips the rows already finished (kept in
``WORKDIR/rows.partial.jsonl``) and the calibration driver resumes from its last finished block
(``WORKDIR/resume/<config fingerprint>/<variant>``, removed once the row is recorded).

Companion configs (``run.companions``, e.g. configs/offline_8task.py lists its broad regime): run
after the config in the same process, each into ``WORKDIR/<its name>/`` exactly as a run of its
own (with the ``run`` section, ``run.resume`` included, and the cache of the config that lists
it); ``WORKDIR/results.json`` / results.md and the printed table then hold every companion's rows
too (:func:`run`). The single-step commands (:func:`merge_command`, :func:`quantize_command`)
ignore companions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from epmq_jax import report
from epmq_jax.config import COMPANION_OWN_RUN_KEYS
from epmq_jax.pipeline import stages, validate
from epmq_jax.pipeline.checkpoints import config_dict, save_checkpoint
from epmq_jax.pipeline.kinds import build_pools
from epmq_jax.pipeline.pools import Context, Log, ModelPool, Params, TaskPool, say, scores
from epmq_jax.pipeline.variants import FULL_METHODS, Variant, epmq_switches, plan


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (the wall time depends on what else runs)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def enable_compilation_cache(cache: Path) -> None:
    """Keeps XLA's compiled programs under ``cache/jax`` (JAX's persistent compilation cache), so
    a second run compiles nothing. Every program is kept, the quick ones too: a run compiles
    hundreds of small ones (about 10 MB for the offline LLM benchmark), and reading them back is
    faster than compiling them again. An explicit ``JAX_COMPILATION_CACHE_DIR`` wins."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str((Path(cache) / "jax").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def start(cfg: ml_collections.ConfigDict, workdir: str | Path, *, log: Log = say
          ) -> tuple[Context, ModelPool, TaskPool]:
    """Checks the config, builds the pools and checks the config against the model's structure.

    Nothing is trained, loaded beyond the base model's structure, or written except ``workdir``.

    Raises:
      epmq_jax.config.ConfigError: a bad config value (one line).
    """
    validate.check_config(cfg)
    mesh, axis = stages.make_mesh(cfg.run.mesh)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, workdir, log, mesh, axis)
    model_pool, task_pool = build_pools(ctx)
    validate.check_against_model(cfg, model_pool.abstract_params(), model_pool.adapter())
    validate.check_task_pool(cfg, task_pool)
    enable_compilation_cache(ctx.cache_dir)
    return ctx, model_pool, task_pool


class Runner:
    """Computes variants for one run, sharing the merges and the calibration inputs between them."""

    def __init__(self, ctx: Context, model_pool: ModelPool, task_pool: TaskPool,
                 resume_root: Path | None = None):
        """``resume_root``: where the driver keeps each variant's per-block progress (None: nowhere)."""
        self.ctx, self.mp, self.tp = ctx, model_pool, task_pool
        self.resume_root = resume_root
        self._merges: dict[str, stages.Merge] = {}
        self._full: dict[str, stages.FullChoice] = {}
        self._calib_inputs: list[Any] | None = None
        self.metrics: dict[str, dict[str, dict[str, float]]] = {}

    def calib_inputs(self) -> list[Any]:
        if self._calib_inputs is None:
            with self.ctx.timed("calibration_data"):
                self._calib_inputs = self.mp.calibration_inputs()
        return self._calib_inputs

    def merged(self, method: str) -> stages.Merge:
        if method not in self._merges:
            self._merges[method] = stages.merge_method(self.ctx, self.mp, self.tp, method, self.calib_inputs)
        return self._merges[method]

    def full_choice(self, merge: str) -> stages.FullChoice:
        """E-PMQ-full's settings for ``merge``, chosen on validation once (:func:`stages.select_full`)."""
        if merge not in self._full:
            self._full[merge] = stages.select_full(self.ctx, self.mp, self.tp, merge, self.merged(merge).params,
                                                   self.calib_inputs())
        return self._full[merge]

    def resolve(self, v: Variant) -> Variant:
        """The variant as computed: E-PMQ-full rows get their chosen λ (other variants unchanged)."""
        if v.method in FULL_METHODS:
            return stages.with_full_choice(self.ctx.cfg, v, self.full_choice(v.merge))
        return v

    def compute(self, v: Variant) -> tuple[Any, list[dict] | None, float | None, dict[str, Any]]:
        """``(params, solver stats or None, merge coefficient, row settings)`` of a variant."""
        if v.merge == "expert":
            return self.mp.experts(), None, None, {}
        if v.merge == "multitask":
            return self.mp.multitask(), None, None, {}
        m = self.merged(v.merge)
        if v.method == "fp":
            return m.params, None, m.scaling, dict(m.settings)
        resume = None if self.resume_root is None else str(self.resume_root / v.name)
        full = self.full_choice(v.merge) if v.method in FULL_METHODS else None
        if full is not None:
            done = full.reusable(stages.calib_config(self.ctx.cfg, v, full)[0])
            if done is not None:   # the selection calibrated this very row: used once, then let go
                self._full[v.merge] = dataclasses.replace(full, calibrated=None)
                self.ctx.log(f"[epmq] {v.name}: reuses the E-PMQ-full selection's calibration (same settings)")
                return done.params, done.stats, m.scaling, {**m.settings, **done.settings}
        params, stats, damping = stages.calibrate_variant(self.ctx, self.mp, v, m.params,
                                                           self.calib_inputs(), resume, full=full,
                                                           task_pool=self.tp)
        return params, stats, m.scaling, {**m.settings, **damping}

    def row(self, v: Variant, params: Any, scaling: float | None, settings: Mapping[str, Any]) -> dict[str, Any]:
        results = stages.score(self.tp, self.ctx, params, self.tp.report_split)
        self.metrics[v.name] = results
        return report.make_row(v.merge, v.method, scores(results), bits=v.bits, block=v.block,
                               default=v.default, merge_scaling=scaling, settings=settings, **v.sw)


#: ``run`` keys no row depends on: left out of the config's fingerprint.
_NOT_FINGERPRINTED = (*COMPANION_OWN_RUN_KEYS, "resume")


def _fingerprint(cfg: ml_collections.ConfigDict) -> str:
    """A hash of what the config's rows depend on: the whole config but whether it resumes, where
    it was loaded from and which companions run after it (so a run that stopped, in a companion
    say, resumes when rerun with ``run.resume``)."""
    cd = config_dict(cfg)
    cd["run"] = {k: v for k, v in cd.get("run", {}).items() if k not in _NOT_FINGERPRINTED}
    blob = json.dumps(cd, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finished_rows(path: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run of the same config, by variant name (empty if none or another config)."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue   # a line cut by a crash
        if item.get("fingerprint") == fingerprint:
            out[item["name"]] = item
    return out


#: What a companion's entry in the main results.json keeps of its own results document.
_COMPANION_KEYS = ("rows", "tasks", "notes", "timings", "checkpoints", "merges", "full_selection")


def run(cfg: ml_collections.ConfigDict, workdir: str | Path, *, plots: bool = True, log: Log = say) -> dict[str, Any]:
    """The whole job (module docstring): the config, then each of its companion configs.

    Every companion (``run.companions``) is loaded and checked, and every pool built and checked
    against its model, before any work starts. The companions run in this process after the
    config (JAX's compiled functions are reused) into ``WORKDIR/<companion name>/``, each with
    the files a run of its own writes, sharing this run's cache (``run.cache_dir``, default
    ``WORKDIR/cache``). Then ``WORKDIR/results.json`` gains ``companions`` (name -> the
    companion's config spec, results path, rows, ...) and ``job_timings``, results.md a section
    per companion, and the printed table the companions' tables.

    Returns:
      The results document also written to ``WORKDIR/results.json``.
    """
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    companions = validate.check_companions(cfg)
    workdir = Path(workdir)
    started = start(cfg, workdir, log=log)
    started_companions = []
    for companion in companions:
        with companion.run.unlocked():   # one cache for the whole job: data, trained models, XLA
            companion.run.cache_dir = str(started[0].cache_dir.resolve())
        started_companions.append(start(companion, workdir / companion.name, log=log))
    doc = _run_config(*started, log=log, since=(t_start, cpu_start))
    del started   # its pools (models, data) are not needed by the companions
    write_report(doc, workdir, plots=plots, log=log, show=not companions)
    if not companions:
        return doc
    entries = {}
    for i, companion in enumerate(companions):
        (ctx, model_pool, task_pool), started_companions[i] = started_companions[i], None
        log(f"[epmq] companion config {companion.name} ({companion.run.source}) into {ctx.workdir}")
        cdoc = _run_config(ctx, model_pool, task_pool, log=log)
        write_report(cdoc, ctx.workdir, plots=plots, log=log, show=False)
        entries[companion.name] = {"config": companion.run.source, "description": companion.get("description"),
                                   "results": str(Path(companion.name) / "results.json"),
                                   **{k: cdoc[k] for k in _COMPANION_KEYS if k in cdoc}}
    doc["companions"] = entries
    doc["job_timings"] = {"total": time.perf_counter() - t_start, "cpu_total": _cpu_seconds() - cpu_start}
    report.write_doc(workdir / "results.json", doc)
    write_report(doc, workdir, plots=False, log=log)
    return report.read_json(workdir / "results.json")


def _run_config(ctx: Context, model_pool: ModelPool, task_pool: TaskPool, *, log: Log = say,
                since: tuple[float, float] | None = None) -> dict[str, Any]:
    """Every row of one config (:func:`~epmq_jax.pipeline.variants.plan`), its solver statistics,
    checkpoints and metrics.json; writes and returns its results.json document. Its ``total`` /
    ``cpu_total`` timings count from ``since`` (wall, CPU seconds; default: now)."""
    from tqdm.auto import tqdm

    t_start, cpu_start = since or (time.perf_counter(), _cpu_seconds())
    cfg = ctx.cfg
    fingerprint = _fingerprint(cfg)
    resume_root = ctx.workdir / "resume" / fingerprint if cfg.run.resume else None
    runner = Runner(ctx, model_pool, task_pool, resume_root)
    variants = plan(cfg, has_multitask=bool(cfg.model_pool.get("multitask", False)))
    stats_dir = ctx.workdir / "solver_stats"
    stats_dir.mkdir(exist_ok=True)
    partial = ctx.workdir / "rows.partial.jsonl"
    done = _finished_rows(partial, fingerprint) if cfg.run.resume else {}
    if not cfg.run.resume and partial.exists():
        partial.unlink()
    rows, checkpoints = [], {}
    bar = tqdm(variants, desc="variants", disable=not ctx.progress)
    for v in bar:
        bar.set_postfix_str(v.name)
        if v.name in done:
            rows.append(done[v.name]["row"])
            if done[v.name].get("checkpoint"):
                checkpoints[v.name] = done[v.name]["checkpoint"]
            log(f"[epmq] {v.name:<32} avg {rows[-1]['avg']:.1f} (finished earlier)")
            continue
        v = runner.resolve(v)
        params, stats, scaling, settings = runner.compute(v)
        if stats is not None:
            (stats_dir / f"{v.name}.json").write_text(json.dumps(stats, indent=1))
        row = runner.row(v, params, scaling, settings)
        rows.append(row)
        log(f"[epmq] {v.name:<32} avg {row['avg']:.1f}")
        ckpt = None
        if (v.block == "main" and v.method in cfg.quant.checkpoint_methods
                and v.bits == int(cfg.quant.checkpoint_bits)):
            ckpt = str(save_checkpoint(ctx, model_pool, task_pool, params, row,
                                       ctx.workdir / "checkpoints" / v.name))
            checkpoints[v.name] = ckpt
        with open(partial, "a") as f:
            f.write(json.dumps({"fingerprint": fingerprint, "name": v.name, "row": row,
                                "checkpoint": ckpt}) + "\n")
        if resume_root is not None:   # the row is recorded: its per-block progress is not needed
            shutil.rmtree(resume_root / v.name, ignore_errors=True)
    ctx.timings["total"] = time.perf_counter() - t_start
    ctx.timings["cpu_total"] = _cpu_seconds() - cpu_start
    (ctx.workdir / "metrics.json").write_text(json.dumps(runner.metrics, indent=1))
    extra = {"notes": [task_pool.note], "checkpoints": checkpoints, "solver_stats": str(stats_dir),
             "metrics": str(ctx.workdir / "metrics.json"),
             "pools": {"model": model_pool.kind, "task": task_pool.kind},
             "merges": {k: {"scaling": m.scaling, "settings": m.settings,
                            "validation": {str(c): s for c, s in m.validation.items()}}
                        for k, m in runner._merges.items()},
             "full_selection": {k: {"chosen": c.settings(), "validation": c.validation}
                                for k, c in runner._full.items()}}
    report.write_json(ctx.workdir / "results.json", rows, config=config_dict(cfg), timings=dict(ctx.timings),
                      extra=extra)
    return report.read_json(ctx.workdir / "results.json")


def _heading(doc: Mapping[str, Any], name: str) -> str:
    description = doc.get("description") or doc.get("config", {}).get("description")
    return f"{name}: {description}" if description else name


def write_report(doc: Mapping[str, Any], out_dir: str | Path, *, plots: bool = True, log: Log = say,
                 show: bool = True) -> list[Path]:
    """Writes results.md, results.csv (and the plots) from a results document and prints the table.

    results.csv and the plots hold the document's own rows; results.md and the printed table
    also each companion's (``doc["companions"]``, written by :func:`run`), in a section headed
    with its name. ``show=False`` prints only where the files went.

    Returns:
      The paths written.
    """
    from epmq_jax import plots as plots_mod

    out = Path(out_dir)
    rows = doc["rows"]
    name = doc.get("config", {}).get("name", out.name)
    notes = doc.get("notes", [])
    companions = doc.get("companions") or {}
    sections = [{**c, "heading": _heading(c, cname),
                 "notes": [f"Companion config {Path(c.get('config') or cname).name} of {name}, run after it in "
                           f"the same process; its own files are in {cname}/.", *c.get("notes", [])]}
                for cname, c in companions.items()]
    paths = [report.write_csv(out / "results.csv", rows),
             report.write_markdown(out / "results.md", rows, title=f"epmq results: {name}", notes=notes,
                                   timings=doc.get("timings"), heading=_heading(doc, name),
                                   companions=sections)]
    if plots:
        paths += plots_mod.plot_all(rows, out)
    if show:
        _show(rows, f"Scores (%), {_heading(doc, name)}. " + " ".join(notes), doc.get("timings"), log)
        for s in sections:
            _show(s["rows"], f"Scores (%), {s['heading']}. " + " ".join(s.get("notes", [])), s.get("timings"), log)
        job = doc.get("job_timings")
        if job:
            log("job timings (every config): " + ", ".join(f"{k} {v:.1f}s" for k, v in job.items()))
    log(f"[epmq] wrote {', '.join(p.name for p in paths)} to {out}")
    return paths


def _show(rows: list[Mapping[str, Any]], title: str, timings: Mapping[str, float] | None, log: Log) -> None:
    log(report.format_table(rows, title=title))
    if timings:
        log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


# ----------------------------------------------------------------------------- single steps


def merge_command(cfg: ml_collections.ConfigDict, workdir: str | Path, method: str, *,
                  scaling: float | None = None, log: Log = say) -> dict[str, Any]:
    """``epmq merge``: one merge method (coefficient chosen on validation unless ``scaling``),
    scored on the reported split, saved to ``WORKDIR/checkpoints/<method>_fp``."""
    if scaling is not None:
        with cfg.unlocked():
            cfg.merge.scaling = float(scaling)
    ctx, mp, tp = start(cfg, workdir, log=log)
    runner = Runner(ctx, mp, tp)
    v = Variant(method, "fp")
    params, _, scaling, settings = runner.compute(v)
    row = runner.row(v, params, scaling, settings)
    path = save_checkpoint(ctx, mp, tp, params, row, ctx.workdir / "checkpoints" / v.name)
    what = f" (coefficient {scaling:g})" if scaling is not None else ""
    log(report.format_table([row], title=f"Scores (%): {report.MERGE_NAMES.get(method, method)}{what}, "
                            f"saved to {path}"))
    return row


def quantize_command(cfg: ml_collections.ConfigDict, workdir: str | Path, merge: str, method: str, bits: int, *,
                     out: str | Path | None = None, log: Log = say) -> dict[str, Any]:
    """``epmq quantize``: one merge, one quantizer at ``bits``; scored, saved packed."""
    ctx, mp, tp = start(cfg, workdir, log=log)
    runner = Runner(ctx, mp, tp)
    is_epmq = method == "epmq"
    v = Variant(merge, method, int(bits), default=is_epmq, switches=epmq_switches(cfg.calib) if is_epmq else ())
    params, stats, scaling, settings = runner.compute(v)
    (ctx.workdir / "solver_stats").mkdir(exist_ok=True)
    (ctx.workdir / "solver_stats" / f"{v.name}.json").write_text(json.dumps(stats, indent=1))
    row = runner.row(v, params, scaling, settings)
    path = save_checkpoint(ctx, mp, tp, params, row, Path(out) if out else ctx.workdir / "checkpoints" / v.name)
    log(report.format_table([row], title=f"Scores (%): {v.name}, saved to {path}"))
    return row


__all__ = ["Params", "Runner", "merge_command", "quantize_command", "run", "start", "write_report"]

"""The benchmark job, driven by a config: train -> merge -> quantize -> evaluate -> report / save.

:func:`run` is what ``epmq run`` calls. With the config of configs/offline_8task.py it:

1. builds the offline suite and trains (or loads from the cache under ``WORKDIR/cache``) the
   pretrained encoder, the task heads and the experts (:func:`epmq_jax.train.train_all`);
2. scores the FP experts (each task with its own expert);
3. for each merge method (``merge.methods``: Task Arithmetic, TIES) picks the merge coefficient
   on the **validation** splits, then scores the FP merge, E-PMQ unrounded (the relaxation W*
   kept in float), and RTN / GPTQ / AWQ / E-PMQ at every bit width of ``quant.bits``;
4. scores RegMean (FP), the anchor-strength sweep (``calib.lam_sweep``) and the switch
   ablations (``calib.ablations``) of E-PMQ;
5. evaluates every variant on every task's **test** split, and writes into ``WORKDIR``:
   results.json / .md / .csv (see :mod:`epmq_jax.report`), ``solver_stats/<variant>.json``
   (per-layer solver statistics), the PNG plots (:mod:`epmq_jax.plots`) and
   ``checkpoints/<merge>_<method>_w<bits>`` (the packed models of ``quant.checkpoint_methods``,
   by default GPTQ and the default E-PMQ, at ``quant.checkpoint_bits``), which :func:`eval_checkpoint` (``epmq eval --checkpoint``) reloads
   and scores again, reproducing its row exactly.

Every variant is calibrated from the same per-task calibration images (``calib.n_per_task``
from each task's train split) through the sequential driver :func:`epmq_jax.calib.calibrate`
with the CLIP ViT adapter; the λ, target, anchor and task-weight switches are fixed by the config,
not tuned on test.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from epmq_jax import report

Params = dict[str, Any]
Log = Callable[[str], None]


def say(message: str) -> None:
    """Prints a progress message without breaking the progress bars."""
    from tqdm.auto import tqdm

    tqdm.write(message)


SPLIT_NOTE = ("Accuracies are on each task's test split; the merge coefficient is chosen on the "
              "validation splits; E-PMQ's λ and switches are fixed by the config.")


# ----------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One table row to compute.

    Attributes:
      merge, method, bits, block, default: as in the row schema of :mod:`epmq_jax.report`.
      tag: what tells a sweep / ablation row apart (``"lam1"``, ``"target-mix"``), else ``""``.
      switches: the E-PMQ switches as sorted ``(key, value)`` pairs (empty for other methods).
    """

    merge: str
    method: str
    bits: int | None = None
    block: str = "main"
    default: bool = False
    tag: str = ""
    switches: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """File-name-safe id, e.g. ``ta_gptq_w4``, ``ta_epmq_w4_lam1``, ``ta_epmq_w4_target-mix``."""
        out = f"{self.merge}_{self.method}" + (f"_w{self.bits}" if self.bits is not None else "")
        return out + (f"_{self.tag}" if self.tag else "")

    @property
    def sw(self) -> dict[str, Any]:
        return dict(self.switches)


SWITCHES = ("lam", "anchor", "target", "alpha", "task_weights", "rounding")


def epmq_switches(calib: ml_collections.ConfigDict, **changes: Any) -> tuple[tuple[str, Any], ...]:
    """The E-PMQ switches of the config's ``calib`` section with ``changes`` applied, as sorted pairs.

    ``alpha`` is kept only for ``target="mix"``.
    """
    sw = {"lam": float(calib.lam), "anchor": calib.anchor, "target": calib.target,
          "alpha": float(calib.alpha), "task_weights": calib.task_weights, "rounding": calib.rounding}
    sw.update(changes)
    if sw["target"] != "mix":
        sw["alpha"] = None
    return tuple(sorted(sw.items()))


def parse_ablation(text: str) -> dict[str, Any]:
    """``"target=mix"`` / ``"anchor=weight,lam=1"`` -> the switch changes of one ablation row.

    Raises:
      ValueError: a malformed item or an unknown switch.
    """
    changes: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (p.strip() for p in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"calib.ablations item {text!r}: expected KEY=VALUE[,KEY=VALUE]")
        if key not in SWITCHES:
            raise ValueError(f"calib.ablations item {text!r}: unknown switch {key!r}; "
                             f"expected one of {', '.join(SWITCHES)}")
        changes[key] = float(value) if key in ("lam", "alpha") else value
    return changes


def plan(cfg: ml_collections.ConfigDict) -> list[Variant]:
    """The variants of a run, in computation order.

    FP experts, RegMean (if ``calib.regmean``); per merge method: FP merge, E-PMQ unrounded,
    then per bit width each of ``quant.methods`` (E-PMQ is the default row); then, for
    ``calib.sweep_merge`` at ``calib.sweep_bits``, the λ sweep (``calib.lam_sweep`` minus the
    default λ) and the ablations (``calib.ablations``).
    """
    calib, quant = cfg.calib, cfg.quant
    out = [Variant("expert", "fp")]
    if calib.regmean:
        out.append(Variant("regmean", "fp"))
    for merge in cfg.merge.methods:
        out.append(Variant(merge, "fp"))
        out.append(Variant(merge, "epmq_unrounded", switches=epmq_switches(calib, rounding="none")))
        for bits in quant.bits:
            for method in quant.methods:
                is_epmq = method == "epmq"
                out.append(Variant(merge, method, int(bits), default=is_epmq,
                                   switches=epmq_switches(calib) if is_epmq else ()))
    sweep = dict(merge=calib.sweep_merge, method="epmq", bits=int(calib.sweep_bits))
    for lam in calib.lam_sweep:
        if float(lam) != float(calib.lam):
            out.append(Variant(**sweep, block="sweep", tag=f"lam{float(lam):g}",
                               switches=epmq_switches(calib, lam=float(lam))))
    for text in calib.ablations:
        changes = parse_ablation(text)
        out.append(Variant(**sweep, block="ablation", tag="_".join(f"{k}-{v:g}" if isinstance(v, float)
                                                                   else f"{k}-{v}" for k, v in changes.items()),
                           switches=epmq_switches(calib, **changes)))
    return out


# ----------------------------------------------------------------------------- the job


def dequantize_tree(params: Any) -> Any:
    """Replaces every ``QuantizedWeight`` leaf by its effective float kernel ``(d_in, d_out)``."""
    from epmq_jax.quant import is_quantized

    return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized)


@dataclasses.dataclass
class Job:
    """What every step of a run shares: the config, the suite, the trained models, the calibration data.

    Attributes:
      cfg: the experiment config.
      workdir: the run directory (outputs; training cache under ``workdir/cache`` unless
        ``train.cache_dir`` is set).
      suite: the built :class:`epmq_jax.data.offline_suite.Suite`.
      trained: :class:`epmq_jax.train.TrainedModels` (graphdef, pretrained, experts, heads).
      calib_inputs: per task (suite order) float32 images ``(n_per_task, 28, 28, 1)`` in [-1, 1].
      timings: seconds per stage, accumulated.
      log: where progress messages go.
    """

    cfg: ml_collections.ConfigDict
    workdir: Path
    suite: Any
    trained: Any
    calib_inputs: list[np.ndarray]
    timings: dict[str, float]
    log: Log = say

    @property
    def tasks(self) -> list[str]:
        return list(self.suite.names)

    @property
    def experts(self) -> list[Params]:
        return [self.trained.experts[t] for t in self.tasks]

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


def cache_dir(cfg: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The training cache: ``train.cache_dir`` if set, else ``WORKDIR/cache``."""
    explicit = cfg.train.get("cache_dir") if "train" in cfg else None
    return Path(explicit) if explicit else Path(workdir) / "cache"


def data_dir(cache: Path) -> Path:
    """Where the suite is written once as local tfds (array_record) datasets and read back."""
    return (Path(cache) / "tfds").absolute()


def enable_compilation_cache(cache: Path) -> None:
    """Keeps XLA's compiled programs under ``cache/jax`` (JAX's persistent compilation cache), so
    a second run skips most compilation. An explicit ``JAX_COMPILATION_CACHE_DIR`` wins."""
    import os

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str((Path(cache) / "jax").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def prepare(cfg: ml_collections.ConfigDict, workdir: str | Path, *, log: Log = say) -> Job:
    """Builds the suite (through tfds, under the cache), trains or loads the models, samples the
    calibration images.

    Raises:
      ValueError: ``cfg`` has no ``suite`` section (a paper config: :func:`run` hands those to
        :mod:`epmq_jax.pipeline_hf`).
    """
    from epmq_jax import train
    from epmq_jax.data import offline_suite

    if "suite" not in cfg:
        family = cfg.get("model", {}).get("family")
        raise ValueError(f"the offline job needs a config with a 'suite' section (configs/offline_8task.py); "
                         f"this one has none (model.family {family!r}): only run() takes paper configs")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cache = cache_dir(cfg, workdir)
    enable_compilation_cache(cache)
    t0 = time.perf_counter()
    suite = offline_suite.build_suite(cfg.suite, data_dir=str(data_dir(cache)))
    timings["build_suite"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log(f"[epmq] training (cached under {cache}) ...")
    trained = train.train_all(cfg, str(cache), suite)
    timings["train"] = time.perf_counter() - t0
    hits = trained.timings.get("cache_hits", 0)
    log(f"[epmq] models ready in {timings['train']:.1f}s ({hits} of {2 * len(suite) + 1} stages from the cache)")
    calib = offline_suite.calibration_images(suite, int(cfg.calib.n_per_task), seed=int(cfg.calib.seed))
    inputs = [offline_suite.to_float(calib[t]) for t in suite.names]
    return Job(cfg, workdir, suite, trained, inputs, timings, log)


def evaluate(job: Job, params: Params | Sequence[Params], split: str = "test", *, desc: str = "") -> dict[str, float]:
    """Accuracy (percent) on every task's ``split``.

    Args:
      job: the job.
      params: one encoder tree for all tasks (``QuantizedWeight`` leaves are dequantized), or one
        tree per task in suite order (the FP experts).
      split: ``"validation"`` or ``"test"``.
      desc: progress-bar label.

    Returns:
      ``{task: accuracy}`` in suite order.
    """
    from tqdm.auto import tqdm

    per_task = isinstance(params, list | tuple)
    trees = [dequantize_tree(p) for p in params] if per_task else [dequantize_tree(params)] * len(job.tasks)
    t0 = time.perf_counter()
    out = {}
    for task, tree in tqdm(list(zip(job.tasks, trees)), desc=f"eval {desc}".strip(), leave=False,
                           disable=not job.cfg.eval.progress):
        x, y = job.suite[task].splits[split]
        out[task] = job.trained.evaluate(tree, task, x, y, batch_size=int(job.cfg.eval.batch_size))
    job.add_time(f"evaluate_{split}", time.perf_counter() - t0)
    return out


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
    raise ValueError(f"merge.methods: unknown merge method {method!r}; expected 'ta' or 'ties'")


def merge_params(job: Job, method: str, scaling: float) -> Params:
    """Merges the experts' encoders with ``method`` (``ta`` or ``ties``) at coefficient ``scaling``."""
    t0 = time.perf_counter()
    out = merge_trees(job.cfg.merge, job.trained.pretrained, job.experts, method, scaling)
    job.add_time("merge", time.perf_counter() - t0)
    return out


def select_scaling(mcfg: ml_collections.ConfigDict, method: str, evaluate: Callable[[float], Mapping[str, float]],
                   *, log: Log = say) -> tuple[float, dict[float, float]]:
    """Picks the merge coefficient with the best average **validation** score.

    ``merge.scaling`` (if not None) fixes it instead. Candidates: ``merge.scalings``; ties go to
    the smaller coefficient.

    Args:
      mcfg: the config's ``merge`` section.
      method: the merge method (for the log line).
      evaluate: ``scaling -> {task: validation score}`` of the merge at that coefficient.
      log: where the choice is reported.

    Returns:
      ``(scaling, {candidate: validation average})`` (an empty dict when fixed).
    """
    fixed = mcfg.get("scaling")
    if fixed is not None:
        return float(fixed), {}
    scores = {}
    for s in mcfg.scalings:
        scores[float(s)] = float(np.mean(list(evaluate(float(s)).values())))
    best = max(scores, key=lambda s: (scores[s], -s))
    log(f"[epmq] {method}: merge coefficient {best:g} chosen on validation "
        f"({', '.join(f'{s:g}: {v:.1f}' for s, v in scores.items())})")
    return best, scores


def choose_scaling(job: Job, method: str) -> tuple[float, dict[float, float]]:
    """:func:`select_scaling` on the suite's validation splits.

    Returns:
      ``(scaling, {candidate: validation average})``.
    """
    return select_scaling(job.cfg.merge, method, lambda s: evaluate(
        job, merge_params(job, method, s), "validation", desc=f"{method} λ={s:g} (val)"), log=job.log)


# ----------------------------------------------------------------------------- calibration


def quant_spec(cfg: ml_collections.ConfigDict, bits: int):
    """The :class:`epmq_jax.quant.QuantSpec` of ``bits`` with the config's group size and symmetry."""
    from epmq_jax.quant import QuantSpec

    return QuantSpec(bits=int(bits), group_size=int(cfg.quant.group_size), symmetric=bool(cfg.quant.symmetric))


def calib_config(cfg: ml_collections.ConfigDict, v: Variant) -> tuple[Any, bool]:
    """The driver config (:class:`epmq_jax.calib.CalibConfig`) of a variant and whether it needs the experts.

    - ``rtn`` / ``gptq``: the ``gptq`` objective (targets from the merged layer, W* = W_m),
      rounded by RTN or GPTQ;
    - ``awq``: activation-aware scaling (and clipping) searched on the ``gptq`` statistics, then RTN;
    - ``epmq`` / ``epmq_unrounded``: the E-PMQ objective with the variant's switches, rounded by
      its ``rounding`` (``none`` keeps W*);
    - RegMean: the ``regmean`` objective (λ = 0, X̃ = X) left unrounded.

    Returns:
      ``(config, needs_experts)``: ``needs_experts`` is False only for the ``gptq`` objective.
    """
    from epmq_jax import calib

    ccfg = cfg.calib
    bits = v.bits if v.bits is not None else int(cfg.quant.bits[0])  # spec unused when unrounded
    if v.merge == "regmean":
        objective, rounding = calib.Objective(kind="regmean", task_weights=ccfg.task_weights), "none"
    elif v.method in ("rtn", "gptq", "awq"):
        objective, rounding = calib.Objective(kind="gptq"), v.method
    else:
        sw = v.sw
        objective = calib.Objective(kind="epmq", lam=sw["lam"], anchor=sw["anchor"], target=sw["target"],
                                    alpha=sw["alpha"] if sw["alpha"] is not None else float(ccfg.alpha),
                                    task_weights=sw["task_weights"])
        rounding = sw["rounding"]
    config = calib.CalibConfig(objective=objective, rounding=rounding, spec=quant_spec(cfg, bits),
                               damp=float(cfg.quant.damp), batch_size=int(ccfg.batch_size))
    return config, v.merge == "regmean" or objective.kind != "gptq"


def calibrate_variant(job: Job, v: Variant, start: Params) -> tuple[Params, list[dict]]:
    """Runs the sequential driver for one variant (:func:`calib_config`), from the float encoder ``start``.

    Returns:
      ``(params, stats)``: ``start`` with every calibrated kernel replaced (``QuantizedWeight``,
      or float for unrounded variants) and the per-layer solver statistics.
    """
    from epmq_jax import calib

    config, needs_experts = calib_config(job.cfg, v)
    adapter = calib.vit_adapter(job.trained.model(start))
    t0 = time.perf_counter()
    result = calib.calibrate(adapter, start, job.calib_inputs, config,
                             experts=job.experts if needs_experts else None, progress=bool(job.cfg.eval.progress))
    job.add_time("calibrate", time.perf_counter() - t0)
    return result.params, result.stats


def regmean_start(job: Job) -> Params:
    """RegMean's non-linear leaves (norms, embeddings, biases): the experts' simple average."""
    from epmq_jax import merge

    return merge.average(job.experts)


# ----------------------------------------------------------------------------- the run


def _config_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(cfg.to_json_best_effort())


def row_of(v: Variant, per_task: Mapping[str, float], scaling: float | None) -> dict[str, Any]:
    """The result row (see :mod:`epmq_jax.report`) of a scored variant."""
    return report.make_row(v.merge, v.method, per_task, bits=v.bits, block=v.block, default=v.default,
                           merge_scaling=scaling, **v.sw)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (the wall time depends on what else runs)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(cfg: ml_collections.ConfigDict, workdir: str | Path, *, plots: bool = True, log: Log = say) -> dict[str, Any]:
    """The whole job (module docstring); returns the results document also written to results.json."""
    if cfg.get("model", {}).get("family") in ("clip", "clip_vision", "t5"):  # Hugging Face checkpoints
        from epmq_jax import pipeline_hf
        return pipeline_hf.run(cfg, workdir, plots=plots, log=log)
    from tqdm.auto import tqdm

    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    job = prepare(cfg, workdir, log=log)
    variants = plan(cfg)
    stats_dir = job.workdir / "solver_stats"
    stats_dir.mkdir(exist_ok=True)
    merged: dict[str, tuple[Params, float]] = {}
    rows, checkpoints = [], {}
    bar = tqdm(variants, desc="variants", disable=not cfg.eval.progress)
    for v in bar:
        bar.set_postfix_str(v.name)
        scaling = None
        if v.merge == "expert":
            params: Any = job.experts
        elif v.merge == "regmean":
            params, stats = calibrate_variant(job, v, regmean_start(job))
        else:
            if v.merge not in merged:
                s, _ = choose_scaling(job, v.merge)
                merged[v.merge] = (merge_params(job, v.merge, s), s)
            start, scaling = merged[v.merge]
            params = start if v.method == "fp" else None
            if params is None:
                params, stats = calibrate_variant(job, v, start)
        if v.method != "fp" or v.merge == "regmean":
            (stats_dir / f"{v.name}.json").write_text(json.dumps(stats, indent=1))
        row = row_of(v, evaluate(job, params, "test", desc=v.name), scaling)
        rows.append(row)
        job.log(f"[epmq] {v.name:<32} avg {row['avg']:.1f}")
        if (v.block == "main" and v.method in cfg.quant.checkpoint_methods
                and v.bits == int(cfg.quant.checkpoint_bits)):
            path = job.workdir / "checkpoints" / v.name
            save_checkpoint(job, params, row, path)
            checkpoints[v.name] = str(path)
    job.timings["total"] = time.perf_counter() - t_start
    job.timings["cpu_total"] = _cpu_seconds() - cpu_start
    doc = {"rows": rows, "config": _config_dict(cfg), "timings": dict(job.timings),
           "notes": [SPLIT_NOTE], "checkpoints": checkpoints, "solver_stats": str(stats_dir)}
    report.write_json(job.workdir / "results.json", rows, config=doc["config"], timings=doc["timings"],
                      extra={"notes": doc["notes"], "checkpoints": checkpoints, "solver_stats": str(stats_dir)})
    write_report(report.read_json(job.workdir / "results.json"), job.workdir, plots=plots, log=log)
    return report.read_json(job.workdir / "results.json")


def write_report(doc: Mapping[str, Any], out_dir: str | Path, *, plots: bool = True, log: Log = say) -> list[Path]:
    """Writes results.md, results.csv (and the plots) from a results document and prints the table.

    Returns:
      The paths written.
    """
    from epmq_jax import plots as plots_mod

    out = Path(out_dir)
    rows = doc["rows"]
    name = doc.get("config", {}).get("name", out.name)
    notes = doc.get("notes", [SPLIT_NOTE])
    paths = [report.write_csv(out / "results.csv", rows),
             report.write_markdown(out / "results.md", rows, title=f"epmq results: {name}", notes=notes,
                                   timings=doc.get("timings"))]
    if plots:
        paths += plots_mod.plot_all(rows, out)
    log(report.format_table(rows, title=f"Test accuracy (%), {name}. " + " ".join(notes)))
    timings = doc.get("timings", {})
    if timings:
        log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    log(f"[epmq] wrote {', '.join(p.name for p in paths)} to {out}")
    return paths


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "epmq-offline-checkpoint/1"


def save_checkpoint(job: Job, params: Params, row: Mapping[str, Any], path: str | Path) -> Path:
    """Saves a (packed) encoder with the task heads, the config and its result row.

    Layout: ``path/tree`` (orbax, via :mod:`epmq_jax.checkpoint`: ``{"encoder": params,
    "heads": {task: head}}``, ``QuantizedWeight`` leaves kept packed) and ``path/meta.json``
    (format, config, row, tasks, logit scale, the suite's tfds directory).
    :func:`eval_checkpoint` needs nothing else but the suite's data (rebuilt from its sources
    if that directory is gone).
    """
    from epmq_jax import checkpoint

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path / "tree", {"encoder": params, "heads": job.trained.heads})
    meta = {"format": CHECKPOINT_FORMAT, "config": _config_dict(job.cfg), "row": dict(row),
            "tasks": job.tasks, "logit_scale": job.trained.logit_scale,
            "data_dir": str(data_dir(cache_dir(job.cfg, job.workdir)))}
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


def read_checkpoint_meta(path: Path, expected_format: str | None = None) -> dict[str, Any]:
    """Reads ``path/meta.json`` of a packed checkpoint (offline or Hugging Face run).

    Raises:
      ValueError: no ``meta.json``, or a format other than ``expected_format`` (if given).
    """
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{path} is not an epmq checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if expected_format is not None and meta.get("format") != expected_format:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {expected_format!r}")
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], Any, Params, dict[str, Any]]:
    """Reads a checkpoint of :func:`save_checkpoint`.

    Returns:
      ``(meta, graphdef, encoder_params, heads)``: the encoder's tree has the model's structure
      (rebuilt from the saved config), with its ``QuantizedWeight`` leaves still packed.

    Raises:
      ValueError: ``path`` is not such a checkpoint.
    """
    from epmq_jax import checkpoint, train

    path = Path(path)
    meta = read_checkpoint_meta(path, CHECKPOINT_FORMAT)
    graphdef, template = train.split_params(train.make_model(ml_collections.ConfigDict(meta["config"]).model))
    target = {"encoder": template, "heads": {t: {"kernel": 0} for t in meta["tasks"]}}
    tree = checkpoint.load(path / "tree", target=target)
    return meta, graphdef, tree["encoder"], tree["heads"]


def eval_checkpoint(path: str | Path, *, log: Log = say) -> dict[str, Any]:
    """Reloads a checkpoint, scores it on every task's test split and compares with its recorded row.

    A Hugging Face run's checkpoint (format :data:`epmq_jax.pipeline_hf.CHECKPOINT_FORMAT`) goes
    to :func:`epmq_jax.pipeline_hf.eval_checkpoint`.

    Returns:
      ``{"row": new row, "recorded": saved row, "matches_recorded": bool}`` (exact equality of
      every per-task accuracy).

    Raises:
      ValueError: ``path`` is not a checkpoint of either format.
    """
    from epmq_jax import pipeline_hf, train
    from epmq_jax.data import offline_suite

    if read_checkpoint_meta(Path(path)).get("format") == pipeline_hf.CHECKPOINT_FORMAT:
        return pipeline_hf.eval_checkpoint(path, log=log)
    meta, graphdef, encoder, heads = load_checkpoint(path)
    cfg = ml_collections.ConfigDict(meta["config"])
    trained = train.TrainedModels(graphdef, {}, {}, heads, float(meta["logit_scale"]), {})
    tfds_dir = meta.get("data_dir")
    suite = offline_suite.build_suite(cfg.suite, data_dir=tfds_dir if tfds_dir and Path(tfds_dir).is_dir() else None)
    job = Job(cfg, Path(path), suite, trained, [], {}, log)
    rec = meta["row"]
    per_task = evaluate(job, encoder, "test", desc=Path(path).name)
    row = report.make_row(rec["merge"], rec["method"], per_task, bits=rec["bits"], block=rec["block"],
                          default=rec["default"], merge_scaling=rec["merge_scaling"],
                          **{k: rec[k] for k in SWITCHES})
    match = row["per_task"] == rec["per_task"]
    log(report.format_table([row], title=f"Test accuracy (%) of the checkpoint {path}"))
    log(f"[epmq] {'reproduces' if match else 'DOES NOT reproduce'} the recorded row "
        f"(avg {rec['avg']:.2f} recorded, {row['avg']:.2f} now)")
    return {"row": row, "recorded": rec, "matches_recorded": match}


# ----------------------------------------------------------------------------- single steps


def merge_command(cfg: ml_collections.ConfigDict, workdir: str | Path, method: str, *,
                  scaling: float | None = None, log: Log = say) -> dict[str, Any]:
    """``epmq merge``: merge with one method, score on test, save to ``WORKDIR/checkpoints/<method>_fp``."""
    job = prepare(cfg, workdir, log=log)
    if scaling is None:
        scaling, _ = choose_scaling(job, method)
    params = merge_params(job, method, scaling)
    v = Variant(method, "fp")
    row = row_of(v, evaluate(job, params, "test", desc=v.name), scaling)
    path = save_checkpoint(job, params, row, job.workdir / "checkpoints" / v.name)
    log(report.format_table([row], title=f"Test accuracy (%): {report.MERGE_NAMES.get(method, method)} "
                            f"(coefficient {scaling:g}), saved to {path}"))
    return row


def quantize_command(cfg: ml_collections.ConfigDict, workdir: str | Path, merge: str, method: str, bits: int, *,
                     out: str | Path | None = None, log: Log = say) -> dict[str, Any]:
    """``epmq quantize``: one merge, one quantizer; scores on test, saves the packed checkpoint."""
    job = prepare(cfg, workdir, log=log)
    scaling, _ = choose_scaling(job, merge)
    is_epmq = method == "epmq"
    v = Variant(merge, method, int(bits), default=is_epmq, switches=epmq_switches(cfg.calib) if is_epmq else ())
    params, stats = calibrate_variant(job, v, merge_params(job, merge, scaling))
    (job.workdir / "solver_stats").mkdir(exist_ok=True)
    (job.workdir / "solver_stats" / f"{v.name}.json").write_text(json.dumps(stats, indent=1))
    row = row_of(v, evaluate(job, params, "test", desc=v.name), scaling)
    path = save_checkpoint(job, params, row, Path(out) if out else job.workdir / "checkpoints" / v.name)
    log(report.format_table([row], title=f"Test accuracy (%): {v.name}, saved to {path}"))
    return row


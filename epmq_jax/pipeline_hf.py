"""The benchmark job on Hugging Face checkpoints (the paper's configs): merge -> quantize -> evaluate.

:func:`run` is what ``epmq run`` calls (through :func:`epmq_jax.pipeline.run`) when
``model.family`` is one of:

- ``"clip"`` / ``"clip_vision"`` (configs/clip_vit_*.py): the base ``CLIPModel`` and one
  fine-tuned vision tower per task (FusionBench's experts are ``CLIPVisionModel`` checkpoints
  without projection: they get the base model's ``visual_projection``). The vision towers are
  merged and quantized; each task is scored with its own frozen zero-shot head, built from the
  base text tower over the task's class names and templates
  (:func:`epmq_jax.models.zeroshot.zeroshot_head`). Images come from the task registry
  (:mod:`epmq_jax.data.registry`), preprocessed as ``CLIPImageProcessor`` does
  (:mod:`epmq_jax.models.preprocess`); calibration images from each task's train split
  (:func:`epmq_jax.data.calibration.sample_calibration`); calibration through the ViT adapter.
- ``"t5"`` (configs/flan_t5_base_glue.py): FLAN-T5 merged over GLUE, calibrated on
  teacher-forced train examples (:func:`epmq_jax.data.glue.calibration_inputs`,
  :func:`epmq_jax.calib.adapters_t5.t5_adapter`) and scored by greedy generation on each task's
  evaluation split (:func:`epmq_jax.eval.glue.evaluate_glue`; the score in percent, per
  ``eval.metric_style``).

The variants, rows, report files, plots and solver statistics are those of the offline job
(:func:`epmq_jax.pipeline.plan`, :func:`~epmq_jax.pipeline.row_of`,
:func:`~epmq_jax.pipeline.write_report`); the run directory follows the same contract
(docs/internals.md), with checkpoints in the format ``epmq-hf-checkpoint/1``
(:func:`save_checkpoint`, :func:`load_checkpoint`, :func:`eval_checkpoint`).

Only the kernels the family's calibration adapter names are quantized; ``quant.filter`` must
select exactly those (checked at the start, so a config that means something else fails at once).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from epmq_jax import report
from epmq_jax.pipeline import (
    Log,
    Variant,
    calib_config,
    dequantize_tree,
    merge_trees,
    plan,
    read_checkpoint_meta,
    row_of,
    say,
    select_scaling,
    write_report,
)

Params = dict[str, Any]
FAMILIES = ("clip", "clip_vision", "t5")
CHECKPOINT_FORMAT = "epmq-hf-checkpoint/1"


# ----------------------------------------------------------------------------- the model family


@dataclasses.dataclass
class Models:
    """The loaded models of a run and how to score a parameter tree on one task.

    Attributes:
      family: ``"clip"`` or ``"t5"``.
      graphdef: graph definition of the merged model (CLIP: the vision tower with projection).
      base: the base model's parameters (pure nested dict; what is merged and quantized).
      experts: one parameter tree per task (config task order), same structure as ``base``.
      adapter: the calibration adapter (:mod:`epmq_jax.calib`).
      heads: CLIP: ``{task: (projection_dim, n_classes)}`` zero-shot heads; T5: empty.
      score: ``(float params, task, split) -> (percent, metrics)``.
    """

    family: str
    graphdef: Any
    base: Params
    experts: list[Params]
    adapter: Any
    heads: dict[str, np.ndarray]
    score: Callable[[Params, str, str], tuple[float, dict[str, float]]]


def _family(cfg: ml_collections.ConfigDict) -> str:
    fam = cfg.model.get("family")
    if fam not in FAMILIES:
        raise ValueError(f"model.family={fam!r}; pipeline_hf runs {FAMILIES}")
    return "clip" if fam.startswith("clip") else "t5"


def _data_dir(cfg: ml_collections.ConfigDict) -> str:
    """``data.data_dir``, else ``$TFDS_DATA_DIR``, else tfds' default ``~/tensorflow_datasets``."""
    return (cfg.data.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
            or os.path.expanduser("~/tensorflow_datasets"))


def _pure(module: nnx.Module) -> tuple[Any, Params]:
    graphdef, state = nnx.split(module, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def _expert_paths(cfg: ml_collections.ConfigDict, tasks: Sequence[str]) -> list[str]:
    experts = cfg.model.experts
    missing = [t for t in tasks if t not in experts]
    if missing:
        raise ValueError(f"model.experts has no checkpoint for tasks {missing} of data.tasks")
    return [experts[t] for t in tasks]


def _batched(n: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@functools.lru_cache(maxsize=8)
def _image_features_fn(graphdef: Any) -> Callable:
    return jax.jit(lambda params, pixels: nnx.merge(graphdef, params).get_image_features(pixels))


def clip_accuracy(graphdef: Any, params: Params, head: np.ndarray, task: str, split: str,
                  data_dir: str, *, image_size: int, batch_size: int, limit: int | None = None) -> float:
    """Zero-shot accuracy (percent) of a CLIP vision tower on a task's split.

    Images are read and preprocessed batch by batch (one batch ahead, in a thread, while the
    device runs the previous one); the last batch is zero-padded so one compile serves all.

    Args:
      graphdef, params: the vision tower (float kernels), ``get_image_features`` NHWC -> (B, P).
      head: ``(P, n_classes)`` zero-shot head of ``task``.
      task, split, data_dir: the registry task and split.
      image_size: CLIP input side (resize shortest side + center crop).
      batch_size: images per forward pass.
      limit: score only the first ``limit`` examples (quick checks).
    """
    from epmq_jax.data import registry, tfds_local
    from epmq_jax.models.preprocess import preprocess_images
    from epmq_jax.models.zeroshot import classify

    src = registry.resolve_task(task, data_dir)
    if split not in src.splits:
        raise ValueError(f"Task '{task}' has no split '{split}'; it has {sorted(src.splits)}")
    n = len(tfds_local.open_split(src.dataset, src.splits[split], data_dir))
    n = n if limit is None else min(n, int(limit))
    if n == 0:
        raise ValueError(f"Task '{task}' split '{split}' under {data_dir} is empty")
    fn = _image_features_fn(graphdef)
    head = jnp.asarray(head)

    def load(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        data = registry.load_task_split(task, split, data_dir, indices=idx)
        x = preprocess_images(data["image"], size=image_size, crop_size=image_size)
        pad = batch_size - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        return x, np.asarray(data["label"])

    correct = 0
    batches = _batched(n, batch_size)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(load, batches[0])
        for i in range(len(batches)):
            x, y = nxt.result()
            if i + 1 < len(batches):
                nxt = pool.submit(load, batches[i + 1])
            pred = np.asarray(jnp.argmax(classify(fn(params, x), head), axis=-1))[: len(y)]
            correct += int(np.sum(pred == y))
    return 100.0 * correct / n


def load_clip(cfg: ml_collections.ConfigDict, tasks: Sequence[str], *, log: Log = say,
              with_experts: bool = True, heads: Mapping[str, np.ndarray] | None = None) -> Models:
    """Loads the base CLIP, the expert vision towers and builds the zero-shot heads.

    ``with_experts=False`` skips the experts; ``heads`` (e.g. from a checkpoint) skips building them.

    Raises:
      ValueError: the base is not a two-tower CLIP checkpoint, an expert is not a CLIP vision
        tower, or ``data.image_size`` disagrees with the base model's.
    """
    from epmq_jax.calib import vit_adapter
    from epmq_jax.models import CLIPModel, CLIPVisionModelWithProjection, from_pretrained
    from epmq_jax.models.zeroshot import hf_tokenizer, zeroshot_head

    base = from_pretrained(cfg.model.base)
    if not isinstance(base, CLIPModel):
        raise ValueError(f"model.base {cfg.model.base}: a CLIP checkpoint (model_type 'clip', both "
                         f"towers) is needed for the zero-shot heads; got {type(base).__name__}")
    vision = base.vision_model
    image_size = int(vision.config.image_size)
    if int(cfg.data.get("image_size", image_size)) != image_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} but the base model "
                         f"{cfg.model.base} takes {image_size}x{image_size} images")
    graphdef, base_params = _pure(vision)
    experts = []
    for task, path in zip(tasks, _expert_paths(cfg, tasks) if with_experts else []):
        m = from_pretrained(path)
        m = m.vision_model if isinstance(m, CLIPModel) else m
        if not isinstance(m, CLIPVisionModelWithProjection):
            raise ValueError(f"model.experts[{task!r}] = {path}: expected a CLIP vision checkpoint, "
                             f"got {type(m).__name__}")
        if m.visual_projection is None:  # FusionBench's CLIPVisionModel experts
            # the None attribute is static in nnx: nnx.data marks the new value as data
            m.visual_projection = nnx.data(nnx.clone(vision.visual_projection))
        experts.append(_pure(m)[1])
    if heads is None:
        tokenizer = cfg.model.get("tokenizer") or cfg.model.base
        tokenize = hf_tokenizer(tokenizer, max_length=int(base.config.text_config.max_position_embeddings))
        t0 = time.perf_counter()
        heads = {t: np.asarray(zeroshot_head(base, tokenize, t)) for t in tasks}
        log(f"[epmq] {len(heads)} zero-shot heads in {time.perf_counter() - t0:.1f}s")
    data_dir, bs = _data_dir(cfg), int(cfg.eval.batch_size)
    limit = cfg.eval.get("limit")

    def score(params: Params, task: str, split: str) -> tuple[float, dict[str, float]]:
        acc = clip_accuracy(graphdef, params, models.heads[task], task, split, data_dir,
                            image_size=image_size, batch_size=bs, limit=limit)
        return acc, {"accuracy": acc / 100.0}

    models = Models("clip", graphdef, base_params, experts, vit_adapter(vision), dict(heads), score)
    return models


def _t5_tokenizer(name: str) -> tuple[Callable[[str], list[int]], Callable[[Sequence[int]], str]]:
    """``(tokenize, decode)`` of a transformers tokenizer; ``tokenize`` ends every text in ``</s>``."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(name)
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {name} has no eos token; T5 needs one")

    def tokenize(text: str) -> list[int]:
        ids = list(tok(text).input_ids)
        return ids if ids and ids[-1] == eos else [*ids, eos]

    return tokenize, lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def load_t5(cfg: ml_collections.ConfigDict, tasks: Sequence[str], *, log: Log = say,
            with_experts: bool = True) -> Models:
    """Loads the base FLAN-T5, the GLUE experts and the tokenizer.

    Raises:
      ValueError: a checkpoint that is not a T5, or an unknown GLUE task.
    """
    from epmq_jax.calib.adapters_t5 import t5_adapter
    from epmq_jax.data import glue
    from epmq_jax.eval.glue import evaluate_glue
    from epmq_jax.models import T5ForConditionalGeneration, from_pretrained

    for t in tasks:
        glue.get_task(t)
    base = from_pretrained(cfg.model.base)
    if not isinstance(base, T5ForConditionalGeneration):
        raise ValueError(f"model.base {cfg.model.base}: expected a T5 checkpoint, got {type(base).__name__}")
    graphdef, base_params = _pure(base)
    experts = []
    for task, path in zip(tasks, _expert_paths(cfg, tasks) if with_experts else []):
        m = from_pretrained(path)
        if not isinstance(m, T5ForConditionalGeneration):
            raise ValueError(f"model.experts[{task!r}] = {path}: expected a T5 checkpoint, got {type(m).__name__}")
        experts.append(_pure(m)[1])
    tokenize, decode = _t5_tokenizer(cfg.model.get("tokenizer") or cfg.model.base)
    mc, data_dir = base.config, _data_dir(cfg)
    max_new = int(cfg.eval.get("max_new_tokens", 9))

    def score(params: Params, task: str, split: str) -> tuple[float, dict[str, float]]:
        del split  # GLUE: always the task's evaluation split (checked in choose_scaling)
        model = nnx.merge(graphdef, params)
        out = evaluate_glue(lambda ids, mask: model.generate(ids, mask, max_new_tokens=max_new),
                            tokenize, decode, [task], data_dir,
                            max_length=int(cfg.data.get("max_length", 256)),
                            batch_size=int(cfg.eval.batch_size), limit=cfg.eval.get("limit"),
                            style=cfg.eval.get("metric_style", "fusion_bench"),
                            eos_id=int(mc.eos_token_id), pad_id=int(mc.pad_token_id))[task]
        return 100.0 * out["score"], out

    return Models("t5", graphdef, base_params, experts, t5_adapter(base), {}, score)


def calibration_inputs(cfg: ml_collections.ConfigDict, family: str, tasks: Sequence[str]) -> list[Any]:
    """Per task (config order): ``calib.n_per_task`` train examples as model inputs.

    CLIP: preprocessed images float32 ``(n, S, S, 3)``; T5: teacher-forced token batches
    (:func:`epmq_jax.data.glue.calibration_inputs`).
    """
    n, seed, data_dir = int(cfg.calib.n_per_task), int(cfg.calib.seed), _data_dir(cfg)
    split = cfg.data.get("calib_split", "train")
    if family == "clip":
        from epmq_jax.data.calibration import sample_calibration
        from epmq_jax.models.hf import load_config, resolve_checkpoint
        from epmq_jax.models.preprocess import preprocess_images

        size = int(load_config(resolve_checkpoint(cfg.model.base))["vision_config"]["image_size"])
        data = sample_calibration(tasks, n, data_dir, seed=seed, split=split)
        return [preprocess_images(data[t]["image"], size=size, crop_size=size) for t in tasks]
    from epmq_jax.data import glue

    tokenize, _ = _t5_tokenizer(cfg.model.get("tokenizer") or cfg.model.base)
    return [glue.calibration_inputs(t, data_dir, n, tokenize, seed=seed,
                                    max_length=int(cfg.data.get("max_length", 256)),
                                    max_target_length=int(cfg.data.get("max_target_length", 8)))
            for t in tasks]


def check_quant_filter(cfg: ml_collections.ConfigDict, adapter: Any, params: Params) -> list[str]:
    """The kernels the adapter calibrates, checked against ``quant.filter``.

    Returns:
      The calibrated kernel paths (``"encoder/layers/0/self_attn/q_proj/kernel"``, ...).

    Raises:
      ValueError: ``quant.filter`` (when set) misses one of them or selects another kernel.
    """
    from epmq_jax._tree import iter_paths

    blocks = adapter.block_paths(params)
    calibrated = ["/".join(str(p) for p in (*b, rel)) for k, b in enumerate(blocks)
                  for g in adapter.linear_groups(adapter.block_kind(k)) for rel in g]
    pattern = cfg.quant.get("filter") or ""
    if pattern:
        rx = re.compile(pattern)
        kernels = [p for p in iter_paths(params) if p.endswith("kernel")]
        selected = {p for p in kernels if rx.search(p)}
        missed = sorted(set(calibrated) - selected)
        extra = sorted(selected - set(calibrated))
        if missed or extra:
            raise ValueError(f"quant.filter={pattern!r} must select exactly the kernels the "
                             f"calibration adapter quantizes ({len(calibrated)}, e.g. {calibrated[0]}); "
                             f"it misses {missed[:3]} and adds {extra[:3]}")
    return calibrated


# ----------------------------------------------------------------------------- the job


@dataclasses.dataclass
class HFJob:
    """What every step of a run shares.

    Attributes:
      cfg, workdir, tasks: the config, the run directory, the task names (config order).
      models: the loaded :class:`Models`.
      calib_inputs: per task, its calibration inputs (:func:`calibration_inputs`).
      timings: seconds per stage, accumulated. metrics: per variant name, per task, every
        metric of the evaluation (GLUE: accuracy / correlations, ``unparsed``, ``n``).
    """

    cfg: ml_collections.ConfigDict
    workdir: Path
    tasks: list[str]
    models: Models
    calib_inputs: list[Any]
    timings: dict[str, float]
    log: Log = say
    metrics: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


def prepare(cfg: ml_collections.ConfigDict, workdir: str | Path, *, log: Log = say) -> HFJob:
    """Loads the checkpoints, builds the heads / tokenizer, samples the calibration data."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    family = _family(cfg)
    tasks = list(cfg.data.tasks)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log(f"[epmq] loading {cfg.model.base} and {len(tasks)} experts ...")
    models = (load_clip if family == "clip" else load_t5)(cfg, tasks, log=log)
    check_quant_filter(cfg, models.adapter, models.base)
    timings["load_models"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = calibration_inputs(cfg, family, tasks)
    timings["calibration_data"] = time.perf_counter() - t0
    return HFJob(cfg, workdir, tasks, models, inputs, timings, log)


def evaluate(job: HFJob, params: Params | Sequence[Params], split: str, *, name: str = "") -> dict[str, float]:
    """Score (percent) on every task's ``split``: one tree for all tasks, or one per task (FP experts).

    The per-task metrics are kept in ``job.metrics[name]``.
    """
    per_task = isinstance(params, list | tuple)
    trees = [dequantize_tree(p) for p in params] if per_task else [dequantize_tree(params)] * len(job.tasks)
    t0 = time.perf_counter()
    out, metrics = {}, {}
    for task, tree in zip(job.tasks, trees):
        out[task], metrics[task] = job.models.score(tree, task, split)
    if name:
        job.metrics[name] = metrics
    job.add_time("evaluate", time.perf_counter() - t0)
    return out


def choose_scaling(job: HFJob, method: str) -> float:
    """``merge.scaling`` if set, else the candidate of ``merge.scalings`` best on validation
    (:func:`epmq_jax.pipeline.select_scaling`).

    Raises:
      ValueError: selection asked for on GLUE, whose validation split is the evaluation split.
    """
    if job.cfg.merge.get("scaling") is None and job.models.family == "t5":
        raise ValueError("merge.scaling is None, but GLUE's validation split is where the T5 "
                         "models are scored; set merge.scaling (the paper uses 0.3)")
    t0 = time.perf_counter()
    best, scores = select_scaling(job.cfg.merge, method, lambda s: evaluate(
        job, merge_trees(job.cfg.merge, job.models.base, job.models.experts, method, s), "validation"), log=job.log)
    if scores:
        job.add_time("select_merge_on_validation", time.perf_counter() - t0)
    return best


def calibrate_variant(job: HFJob, v: Variant, start: Params) -> tuple[Params, list[dict]]:
    """Runs the sequential driver for one variant from the float model ``start``.

    Returns:
      ``(params, stats)``: calibrated kernels replaced (``QuantizedWeight`` or float W*), and
      the per-layer solver statistics.
    """
    from epmq_jax import calib

    config, needs_experts = calib_config(job.cfg, v)
    t0 = time.perf_counter()
    result = calib.calibrate(job.models.adapter, start, job.calib_inputs, config,
                             experts=job.models.experts if needs_experts else None,
                             progress=bool(job.cfg.eval.progress))
    job.add_time("calibrate", time.perf_counter() - t0)
    return result.params, result.stats


def _score_note(job: HFJob) -> str:
    if job.models.family == "clip":
        return ("Accuracies are on each task's test split with its zero-shot head; the merge "
                "coefficient is fixed by the config or chosen on the validation splits; E-PMQ's λ "
                "and switches are fixed by the config.")
    style = job.cfg.eval.get("metric_style", "fusion_bench")
    return (f"Scores (%) on each GLUE task's validation split (MNLI: validation_matched), "
            f"metric style '{style}' (a correlation, STS-B's Spearman or CoLA's MCC, can be negative); "
            "the merge coefficient is fixed by the config; E-PMQ's λ and switches are fixed by the config.")


def run(cfg: ml_collections.ConfigDict, workdir: str | Path, *, plots: bool = True, log: Log = say) -> dict[str, Any]:
    """The whole job (module docstring); returns the results document also written to results.json."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    job = prepare(cfg, workdir, log=log)
    stats_dir = job.workdir / "solver_stats"
    stats_dir.mkdir(exist_ok=True)
    merged: dict[str, tuple[Params, float]] = {}
    rows, checkpoints = [], {}
    bar = tqdm(plan(cfg), desc="variants", disable=not cfg.eval.progress)
    for v in bar:
        bar.set_postfix_str(v.name)
        scaling = None
        if v.merge == "expert":
            params: Any = job.models.experts
        elif v.merge == "regmean":
            from epmq_jax import merge

            params, stats = calibrate_variant(job, v, merge.average(job.models.experts))
        else:
            if v.merge not in merged:
                s = choose_scaling(job, v.merge)
                merged[v.merge] = (merge_trees(cfg.merge, job.models.base, job.models.experts, v.merge, s), s)
            start, scaling = merged[v.merge]
            if v.method == "fp":
                params = start
            else:
                params, stats = calibrate_variant(job, v, start)
        if v.method != "fp" or v.merge == "regmean":
            (stats_dir / f"{v.name}.json").write_text(json.dumps(stats, indent=1))
        split = cfg.data.get("eval_split", "test")
        row = row_of(v, evaluate(job, params, split, name=v.name), scaling)
        rows.append(row)
        job.log(f"[epmq] {v.name:<32} avg {row['avg']:.1f}")
        if (v.block == "main" and v.method in cfg.quant.checkpoint_methods
                and v.bits == int(cfg.quant.checkpoint_bits)):
            path = job.workdir / "checkpoints" / v.name
            save_checkpoint(job, params, row, path)
            checkpoints[v.name] = str(path)
    job.timings["total"] = time.perf_counter() - t_start
    (job.workdir / "metrics.json").write_text(json.dumps(job.metrics, indent=1))
    notes = [_score_note(job)]
    config = json.loads(cfg.to_json_best_effort())
    report.write_json(job.workdir / "results.json", rows, config=config, timings=dict(job.timings),
                      extra={"notes": notes, "checkpoints": checkpoints, "solver_stats": str(stats_dir),
                             "metrics": str(job.workdir / "metrics.json")})
    doc = report.read_json(job.workdir / "results.json")
    write_report(doc, job.workdir, plots=plots, log=log)
    return doc


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(job: HFJob, params: Params, row: Mapping[str, Any], path: str | Path) -> Path:
    """Saves a (packed) merged model with the zero-shot heads (CLIP), the config and its row.

    Layout: ``path/tree`` (orbax via :mod:`epmq_jax.checkpoint`: ``{"model": params, "heads":
    {task: {"kernel": (P, n_classes)}}}``, ``QuantizedWeight`` leaves kept packed; T5 has no
    heads) and ``path/meta.json`` (format, family, config, row, tasks).
    """
    from epmq_jax import checkpoint

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tree: dict[str, Any] = {"model": params}
    if job.models.heads:
        tree["heads"] = {t: {"kernel": h} for t, h in job.models.heads.items()}
    checkpoint.save(path / "tree", tree)
    meta = {"format": CHECKPOINT_FORMAT, "family": job.models.family,
            "config": json.loads(job.cfg.to_json_best_effort()), "row": dict(row), "tasks": job.tasks}
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], Models, Params]:
    """Reads a checkpoint of :func:`save_checkpoint`.

    The model structure comes from the base checkpoint named in the saved config (it must be
    reachable); the experts are not loaded.

    Returns:
      ``(meta, models, params)``: ``models`` with the saved heads (CLIP) and ``params`` with its
      ``QuantizedWeight`` leaves still packed.

    Raises:
      ValueError: ``path`` is not such a checkpoint.
    """
    from epmq_jax import checkpoint

    path = Path(path)
    meta = read_checkpoint_meta(path, CHECKPOINT_FORMAT)
    cfg, tasks = ml_collections.ConfigDict(meta["config"]), list(meta["tasks"])
    if meta["family"] == "clip":
        models = load_clip(cfg, tasks, with_experts=False, heads={t: None for t in tasks})
        tree = checkpoint.load(path / "tree", target={"model": models.base,
                                                      "heads": {t: {"kernel": 0} for t in tasks}})
        models.heads = {t: np.asarray(tree["heads"][t]["kernel"]) for t in tasks}
    else:
        models = load_t5(cfg, tasks, with_experts=False)
        tree = checkpoint.load(path / "tree", target={"model": models.base})
    return meta, models, tree["model"]


def eval_checkpoint(path: str | Path, *, log: Log = say) -> dict[str, Any]:
    """Reloads a checkpoint, scores it again and compares with its recorded row.

    Returns:
      ``{"row": new row, "recorded": saved row, "matches_recorded": bool}`` (exact equality of
      every per-task score).
    """
    meta, models, params = load_checkpoint(path)
    cfg = ml_collections.ConfigDict(meta["config"])
    job = HFJob(cfg, Path(path), list(meta["tasks"]), models, [], {}, log)
    rec = meta["row"]
    per_task = evaluate(job, params, cfg.data.get("eval_split", "test"))
    row = report.make_row(rec["merge"], rec["method"], per_task, bits=rec["bits"], block=rec["block"],
                          default=rec["default"], merge_scaling=rec["merge_scaling"],
                          **{k: rec[k] for k in report.SWITCH_KEYS})
    match = row["per_task"] == rec["per_task"]
    log(report.format_table([row], title=f"Scores (%) of the checkpoint {path}"))
    log(f"[epmq] {'reproduces' if match else 'DOES NOT reproduce'} the recorded row "
        f"(avg {rec['avg']:.2f} recorded, {row['avg']:.2f} now)")
    return {"row": row, "recorded": rec, "matches_recorded": match}

"""Packed checkpoints of a run's models, and scoring them again (``epmq eval --checkpoint``).

Layout of a checkpoint directory ``path``:

- ``path/tree``: an orbax checkpoint (:mod:`epmq_jax.checkpoint`) of ``{"model": params, ...}``
  (``QuantizedWeight`` leaves stay packed) plus what the task pool needs to score without the
  experts (:meth:`~epmq_jax.pipeline.pools.TaskPool.checkpoint_state`, e.g. ``heads``);
- ``path/meta.json``: ``format`` (:data:`FORMAT`), the run's ``config``, the pool kinds, the
  result ``row``, the ``tasks``, the task pool's metadata and the run directory.

:func:`eval_checkpoint` rebuilds both pools from the saved config (the model pool only for its
structure: nothing is trained, no expert is loaded), scores the model on the task pool's
reported split and compares every per-task score with the recorded row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from epmq_jax import report
from epmq_jax.pipeline.kinds import build_pools
from epmq_jax.pipeline.pools import Context, Log, ModelPool, Params, TaskPool, say
from epmq_jax.pipeline.stages import score

FORMAT = "epmq-checkpoint/2"


def config_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON."""
    return json.loads(cfg.to_json_best_effort())


def save_checkpoint(ctx: Context, model_pool: ModelPool, task_pool: TaskPool, params: Params,
                    row: Mapping[str, Any], path: str | Path) -> Path:
    """Saves a (packed) model with what its task pool needs, the config and its row (module docstring)."""
    from epmq_jax import checkpoint

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays, pool_meta = task_pool.checkpoint_state()
    if "model" in arrays:
        raise ValueError(f"task pool '{task_pool.kind}': checkpoint_state() may not use the key 'model'")
    checkpoint.save(path / "tree", {"model": params, **arrays})
    meta = {"format": FORMAT, "config": config_dict(ctx.cfg), "model_pool": model_pool.kind,
            "task_pool": task_pool.kind, "task_pool_meta": pool_meta, "row": dict(row),
            "tasks": list(task_pool.tasks), "workdir": str(ctx.workdir.absolute())}
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path / "meta.json")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """Reads ``path/meta.json``.

    Raises:
      ValueError: no or unreadable ``meta.json``, or another format.
    """
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{path} is not an epmq checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path}: format {got!r}, expected {FORMAT!r} (written by another "
                         "version of epmq-jax? rerun the job that made it)")
    return meta


def _restructure(template: Params, nested: Any, where: str) -> Params:
    """``nested`` (string-keyed dicts from a target-less load) in the structure of ``template``."""
    from epmq_jax._tree import path_str

    def take(kp, _):
        node = nested
        for key in path_str(kp).split("/"):
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(f"{where}: the checkpoint has no leaf '{path_str(kp)}' of the model")
            node = node[key]
        return node

    return jax.tree_util.tree_map_with_path(take, template)


def load_checkpoint(path: str | Path, *, log: Log = say) -> tuple[dict[str, Any], Context, ModelPool, TaskPool, Params]:
    """Reads a checkpoint of :func:`save_checkpoint`.

    Returns:
      ``(meta, ctx, model_pool, task_pool, params)``: the pools rebuilt from the saved config
      (the task pool with the saved heads), and ``params`` in the model's structure with its
      ``QuantizedWeight`` leaves still packed.

    Raises:
      ValueError: ``path`` is not such a checkpoint.
    """
    from epmq_jax import checkpoint

    path = Path(path)
    meta = read_meta(path)
    cfg = ml_collections.ConfigDict(meta["config"])
    workdir = Path(meta.get("workdir", ""))
    ctx = Context(cfg, workdir if workdir.is_dir() else path, log)
    tree = checkpoint.load(path / "tree")
    extras = {k: v for k, v in tree.items() if k != "model"}
    model_pool, task_pool = build_pools(ctx, {"arrays": extras, "meta": meta.get("task_pool_meta", {})})
    params = _restructure(model_pool.abstract_params(), tree["model"], str(path))
    return meta, ctx, model_pool, task_pool, params


def eval_checkpoint(path: str | Path, *, log: Log = say) -> dict[str, Any]:
    """Reloads a checkpoint, scores it on the task pool's reported split, compares with its row.

    Returns:
      ``{"row": new row, "recorded": saved row, "matches_recorded": bool}`` (exact equality of
      every per-task score).

    Raises:
      ValueError: ``path`` is not a checkpoint.
    """
    meta, ctx, _, task_pool, params = load_checkpoint(path, log=log)
    rec = meta["row"]
    per_task = {t: r["score"] for t, r in score(task_pool, ctx, params, task_pool.report_split).items()}
    row = report.make_row(rec["merge"], rec["method"], per_task, bits=rec["bits"], block=rec["block"],
                          default=rec["default"], merge_scaling=rec["merge_scaling"],
                          settings=rec.get("settings"), **{k: rec[k] for k in report.SWITCH_KEYS})
    match = row["per_task"] == rec["per_task"]
    log(report.format_table([row], title=f"Scores (%) of the checkpoint {path}"))
    log(f"[epmq] {'reproduces' if match else 'DOES NOT reproduce'} the recorded row "
        f"(avg {rec['avg']:.2f} recorded, {row['avg']:.2f} now)")
    return {"row": row, "recorded": rec, "matches_recorded": match}


def _tokenizer_source(model_pool_cfg: Any, log: Callable[[str], None]) -> Path | None:
    """The local directory holding a run's tokenizer / processor files, if there is one."""
    from epmq_jax import export_hf

    src = model_pool_cfg.get("tokenizer") or model_pool_cfg.get("base")
    if not src:
        return None
    d = Path(str(src)).expanduser()
    if not d.is_dir():
        try:
            import huggingface_hub

            d = Path(huggingface_hub.snapshot_download(str(src), local_files_only=True,
                                                       revision=model_pool_cfg.get("revision")))
        except Exception:    # not cached, no huggingface_hub: the export goes without it
            log(f"[epmq] tokenizer files of {src} are not on this machine; not copied")
            return None
    return d if any((d / f).is_file() for f in export_hf.TOKENIZER_FILES) else None


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      checkpoint_format: str = "gptq", overwrite: bool = False,
                      log: Callable[[str], None] | None = None) -> Path:
    """``epmq export``: a run's packed checkpoint (this module) as a Hugging Face GPTQ directory
    (:func:`epmq_jax.export_hf.save_pretrained`).

    The model pool rebuilt from the checkpoint's config gives the model (the vision tower for
    CLIP runs, written as a ``CLIPVisionModelWithProjection``; T5; Llama-family decoders) and
    its tokenizer files (``model_pool.tokenizer`` or ``model_pool.base`` when they are on this
    machine). A GPTQ or E-PMQ row with GPTQ rounding adds ``damp_percent`` (``quant.damp``) and
    ``true_sequential``; the row's merge and method go into ``quantization_config.meta``.

    Raises:
      ValueError: ``checkpoint`` is not a run checkpoint, or see
        :func:`epmq_jax.export_hf.save_pretrained`.
    """
    from flax import nnx

    from epmq_jax import export_hf
    from epmq_jax.models import gptq_format

    log = log or say
    if checkpoint_format not in gptq_format.CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; expected one of "
                         f"{gptq_format.CHECKPOINT_FORMATS}")
    export_hf.check_out_dir(Path(out_dir), overwrite)      # before the (slow) load
    meta, ctx, model_pool, _, params = load_checkpoint(checkpoint, log=log)
    model = nnx.merge(model_pool.graphdef, model_pool.abstract_params())
    row, cfg = meta["row"], ctx.cfg
    extra: dict[str, Any] = {"meta": {"epmq_merge": row["merge"], "epmq_method": row["method"]}}
    if row["method"] in ("gptq", "epmq") and row.get("rounding") in (None, "gptq"):
        extra["true_sequential"] = True
        damp = float(cfg.quant.damp)
        if 0 < damp < 1:      # the range transformers' GPTQConfig accepts
            extra["damp_percent"] = damp
    out = export_hf.save_pretrained(model.config, params, out_dir, checkpoint_format=checkpoint_format,
                          tokenizer_dir=_tokenizer_source(cfg.model_pool, log),
                          quantization_config=extra, overwrite=overwrite)
    log(f"[epmq] wrote {out} ({checkpoint_format}) from {checkpoint}")
    return out

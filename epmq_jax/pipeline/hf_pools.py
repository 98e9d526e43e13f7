"""Hugging Face checkpoints as pools: CLIP vision towers with zero-shot heads, FLAN-T5 on GLUE.

Model pools (``model_pool.kind``), options in the ``model_pool`` section (``base``, ``experts``
``{task: path or repo id}``, ``tokenizer``, ``revision``, ``dtype``):

- ``hf_clip``: the base ``CLIPModel`` and one fine-tuned vision tower per task (FusionBench's
  experts are ``CLIPVisionModel`` checkpoints without projection: they get the base model's
  ``visual_projection``). The vision towers are merged and quantized; calibration inputs are
  ``calib.n_per_task`` train images per task, preprocessed as ``CLIPImageProcessor`` does.
- ``hf_t5``: FLAN-T5 base and GLUE experts; calibration inputs are teacher-forced train examples
  (:func:`epmq_jax.data.glue.calibration_inputs`).

Task pools (``task_pool.kind``), data options in the ``data`` section (``tasks``, ``data_dir``,
``calib_split``, ``eval_split``, ...):

- ``clip_zeroshot``: each task scored with its own frozen zero-shot head, built once from the
  base text tower over the task's class names and templates (a checkpoint carries the heads).
- ``glue``: greedy generation scored on each GLUE task's evaluation split
  (:func:`epmq_jax.eval.glue.evaluate_glue`; the score per ``eval.metric_style``).

Experts are loaded only when the runner first asks for them (never for ``epmq eval``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epmq_jax.pipeline.pools import Context, ModelPool, Params, unit_columns


def data_dir(cfg) -> str:
    """``data.data_dir``, else ``$TFDS_DATA_DIR``, else tfds' default ``~/tensorflow_datasets``."""
    return (cfg.data.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
            or os.path.expanduser("~/tensorflow_datasets"))


def _pure(module: nnx.Module) -> tuple[Any, Params]:
    graphdef, state = nnx.split(module, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def _batched(n: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


class _HFModelPool:
    """What the Hugging Face model pools share: checkpoint paths, lazy loading of the experts."""

    kind = ""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.mcfg = ctx.cfg.model_pool
        self.tasks = list(self.cfg.data.tasks)
        missing = [t for t in self.tasks if t not in self.mcfg.experts]
        if missing:
            raise ValueError(f"model_pool.experts has no checkpoint for tasks {missing} of data.tasks")

    def _load(self, path: str) -> nnx.Module:
        from epmq_jax.models import from_pretrained

        options = {k: self.mcfg.get(k) for k in ("revision", "dtype") if self.mcfg.get(k)}
        return from_pretrained(path, **options)

    @functools.cached_property
    def _base_model(self) -> nnx.Module:
        self.ctx.log(f"[epmq] loading {self.mcfg.base} ...")
        with self.ctx.timed("load_models"):
            return self._load(self.mcfg.base)

    def _tower(self, model: nnx.Module) -> nnx.Module:
        """The part of a loaded checkpoint that is merged (the whole model by default)."""
        return model

    @functools.cached_property
    def _split(self) -> tuple[Any, Params]:
        return _pure(self._tower(self._base_model))

    @property
    def graphdef(self) -> Any:
        return self._split[0]

    def abstract_params(self) -> Params:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._split[1])

    def base(self) -> Params:
        return self._split[1]

    @functools.cached_property
    def _experts(self) -> list[Params]:
        out = []
        self.ctx.log(f"[epmq] loading {len(self.tasks)} experts ...")
        with self.ctx.timed("load_models"):
            for task in self.tasks:
                out.append(_pure(self._expert_tower(task, self._load(self.mcfg.experts[task])))[1])
        return out

    def _expert_tower(self, task: str, model: nnx.Module) -> nnx.Module:
        return model

    def experts(self) -> list[Params]:
        return self._experts

    def multitask(self) -> Params | None:
        return None


class CLIPModelPool(_HFModelPool):
    """CLIP: the vision tower (with projection) is merged and quantized."""

    kind = "hf_clip"

    @functools.cached_property
    def _base_model(self) -> nnx.Module:
        from epmq_jax.models import CLIPModel

        base = super()._base_model
        if not isinstance(base, CLIPModel):
            raise ValueError(f"model_pool.base {self.mcfg.base}: a CLIP checkpoint (model_type 'clip', "
                             f"both towers) is needed for the zero-shot heads; got {type(base).__name__}")
        size = int(base.vision_model.config.image_size)
        if int(self.cfg.data.get("image_size", size)) != size:
            raise ValueError(f"data.image_size={self.cfg.data.image_size} but the base model "
                             f"{self.mcfg.base} takes {size}x{size} images")
        return base

    def _tower(self, model: nnx.Module) -> nnx.Module:
        return model.vision_model

    @property
    def clip(self) -> nnx.Module:
        """The whole base CLIP (the text tower builds the zero-shot heads)."""
        return self._base_model

    @property
    def image_size(self) -> int:
        return int(self._base_model.vision_model.config.image_size)

    def _expert_tower(self, task: str, model: nnx.Module) -> nnx.Module:
        from epmq_jax.models import CLIPModel, CLIPVisionModelWithProjection

        m = model.vision_model if isinstance(model, CLIPModel) else model
        if not isinstance(m, CLIPVisionModelWithProjection):
            raise ValueError(f"model_pool.experts[{task!r}] = {self.mcfg.experts[task]}: expected a CLIP "
                             f"vision checkpoint, got {type(m).__name__}")
        if m.visual_projection is None:  # FusionBench's CLIPVisionModel experts
            # the None attribute is static in nnx: nnx.data marks the new value as data
            m.visual_projection = nnx.data(nnx.clone(self._base_model.vision_model.visual_projection))
        return m

    def adapter(self) -> Any:
        from epmq_jax.calib import vit_adapter

        return vit_adapter(self._base_model.vision_model)

    def calibration_inputs(self) -> list[np.ndarray]:
        from epmq_jax.data.calibration import sample_calibration
        from epmq_jax.models.preprocess import preprocess_images

        c = self.cfg.calib
        data = sample_calibration(self.tasks, int(c.n_per_task), data_dir(self.cfg), seed=int(c.seed),
                                  split=self.cfg.data.get("calib_split", "train"))
        size = self.image_size
        return [preprocess_images(data[t]["image"], size=size, crop_size=size) for t in self.tasks]


def t5_tokenizer(name: str) -> tuple[Callable[[str], list[int]], Callable[[Sequence[int]], str]]:
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


class T5ModelPool(_HFModelPool):
    """FLAN-T5: the whole encoder-decoder is merged; its blocks' linear kernels are quantized."""

    kind = "hf_t5"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        from epmq_jax.data import glue

        for t in self.tasks:
            glue.get_task(t)

    @functools.cached_property
    def _base_model(self) -> nnx.Module:
        from epmq_jax.models import T5ForConditionalGeneration

        base = super()._base_model
        if not isinstance(base, T5ForConditionalGeneration):
            raise ValueError(f"model_pool.base {self.mcfg.base}: expected a T5 checkpoint, "
                             f"got {type(base).__name__}")
        return base

    def _expert_tower(self, task: str, model: nnx.Module) -> nnx.Module:
        from epmq_jax.models import T5ForConditionalGeneration

        if not isinstance(model, T5ForConditionalGeneration):
            raise ValueError(f"model_pool.experts[{task!r}] = {self.mcfg.experts[task]}: expected a T5 "
                             f"checkpoint, got {type(model).__name__}")
        return model

    @functools.cached_property
    def tokenizer(self) -> tuple[Callable, Callable]:
        return t5_tokenizer(self.mcfg.get("tokenizer") or self.mcfg.base)

    @property
    def config(self) -> Any:
        return self._base_model.config

    def adapter(self) -> Any:
        from epmq_jax.calib.adapters_t5 import t5_adapter

        return t5_adapter(self._base_model)

    def calibration_inputs(self) -> list[Any]:
        from epmq_jax.data import glue

        c, d = self.cfg.calib, self.cfg.data
        tokenize, _ = self.tokenizer
        return [glue.calibration_inputs(t, data_dir(self.cfg), int(c.n_per_task), tokenize, seed=int(c.seed),
                                        max_length=int(d.get("max_length", 256)),
                                        max_target_length=int(d.get("max_target_length", 8)))
                for t in self.tasks]


# ----------------------------------------------------------------------------- task pools


@functools.lru_cache(maxsize=8)
def _image_features_fn(graphdef: Any) -> Callable:
    return jax.jit(lambda params, pixels: nnx.merge(graphdef, params).get_image_features(pixels))


def clip_accuracy(graphdef: Any, params: Params, head: np.ndarray, task: str, split: str,
                  data_dir: str, *, image_size: int, batch_size: int, limit: int | None = None,
                  sharding: Any = None) -> float:
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
      sharding: optional ``NamedSharding`` splitting each batch over devices.
    """
    from epmq_jax.data import registry
    from epmq_jax.models.preprocess import preprocess_images
    from epmq_jax.models.zeroshot import classify

    n = registry.split_size(task, split, data_dir)
    n = n if limit is None else min(n, int(limit))
    if n == 0:
        raise ValueError(f"Task '{task}' split '{split}' under {data_dir} is empty")
    if sharding is not None:
        k = len(sharding.device_set)
        batch_size = -(-batch_size // k) * k
    fn = _image_features_fn(graphdef)
    head = jnp.asarray(head)
    if sharding is not None:   # the model replicated on the batch's devices
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        params, head = jax.device_put((params, head), replicated)

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
            if sharding is not None:
                x = jax.device_put(x, sharding)
            pred = np.asarray(jnp.argmax(classify(fn(params, x), head), axis=-1))[: len(y)]
            correct += int(np.sum(pred == y))
    return 100.0 * correct / n


def _batch_sharding(ctx: Context):
    if ctx.mesh is None:
        return None
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(ctx.mesh, P(ctx.axis))


class CLIPZeroShotTaskPool:
    """Zero-shot classification with per-task heads from the base text tower."""

    kind = "clip_zeroshot"
    select_split = "validation"

    def __init__(self, ctx: Context, model_pool: ModelPool, restored: Mapping[str, Any] | None = None):
        if not isinstance(model_pool, CLIPModelPool):
            raise ValueError(f"task_pool.kind 'clip_zeroshot' needs model_pool.kind 'hf_clip', got "
                             f"{getattr(model_pool, 'kind', type(model_pool).__name__)!r}")
        self.ctx, self.pool = ctx, model_pool
        self.tasks = list(model_pool.tasks)
        self.report_split = ctx.cfg.data.get("eval_split", "test")
        self._restored = restored
        self.note = (f"Accuracies are on each task's {self.report_split} split with its zero-shot head; "
                     "merge coefficients and RegMean's α are fixed by the config or chosen on the "
                     "validation splits; E-PMQ's λ and switches are fixed by the config.")

    @functools.cached_property
    def heads(self) -> dict[str, np.ndarray]:
        if self._restored is not None:
            return {t: np.asarray(self._restored["arrays"]["heads"][t]["kernel"]) for t in self.tasks}
        from epmq_jax.models.zeroshot import hf_tokenizer, zeroshot_head

        mcfg, clip = self.ctx.cfg.model_pool, self.pool.clip
        tokenize = hf_tokenizer(mcfg.get("tokenizer") or mcfg.base,
                                max_length=int(clip.config.text_config.max_position_embeddings))
        t0 = time.perf_counter()
        heads = {t: np.asarray(zeroshot_head(clip, tokenize, t)) for t in self.tasks}
        self.ctx.log(f"[epmq] {len(heads)} zero-shot heads in {time.perf_counter() - t0:.1f}s")
        return heads

    def readout_heads(self) -> list[np.ndarray]:
        """Per task the zero-shot class embeddings ``(projection_dim, n_classes)``, unit columns
        (how the logits read the normalised image embedding; E-PMQ-full's ``heads``)."""
        return [unit_columns(self.heads[t]) for t in self.tasks]

    def evaluate(self, params: Params | Sequence[Params], split: str) -> dict[str, dict[str, float]]:
        trees = list(params) if isinstance(params, list | tuple) else [params] * len(self.tasks)
        cfg = self.ctx.cfg
        out = {}
        for task, tree in zip(self.tasks, trees):
            acc = clip_accuracy(self.pool.graphdef, tree, self.heads[task], task, split, data_dir(cfg),
                                image_size=self.pool.image_size, batch_size=int(cfg.eval.batch_size),
                                limit=cfg.eval.get("limit"), sharding=_batch_sharding(self.ctx))
            out[task] = {"score": acc, "accuracy": acc / 100.0}
        return out

    def checkpoint_state(self) -> tuple[Params, dict[str, Any]]:
        return {"heads": {t: {"kernel": h} for t, h in self.heads.items()}}, {}


class GlueTaskPool:
    """GLUE as text-to-text: greedy answers of a T5 scored per task."""

    kind = "glue"
    select_split = None   # the validation split is the one reported

    def __init__(self, ctx: Context, model_pool: ModelPool, restored: Mapping[str, Any] | None = None):
        if not isinstance(model_pool, T5ModelPool):
            raise ValueError(f"task_pool.kind 'glue' needs model_pool.kind 'hf_t5', got "
                             f"{getattr(model_pool, 'kind', type(model_pool).__name__)!r}")
        self.ctx, self.pool = ctx, model_pool
        self.tasks = list(model_pool.tasks)
        self.report_split = ctx.cfg.data.get("eval_split", "validation")
        style = ctx.cfg.eval.get("metric_style", "fusion_bench")
        self.note = (f"Scores (%) on each GLUE task's validation split (MNLI: validation_matched), "
                     f"metric style '{style}' (a correlation, STS-B's Spearman or CoLA's MCC, can be "
                     "negative); merge coefficients and RegMean's α are fixed by the config (GLUE has "
                     "no separate validation split to choose them on); E-PMQ's λ and switches are "
                     "fixed by the config.")

    def evaluate(self, params: Params | Sequence[Params], split: str) -> dict[str, dict[str, float]]:
        from epmq_jax.eval.glue import evaluate_glue

        del split  # GLUE: always the task's evaluation split
        trees = list(params) if isinstance(params, list | tuple) else [params] * len(self.tasks)
        cfg, mc = self.ctx.cfg, self.pool.config
        tokenize, decode = self.pool.tokenizer
        max_new = int(cfg.eval.get("max_new_tokens", 9))
        out = {}
        for task, tree in zip(self.tasks, trees):
            model = nnx.merge(self.pool.graphdef, tree)
            res = evaluate_glue(lambda ids, mask, m=model: m.generate(ids, mask, max_new_tokens=max_new),
                                tokenize, decode, [task], data_dir(cfg),
                                max_length=int(cfg.data.get("max_length", 256)),
                                batch_size=int(cfg.eval.batch_size), limit=cfg.eval.get("limit"),
                                style=cfg.eval.get("metric_style", "fusion_bench"),
                                eos_id=int(mc.eos_token_id), pad_id=int(mc.pad_token_id))[task]
            out[task] = {**{k: float(v) for k, v in res.items() if k != "score"},
                         "score": 100.0 * float(res["score"])}
        return out

    def checkpoint_state(self) -> tuple[Params, dict[str, Any]]:
        return {}, {}

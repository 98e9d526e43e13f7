"""The offline image suite as a model pool and a task pool (configs/offline_8task.py).

Model pool ``offline_suite``: the suite's data is built once as local tfds datasets under the
cache (:mod:`epmq_jax.data.offline_suite`); the pretrained encoder, the per-task heads and the
experts (and, with ``model_pool.multitask``, the multi-task model) are trained on first use, or
restored from the cache (:func:`epmq_jax.train.train_all`).
Calibration inputs are ``calib.n_per_task`` images from each task's train split.

Task pool ``offline_suite``: top-1 accuracy with each task's frozen cosine head, on the
``validation`` split (merge coefficients are chosen there) or the ``test`` split (reported).
A checkpoint carries the heads, so it scores again without training anything.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from epmq_jax.pipeline.pools import Context, ModelPool, Params, unit_columns


class OfflineModelPool:
    """Pool of the offline suite's CLIP ViT encoder, its experts and calibration images."""

    kind = "offline_suite"

    def __init__(self, ctx: Context):
        from epmq_jax.config import ConfigError
        from epmq_jax.data import offline_suite

        self.ctx = ctx
        self.cfg = ctx.cfg
        self.tasks = list(self.cfg.suite.tasks)
        try:  # the regime and its keys, before anything is built or trained
            offline_suite.pretrain_spec(self.cfg.suite)
        except ValueError as e:
            raise ConfigError(f"--config.{e}") from None

    @functools.cached_property
    def _template(self) -> tuple[Any, Params]:
        from epmq_jax import train

        return train.split_params(train.make_model(self.cfg.model))

    @property
    def graphdef(self) -> Any:
        return self._template[0]

    def abstract_params(self) -> Params:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._template[1])

    @property
    def data_dir(self) -> str:
        """Where the suite is written once as local tfds (array_record) datasets and read back."""
        return str((self.ctx.cache_dir / "tfds").absolute())

    @functools.cached_property
    def suite(self):
        """The built suite (data only; nothing is trained)."""
        from epmq_jax.data import offline_suite

        with self.ctx.timed("build_suite"):
            return offline_suite.build_suite(self.cfg.suite, data_dir=self.data_dir)

    @functools.cached_property
    def trained(self):
        """:class:`epmq_jax.train.TrainedModels`, trained now or restored from the cache."""
        from epmq_jax import train

        cache = self.ctx.cache_dir
        self.ctx.log(f"[epmq] training (cached under {cache}) ...")
        with self.ctx.timed("train"):
            trained = train.train_all(self.cfg, str(cache), self.suite, multitask=self.has_multitask)
        hits = trained.timings.get("cache_hits", 0)
        stages = 2 * len(self.tasks) + 1 + int(self.has_multitask)
        self.ctx.log(f"[epmq] models ready ({hits} of {stages} stages from the cache)")
        return trained

    def base(self) -> Params:
        return self.trained.pretrained

    def experts(self) -> list[Params]:
        return [self.trained.experts[t] for t in self.tasks]

    @property
    def has_multitask(self) -> bool:
        """``model_pool.multitask``: whether the pool trains (and serves) the multi-task model."""
        return bool(self.cfg.model_pool.get("multitask", False))

    def multitask(self) -> Params | None:
        """The encoder fine-tuned on all tasks jointly (heads frozen), if ``model_pool.multitask``."""
        return self.trained.multitask if self.has_multitask else None

    def adapter(self) -> Any:
        from epmq_jax import calib, train

        return calib.vit_adapter(train.make_model(self.cfg.model))

    def calibration_inputs(self) -> list[np.ndarray]:
        from epmq_jax.data import offline_suite

        c = self.cfg.calib
        images = offline_suite.calibration_images(self.suite, int(c.n_per_task), seed=int(c.seed))
        return [offline_suite.to_float(images[t]) for t in self.tasks]


class OfflineTaskPool:
    """Accuracy of an encoder with each task's frozen head on the suite's splits."""

    kind = "offline_suite"
    select_split = "validation"
    report_split = "test"
    note = ("Accuracies are on each task's test split; merge coefficients and RegMean's α are "
            "chosen on the validation splits; E-PMQ's λ and switches are fixed by the config.")

    def __init__(self, ctx: Context, model_pool: ModelPool, restored: Mapping[str, Any] | None = None):
        if not isinstance(model_pool, OfflineModelPool):
            raise ValueError(f"task_pool.kind 'offline_suite' needs model_pool.kind 'offline_suite', "
                             f"got {getattr(model_pool, 'kind', type(model_pool).__name__)!r}")
        self.ctx, self.pool = ctx, model_pool
        self.tasks = list(model_pool.tasks)
        self._restored = restored

    @functools.cached_property
    def heads(self) -> dict[str, Any]:
        if self._restored is not None:
            return {t: self._restored["arrays"]["heads"][t] for t in self.tasks}
        return {t: self.pool.trained.heads[t] for t in self.tasks}

    def readout_heads(self) -> list[np.ndarray]:
        """Per task the cosine head's class embeddings ``(projection_dim, n_classes)``, unit
        columns (how the logits read the image embedding; E-PMQ-full's ``heads``)."""
        return [unit_columns(self.heads[t]["kernel"]) for t in self.tasks]

    @property
    def logit_scale(self) -> float:
        if self._restored is not None:
            return float(self._restored["meta"]["logit_scale"])
        return float(self.pool.trained.logit_scale)

    def evaluate(self, params: Params | Sequence[Params], split: str) -> dict[str, dict[str, float]]:
        from tqdm.auto import tqdm

        from epmq_jax import train

        trees = list(params) if isinstance(params, list | tuple) else [params] * len(self.tasks)
        limit = self.ctx.cfg.eval.get("limit")
        sharding = None
        if self.ctx.mesh is not None:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            sharding = NamedSharding(self.ctx.mesh, P(self.ctx.axis))
        out = {}
        for task, tree in tqdm(list(zip(self.tasks, trees)), desc=f"eval ({split})", leave=False,
                               disable=not self.ctx.progress):
            x, y = self.pool.suite[task].splits[split]
            if limit is not None:
                x, y = x[:limit], y[:limit]
            acc = train.evaluate(self.pool.graphdef, tree, self.heads[task], x, y,
                                 logit_scale=self.logit_scale,
                                 batch_size=int(self.ctx.cfg.eval.batch_size), sharding=sharding)
            out[task] = {"score": acc, "accuracy": acc / 100.0, "n": float(len(y))}
        return out

    def checkpoint_state(self) -> tuple[Params, dict[str, Any]]:
        return {"heads": dict(self.heads)}, {"logit_scale": self.logit_scale}

    def restore_target(self) -> Params:
        """The structure of :meth:`checkpoint_state`'s arrays, for loading them back."""
        return {"heads": {t: {"kernel": 0} for t in self.tasks}}

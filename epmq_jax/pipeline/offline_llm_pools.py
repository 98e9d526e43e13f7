"""The offline LLM benchmark as a model pool and a task pool (configs/offline_llm.py).

Model pool ``offline_llm``: the eight synthetic skills are generated from the config's seed and
written once as local tfds datasets under the cache (:mod:`epmq_jax.data.offline_llm`); the
foundation model (the project's Llama at a small size, pretrained briefly on the mixture) and one
expert per skill are trained on first use, or restored from the cache
(:func:`epmq_jax.train_llm.train_all`). Calibration inputs are ``calib.n_per_task`` training
examples per skill (``[bos] prompt answer [eos]``, left-padded to ``suite.seq_len``).

Task pool ``offline_llm``: exact match of the greedy answer (KV-cache generation) on each skill's
``validation`` split (merge coefficients are chosen there) or ``test`` split (reported);
:class:`~epmq_jax.pipeline.llm_pools.TextTaskPool` does the scoring, the tokenizer is the
characters' (:class:`~epmq_jax.data.offline_llm.CharTokenizer`). A checkpoint needs nothing but
the model: the data are rebuilt from the config (or read from the cache).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from epmq_jax.pipeline.llm_pools import TextExamples, TextTaskPool, calibration_batch
from epmq_jax.pipeline.pools import Context, ModelPool, Params


class OfflineLLMModelPool:
    """The offline LLM benchmark's foundation model, its experts and calibration examples."""

    kind = "offline_llm"

    def __init__(self, ctx: Context):
        from epmq_jax.data.offline_llm import CharTokenizer

        self.ctx = ctx
        self.cfg = ctx.cfg
        self.tasks = list(self.cfg.suite.tasks)
        self.codec = CharTokenizer()

    def _model(self) -> nnx.Module:
        from epmq_jax import train_llm

        return train_llm.make_model(self.cfg.model, self.codec.vocab_size)

    @functools.cached_property
    def _template(self) -> tuple[Any, Params]:
        graphdef, state = nnx.split(self._model(), nnx.Param)
        return graphdef, nnx.to_pure_dict(state)

    @property
    def graphdef(self) -> Any:
        return self._template[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (self.codec.eos_id,)

    def abstract_params(self) -> Params:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._template[1])

    @property
    def data_dir(self) -> str:
        """Where the skills are written once as local tfds datasets and read back."""
        return str((self.ctx.cache_dir / "tfds").absolute())

    @functools.cached_property
    def suite(self):
        """``{skill: SkillData}`` (data only; nothing is trained)."""
        from epmq_jax.data import offline_llm

        with self.ctx.timed("build_suite"):
            return offline_llm.build_suite(self.cfg.suite, data_dir=self.data_dir)

    @functools.cached_property
    def trained(self):
        """:class:`epmq_jax.train_llm.TrainedLLMs`, trained now or restored from the cache."""
        from epmq_jax import train_llm

        cache = self.ctx.cache_dir
        self.ctx.log(f"[epmq] training (cached under {cache}) ...")
        with self.ctx.timed("train"):
            trained = train_llm.train_all(self.cfg, str(cache), self.suite)
        self.ctx.log(f"[epmq] models ready ({trained.timings['cache_hits']} of {len(self.tasks) + 1} "
                     "stages from the cache)")
        return trained

    def base(self) -> Params:
        return self.trained.pretrained

    def experts(self) -> list[Params]:
        return [self.trained.experts[t] for t in self.tasks]

    def multitask(self) -> Params | None:
        return None

    def adapter(self) -> Any:
        from epmq_jax.calib import decoder_adapter

        return decoder_adapter(self._model())

    def examples(self, task: str, split: str) -> TextExamples:
        prompts, answers = self.suite[task].examples(split)
        return TextExamples("generate", [str(p) for p in prompts], answers=[str(a) for a in answers])

    def calibration_inputs(self) -> list[dict[str, np.ndarray]]:
        from epmq_jax.data.calibration import calibration_indices

        c = self.cfg.calib
        per_task = []
        for t in self.tasks:
            ex = self.examples(t, "train")
            idx = calibration_indices(len(ex), min(int(c.n_per_task), len(ex)), seed=int(c.seed), task=t)
            per_task.append(ex.take(idx))
        return calibration_batch(self.codec, per_task, max_length=int(self.cfg.suite.seq_len))


class OfflineLLMTaskPool(TextTaskPool):
    """Exact match of greedy answers on the offline skills' splits."""

    kind = "offline_llm"
    select_split = "validation"
    report_split = "test"
    note = ("Exact-match accuracy (%) of the greedy answer on each skill's test split; merge "
            "coefficients and RegMean's α are chosen on the validation splits; E-PMQ's λ and switches "
            "are fixed by the config.")

    def __init__(self, ctx: Context, model_pool: ModelPool, restored: Mapping[str, Any] | None = None):
        if not isinstance(model_pool, OfflineLLMModelPool):
            raise ValueError(f"task_pool.kind 'offline_llm' needs model_pool.kind 'offline_llm', got "
                             f"{getattr(model_pool, 'kind', type(model_pool).__name__)!r}")
        del restored  # the data are rebuilt from the config
        self.ctx, self.pool = ctx, model_pool
        self.tasks = list(model_pool.tasks)

    def examples(self, task: str, split: str) -> TextExamples:
        ex = self.pool.examples(task, split)
        limit = self.ctx.cfg.eval.get("limit")
        return ex if limit is None else ex.take(range(min(int(limit), len(ex))))

    def task_options(self, task: str) -> dict[str, Any]:
        """``eval.max_new_tokens``, but no more than the skill's longest answer (any split) + eos.

        Exact match is unchanged: a continuation matches when its first ``len(answer)`` tokens
        are the answer and the next is eos, and greedy tokens do not depend on how many follow,
        so decoding further cannot turn a miss into a hit or back. Skills with short answers
        (count, modulo: one digit) decode 2 tokens instead of 9.
        """
        opts = super().task_options(task)
        opts["max_new_tokens"] = min(opts["max_new_tokens"], self._longest_answers[task] + 1)
        return opts

    @functools.cached_property
    def _longest_answers(self) -> dict[str, int]:
        """Per skill, the most tokens an answer has in any split."""
        return {t: max(len(self.pool.codec.encode(str(a))) for split in ("train", "validation", "test")
                       for a in self.pool.suite[t].examples(split)[1]) for t in self.tasks}

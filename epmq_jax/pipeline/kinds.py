"""The kind -> builder tables of model pools and task pools (``model_pool.kind``, ``task_pool.kind``).

A new model family or benchmark is a new pool class and one line here; the runner does not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epmq_jax.pipeline import hf_pools, llm_pools, offline_llm_pools, offline_pools
from epmq_jax.pipeline.pools import Context, ModelPool, ModelPoolBuilder, TaskPool, TaskPoolBuilder

MODEL_POOLS: dict[str, ModelPoolBuilder] = {
    "offline_suite": offline_pools.OfflineModelPool,
    "hf_clip": hf_pools.CLIPModelPool,
    "hf_t5": hf_pools.T5ModelPool,
    "hf_llm": llm_pools.LLMModelPool,
    "offline_llm": offline_llm_pools.OfflineLLMModelPool,
}

TASK_POOLS: dict[str, TaskPoolBuilder] = {
    "offline_suite": offline_pools.OfflineTaskPool,
    "clip_zeroshot": hf_pools.CLIPZeroShotTaskPool,
    "glue": hf_pools.GlueTaskPool,
    "llm_tasks": llm_pools.LLMTaskPool,
    "offline_llm": offline_llm_pools.OfflineLLMTaskPool,
}


def pool_kinds(cfg) -> tuple[str, str]:
    """``(model_pool.kind, task_pool.kind)`` of a config.

    Raises:
      ValueError: a missing section or an unknown kind (the message lists the known ones).
    """
    out = []
    for section, table in (("model_pool", MODEL_POOLS), ("task_pool", TASK_POOLS)):
        node = cfg.get(section)
        kind = node.get("kind") if node is not None else None
        if kind not in table:
            raise ValueError(f"{section}.kind={kind!r}: expected one of {sorted(table)}"
                             + ("" if node is not None else f" (the config has no '{section}' section)"))
        out.append(kind)
    return out[0], out[1]


def build_pools(ctx: Context, restored: Mapping[str, Any] | None = None) -> tuple[ModelPool, TaskPool]:
    """Builds the config's model pool and task pool (nothing is loaded or trained yet).

    Args:
      ctx: the run context.
      restored: ``{"arrays": ..., "meta": ...}`` a checkpoint saved from the task pool's
        :meth:`~epmq_jax.pipeline.pools.TaskPool.checkpoint_state` (for ``epmq eval``), or None.
    """
    mkind, tkind = pool_kinds(ctx.cfg)
    model_pool = MODEL_POOLS[mkind](ctx)
    task_pool = TASK_POOLS[tkind](ctx, model_pool, restored)
    if list(task_pool.tasks) != list(model_pool.tasks):
        raise ValueError(f"the task pool's tasks {task_pool.tasks} differ from the model pool's "
                         f"{model_pool.tasks}")
    return model_pool, task_pool

"""The benchmark pipeline: one runner over model pools and task pools.

- :mod:`~epmq_jax.pipeline.variants`: the rows a config asks for (:func:`plan`, :class:`Variant`);
- :mod:`~epmq_jax.pipeline.pools`: the ModelPool / TaskPool protocols and the run :class:`Context`;
- :mod:`~epmq_jax.pipeline.kinds`: ``model_pool.kind`` / ``task_pool.kind`` -> pool classes
  (:mod:`~epmq_jax.pipeline.offline_pools`, :mod:`~epmq_jax.pipeline.hf_pools`,
  :mod:`~epmq_jax.pipeline.llm_pools`, :mod:`~epmq_jax.pipeline.offline_llm_pools`);
- :mod:`~epmq_jax.pipeline.validate`: the whole config checked before any work;
- :mod:`~epmq_jax.pipeline.stages`: merge, choose on validation, calibrate, score;
- :mod:`~epmq_jax.pipeline.runner`: :func:`run` and the single-step commands;
- :mod:`~epmq_jax.pipeline.checkpoints`: packed checkpoints and :func:`eval_checkpoint`.
"""

from epmq_jax.pipeline.checkpoints import eval_checkpoint, load_checkpoint, save_checkpoint
from epmq_jax.pipeline.kinds import MODEL_POOLS, TASK_POOLS, build_pools
from epmq_jax.pipeline.pools import Context, ModelPool, TaskPool
from epmq_jax.pipeline.runner import merge_command, quantize_command, run, start, write_report
from epmq_jax.pipeline.stages import calib_config, dequantize_tree, merge_trees, select_scaling
from epmq_jax.pipeline.variants import Variant, epmq_switches, parse_ablation, plan

__all__ = [
    "MODEL_POOLS",
    "TASK_POOLS",
    "Context",
    "ModelPool",
    "TaskPool",
    "Variant",
    "build_pools",
    "calib_config",
    "dequantize_tree",
    "epmq_switches",
    "eval_checkpoint",
    "load_checkpoint",
    "merge_command",
    "merge_trees",
    "parse_ablation",
    "plan",
    "quantize_command",
    "run",
    "save_checkpoint",
    "select_scaling",
    "start",
    "write_report",
]

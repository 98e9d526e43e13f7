"""Calibration: per-layer statistics, layer objectives (GPTQ, E-PMQ, RegMean), the anchored
solve, and the sequential block-by-block driver over Flax models (METHOD.md §4, §6).
"""

from epmq_jax.calib.adapter import (
    AwqAdapter,
    AwqGroup,
    CalibAdapter,
    NnxAdapter,
    capture_linen,
    capture_nnx,
    vit_adapter,
)
from epmq_jax.calib.adapters_llm import DecoderAdapter, decoder_adapter
from epmq_jax.calib.adapters_t5 import T5Adapter, t5_adapter
from epmq_jax.calib.driver import CalibConfig, CalibResult, calibrate
from epmq_jax.calib.full import FullConfig
from epmq_jax.calib.layer import epmq_layer
from epmq_jax.calib.objectives import Objective, System, layer_system, objective_value
from epmq_jax.calib.regmean import regmean_merge
from epmq_jax.calib.solve import round_weight, solve, solve_layer
from epmq_jax.calib.stats import Moments, accumulate, fold_task, moments, task_weight

__all__ = [
    "AwqAdapter",
    "AwqGroup",
    "CalibAdapter",
    "CalibConfig",
    "CalibResult",
    "FullConfig",
    "NnxAdapter",
    "calibrate",
    "capture_linen",
    "capture_nnx",
    "vit_adapter",
    "DecoderAdapter",
    "decoder_adapter",
    "T5Adapter",
    "t5_adapter",
    "Moments",
    "Objective",
    "System",
    "accumulate",
    "epmq_layer",
    "fold_task",
    "layer_system",
    "moments",
    "objective_value",
    "regmean_merge",
    "round_weight",
    "solve",
    "solve_layer",
    "task_weight",
]

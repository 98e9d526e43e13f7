"""Evaluation: per-task metrics (GLUE text-to-text scoring in ``epmq_jax.eval.glue``)."""

from epmq_jax.eval.glue import (
    accuracy,
    generate_answers,
    glue_metrics,
    matthews_corrcoef,
    pearson,
    spearman,
    task_score,
)

__all__ = [
    "accuracy",
    "generate_answers",
    "glue_metrics",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "task_score",
]

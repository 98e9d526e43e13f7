"""Evaluation: per-task metrics (GLUE text-to-text scoring in ``epmq_jax.eval.glue``)."""

from epmq_jax.eval.glue import (
    accuracy,
    evaluate_glue,
    generate_answers,
    glue_metrics,
    matthews_corrcoef,
    pearson,
    spearman,
    task_score,
)

__all__ = [
    "accuracy",
    "evaluate_glue",
    "generate_answers",
    "glue_metrics",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "task_score",
]

"""Task data: local tfds datasets, the task registry, calibration sampling.

Submodules:
- ``tfds_local``: write in-memory arrays as a prepared array_record tfds dataset and read splits
  back as NumPy arrays (no TensorFlow, no network).
- ``registry``: task name -> tfds name, splits, keys, class count; loads a task's split.
- ``calibration``: seeded calibration samples (n per task, without replacement, train split).
- ``glue``: GLUE as text-to-text for T5. ``offline_suite``: the offline 8-task image suite.

The names below are re-exported lazily, so importing ``epmq_jax.data.glue`` does not import
tensorflow_datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetNotFoundError": "tfds_local",
    "write_local_dataset": "tfds_local",
    "load_split": "tfds_local",
    "open_split": "tfds_local",
    "dataset_exists": "tfds_local",
    "split_sizes": "tfds_local",
    "TaskSpec": "registry",
    "TASKS": "registry",
    "get_task": "registry",
    "load_task_split": "registry",
    "prepare_from_image_folder": "registry",
    "prepare_from_hf": "registry",
    "calibration_indices": "calibration",
    "sample_calibration": "calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"epmq_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'epmq_jax.data' has no attribute {name!r}")

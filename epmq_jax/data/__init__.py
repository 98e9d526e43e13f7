"""Task data: local tfds datasets, the task registry, calibration sampling.

Submodules:
- ``tfds_local``: write a prepared array_record tfds dataset batch by batch (or from in-memory
  arrays) and read splits back as NumPy arrays (no TensorFlow, no network).
- ``registry``: task name -> FusionBench's Hugging Face dataset (and a tfds option), class count;
  streams a task into the local store; loads a task's split.
- ``hf_stream``: reads a Hugging Face split in batches (streaming or memory-mapped).
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
    "DatasetWriter": "tfds_local",
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
    "prepare_tasks": "registry",
    "calibration_indices": "calibration",
    "sample_calibration": "calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"epmq_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'epmq_jax.data' has no attribute {name!r}")

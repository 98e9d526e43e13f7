"""Calibration sampling: n examples per task from its train split, seeded, without replacement.

The sample of a task depends only on ``(seed, task name, split size, n)``, not on which other
tasks are sampled or in what order, so adding a task never changes the others' samples.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import numpy as np

from epmq_jax.data.registry import load_task_split, resolve_task, split_size


def calibration_indices(num_examples: int, n: int, *, seed: int = 0, task: str = "") -> np.ndarray:
    """``n`` distinct positions in ``range(num_examples)``, sorted (sorted reads are faster).

    Args:
      num_examples: size of the split.
      n: sample size, ``1 <= n <= num_examples``.
      seed: the run's seed.
      task: mixed into the seed (CRC32 of the name), so tasks get independent samples.

    Raises:
      ValueError: ``n`` outside ``[1, num_examples]``.
    """
    if not 1 <= n <= num_examples:
        raise ValueError(f"Calibration size n={n} must be in [1, {num_examples}] "
                         f"(the split{' of ' + repr(task) if task else ''} has {num_examples} "
                         f"examples).")
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode("utf-8"))])
    return np.sort(rng.choice(num_examples, size=n, replace=False))


def sample_calibration(tasks: Sequence[str], n: int, data_dir: str | os.PathLike, *,
                       seed: int = 0, split: str = "train"
                       ) -> dict[str, dict[str, np.ndarray | list[np.ndarray]]]:
    """Calibration data of each task: ``n`` examples of its train split.

    Args:
      tasks: registry task names (see ``epmq_jax.data.registry``).
      n: examples per task.
      data_dir: the data directory holding the prepared tasks (``epmq_jax.data.registry``).
      seed: the run's seed (see :func:`calibration_indices`).
      split: the split to sample (``"train"``: calibration never sees test data).

    Returns:
      ``{task: {"image": ..., "label": int64 (n,)}}`` as :func:`load_task_split` returns.

    Raises:
      DatasetNotFoundError: a task's data are not prepared (before anything is read).
      ValueError: a task without ``split``; ``n`` larger than a task's split.
    """
    for t in tasks:  # fail fast on any missing task or split, before reading anything
        resolve_task(t, data_dir)
    sizes = {t: split_size(t, split, data_dir) for t in tasks}
    return {t: load_task_split(t, split, data_dir,
                               indices=calibration_indices(size, n, seed=seed, task=t))
            for t, size in sizes.items()}

"""Model pools and task pools: what the runner is fed, whatever the model family or benchmark.

FusionBench's split, in JAX style. A **model pool** knows the models: the base, the experts
(loaded lazily, on first use), the graph definition that rebuilds a module from a pure param
tree, the calibration adapter, and each task's calibration inputs. A **task pool** knows the
tasks: how to score a param tree (or one tree per task) on a split, which split chooses merge
coefficients and which is reported, and what a checkpoint must carry to be scored again (e.g.
CLIP's zero-shot heads). The runner (:mod:`epmq_jax.pipeline.runner`) only calls these
methods; it never asks which family it runs. The config names the pools by kind
(``model_pool.kind``, ``task_pool.kind``); :mod:`epmq_jax.pipeline.kinds` maps kinds to builders.

Params are pure nested dicts of arrays (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``);
kernels in Flax layout ``(d_in, d_out)``. The runner dequantizes before it scores, so a task
pool only ever sees float trees.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import ml_collections
import numpy as np

Params = dict[str, Any]
Log = Callable[[str], None]


def say(message: str) -> None:
    """Prints a progress message without breaking the progress bars."""
    from tqdm.auto import tqdm

    tqdm.write(message)


@dataclasses.dataclass
class Context:
    """What pools and stages share during one run.

    Attributes:
      cfg: the experiment config.
      workdir: the run directory.
      log: where progress messages go.
      mesh: the device mesh of ``run.mesh`` (None: one device) and its axis name.
      timings: wall seconds per stage, accumulated.
    """

    cfg: ml_collections.ConfigDict
    workdir: Path
    log: Log = say
    mesh: Any = None
    axis: str | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def timed(self, key: str):
        """``with ctx.timed("merge"): ...`` adds the block's wall time to ``timings[key]``."""
        return _Timer(self, key)

    @property
    def cache_dir(self) -> Path:
        """Where trained models, prepared data and XLA compilations are cached: ``run.cache_dir``
        if set, else ``WORKDIR/cache``."""
        explicit = self.cfg.run.get("cache_dir")
        return Path(explicit) if explicit else self.workdir / "cache"

    @property
    def progress(self) -> bool:
        return bool(self.cfg.eval.progress)

    def replicate(self, tree: Any) -> Any:
        """``tree`` placed on every device of the mesh (as is without a mesh), so jitted work
        whose batches are split over the mesh finds its params there too."""
        if self.mesh is None:
            return tree
        import jax

        return jax.device_put(tree, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))


class _Timer:
    def __init__(self, ctx: Context, key: str):
        self.ctx, self.key = ctx, key

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.ctx.add_time(self.key, time.perf_counter() - self.t0)
        return False


@runtime_checkable
class ModelPool(Protocol):
    """The models of a run (loaded on first use).

    Attributes:
      kind: the kind name the config chose (``model_pool.kind``).
      tasks: the task of each expert, in order.
    """

    kind: str
    tasks: list[str]

    @property
    def graphdef(self) -> Any:
        """Static graph definition of the model being merged (``nnx.merge(graphdef, params)``)."""

    def abstract_params(self) -> Params:
        """The param tree's structure as ``jax.ShapeDtypeStruct`` leaves, without loading or
        training anything (for checking the config before work starts)."""

    def base(self) -> Params:
        """θ₀, the pretrained model's params."""

    def experts(self) -> list[Params]:
        """One param tree per task (order of :attr:`tasks`), same structure as :meth:`base`."""

    def adapter(self) -> Any:
        """The calibration adapter (:class:`epmq_jax.calib.CalibAdapter`) of the model."""

    def calibration_inputs(self) -> list[Any]:
        """Per task, ``calib.n_per_task`` model inputs from its calibration split."""

    def multitask(self) -> Params | None:
        """One model fine-tuned on all tasks (the ceiling of a single model), or None."""


@runtime_checkable
class TaskPool(Protocol):
    """The tasks of a run and how a model is scored on them.

    Attributes:
      kind: the kind name the config chose (``task_pool.kind``).
      tasks: task names, in order (the model pool's order).
      select_split: the split merge coefficients are chosen on (None: selection is not
        allowed, e.g. GLUE, whose validation split is the reported one).
      report_split: the split the table reports.
      note: one sentence for the report saying what the scores are.
    """

    kind: str
    tasks: list[str]
    select_split: str | None
    report_split: str
    note: str

    def evaluate(self, params: Params | Sequence[Params], split: str) -> dict[str, dict[str, float]]:
        """Scores float params on every task's ``split``.

        Args:
          params: one tree for all tasks, or one per task (the FP experts).
          split: a split name of the pool.

        Returns:
          ``{task: {"score": percent, **metrics}}`` in task order.
        """

    def checkpoint_state(self) -> tuple[Params, dict[str, Any]]:
        """What a checkpoint must carry for :meth:`evaluate` to run again without the experts:
        ``(arrays saved beside the model, JSON metadata)``."""


TaskPoolBuilder = Callable[[Context, ModelPool, Mapping[str, Any] | None], TaskPool]
ModelPoolBuilder = Callable[[Context], ModelPool]


def unit_columns(head: Any) -> np.ndarray:
    """A linear head ``(d, n_classes)`` with its columns scaled to unit length (float32 NumPy), as a
    cosine or zero-shot classifier reads the embedding: what a task pool's ``readout_heads()``
    returns (E-PMQ-full's ``heads``)."""
    w = np.asarray(head, np.float32)
    return w / (np.linalg.norm(w, axis=0, keepdims=True) + 1e-6)


def scores(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{task: {"score": s, ...}}`` -> ``{task: s}``."""
    return {t: float(r["score"]) for t, r in results.items()}

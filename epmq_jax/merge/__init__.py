"""Model merging: pure functions over parameter pytrees (METHOD.md §2).

Inputs are any pytrees of arrays (linen param dicts, ``nnx.State``, nested dicts); every
function is jit-compatible (bind keyword settings with ``functools.partial``).

Conventions shared by all functions:
- ``filter`` (a regex matched with ``re.search`` on the leaf path ``"a/b/0/kernel"``, a compiled
  pattern, or a predicate) selects the merged leaves; only floating-point leaves are merged.
  **Every other leaf is taken from ``base``** (from ``experts[0]`` for :func:`average`).
- Inputs are checked eagerly (``validate=True``): a ``ValueError`` names the first offending
  leaf path with both shapes or dtypes, a missing or extra path, NaN/inf, or an empty expert list.
- Arithmetic runs in at least float32; outputs keep each leaf's dtype.

Checkpoints too large to hold T times (LLMs) are merged tensor by tensor from disk to disk by
:func:`merge_checkpoints` (:mod:`epmq_jax.merge.streaming`), or from a mergekit recipe by
:func:`merge_recipe` (:mod:`epmq_jax.merge.mergekit`).
"""

from epmq_jax.merge._basic import average, task_arithmetic, task_vector
from epmq_jax.merge._dare import dare
from epmq_jax.merge._regmean import regmean
from epmq_jax.merge._ties import ties_merging
from epmq_jax.merge.mergekit import merge_recipe, read_recipe
from epmq_jax.merge.streaming import merge_checkpoints

__all__ = ["average", "dare", "merge_checkpoints", "merge_recipe", "read_recipe", "regmean",
           "task_arithmetic", "task_vector", "ties_merging"]

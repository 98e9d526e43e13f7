"""A block's forward pass split at its groups' inputs, so that calibrating it runs it about once.

The driver calibrates a block group by group (true-sequential): group g's input depends on the
calibrated kernels of the groups before it. Running ``adapter.run_block`` for every group (and
once more for the block's output) repeats the work of every earlier group each time: for a ViT
or Llama block about 2.2 forward passes per block, attention included.

Nothing in the adapter contract changes. From the jaxpr of ``adapter.run_block`` (traced once
per block kind and input shapes, nothing computed) every operation gets a *level*: the highest
group whose kernel it depends on, -1 for none. Segment g (g = 0 .. G) runs the operations of
level g - 1 (segment 0 those of level -1) and hands on its *residuals*: the values it or an
earlier segment computed that a later segment reads. When segment g runs, groups < g are
calibrated, so the capture it returns for group g is exactly ``run_block``'s on the block as it
stands; segment G returns the block's output. Each operation runs once per block, with the
kernels the sequential method prescribes.

The split is used only where it is safe and pays: :func:`plan` returns None (and the driver runs
``run_block`` per group as before) when a group's capture depends on its own or a later group's
kernel, or when the residuals held between segments would be large next to the block's input
and captures (:data:`MAX_RESIDUAL_RATIO`). Operations are replayed primitive by primitive
(``primitive.bind``), as JAX's own jaxpr interpreters do; nested calls (``pjit``, custom
derivatives) run whole, at the level of their inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import Literal

PyTree = Any
# residual bytes held between segments (largest set, per batch) at most this many times the
# bytes of the block's input and its groups' captures; beyond, the driver recomputes instead
MAX_RESIDUAL_RATIO = 4.0


def _rel(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


@dataclasses.dataclass(eq=False, frozen=True)
class Plan:
    """``run_block`` of one block kind and shape, split into G + 1 segments (see the module
    docstring). Hashed by identity: a static argument of the driver's compiled passes (one plan
    per kind and shapes, cached, so every block of that kind shares the compiled code).

    Attributes:
      n_groups: G.
      residual_bytes: the largest residual set of one batch, in bytes.
    """

    consts: tuple
    invars: tuple
    params_def: Any
    n_params: int
    segments: tuple            # G + 1 tuples of equations
    handed: tuple              # handed[g]: the variables segment g hands on (g < G)
    captures: tuple            # per group, (its capture's output atoms, treedef)
    out: tuple                 # (the block output's atoms, treedef)
    n_groups: int
    residual_bytes: int

    def run(self, g: int, block_params: PyTree, carry: PyTree, residuals: tuple) -> tuple[Any, tuple]:
        """Segment ``g`` on one batch: ``(group g's capture, or the block's output for g = G;
        the residuals to hand on, () after the last segment)``."""
        leaves, tdef = jax.tree.flatten(block_params)
        if tdef != self.params_def:
            raise ValueError(f"block params of another structure than the traced ones: {tdef} vs "
                             f"{self.params_def}")
        env: dict = dict(zip(self.invars, [*leaves, *jax.tree.leaves(carry)]))
        env.update(zip(self.handed[g - 1] if g > 0 else (), residuals))
        env.update(self.consts)

        def read(a):
            return a.val if isinstance(a, Literal) else env[a]

        for eqn in self.segments[g]:      # as jax.core.eval_jaxpr replays an equation
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)  # older JAX
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*subfuns, *[read(a) for a in eqn.invars], **params)
            env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else (outs,)))
        atoms, tdef = self.out if g == self.n_groups else self.captures[g]
        handed = tuple(read(v) for v in self.handed[g]) if g < self.n_groups else ()
        return tdef.unflatten([read(a) for a in atoms]), handed


def plan(adapter, kind: Hashable, groups: Sequence[Sequence[str]], block_params: PyTree,
         carry: PyTree) -> Plan | None:
    """The split of ``adapter.run_block(kind, ., .)`` at the inputs of ``groups`` (their first
    paths), for params and one batch's carry of these shapes (arrays or ``ShapeDtypeStruct``);
    None where it is unsafe or would hold too much (module docstring). Cached per adapter, kind,
    groups and shapes."""
    sig = lambda tree: (jax.tree.structure(tree),   # noqa: E731
                        tuple((tuple(x.shape), np.dtype(x.dtype).name) for x in jax.tree.leaves(tree)))
    return _plan(adapter, kind, tuple(tuple(g) for g in groups), sig(block_params), sig(carry))


def _abstract(sig) -> PyTree:
    tdef, leaves = sig
    return tdef.unflatten([jax.ShapeDtypeStruct(s, d) for s, d in leaves])


@functools.lru_cache(maxsize=64)
def _plan(adapter, kind, groups, params_sig, carry_sig) -> Plan | None:
    params, carry = _abstract(params_sig), _abstract(carry_sig)
    firsts = [g[0] for g in groups]

    def fn(p, c):
        out, caps = adapter.run_block(kind, p, c)
        if any(f not in caps for f in firsts):
            raise KeyError("missing capture")
        return out, tuple(caps[f] for f in firsts)

    try:
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(params, carry)
    except KeyError:
        return None      # the driver's own pass names the missing capture
    jaxpr = closed.jaxpr
    out_shape, cap_shapes = shapes
    n_out = len(jax.tree.leaves(out_shape))
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    group_of = {rel: gi for gi, g in enumerate(groups) for rel in g}
    level: dict = {v: group_of.get(_rel(path), -1) for v, (path, _) in zip(jaxpr.invars, flat_params)}
    level.update({v: -1 for v in jaxpr.invars[len(flat_params):]})
    level.update({v: -1 for v in jaxpr.constvars})

    def lvl(a):
        return -1 if isinstance(a, Literal) else level[a]

    eqn_level = []
    for eqn in jaxpr.eqns:
        lv = max([lvl(a) for a in eqn.invars], default=-1)
        eqn_level.append(lv)
        level.update({v: lv for v in eqn.outvars})

    G = len(groups)
    outvars = list(jaxpr.outvars)
    cap_atoms, start = [], n_out
    for shape in cap_shapes:
        n = len(jax.tree.leaves(shape))
        cap_atoms.append((tuple(outvars[start:start + n]), jax.tree.structure(shape)))
        start += n
    for g, (atoms, _) in enumerate(cap_atoms):
        if any(lvl(a) >= g for a in atoms):
            return None          # group g's input depends on its own or a later kernel
    seg_of = lambda lv: min(lv + 1, G)   # noqa: E731

    # the segment where each variable is first needed: as an input of an equation or an output
    need: dict = {}
    for g, (atoms, _) in enumerate(cap_atoms):
        for a in atoms:
            if not isinstance(a, Literal):
                need.setdefault(a, set()).add(g)
    for a in outvars[:n_out]:
        if not isinstance(a, Literal):
            need.setdefault(a, set()).add(G)
    live = [False] * len(jaxpr.eqns)
    for i in range(len(jaxpr.eqns) - 1, -1, -1):     # dead-code elimination, backwards
        eqn = jaxpr.eqns[i]
        users = set().union(*[need.get(v, set()) for v in eqn.outvars])
        if not users:
            continue
        live[i] = True
        s = seg_of(eqn_level[i])
        for a in eqn.invars:
            if not isinstance(a, Literal):
                need.setdefault(a, set()).add(s)

    defined = set(jaxpr.invars) | set(jaxpr.constvars)
    produced = {v: seg_of(eqn_level[i]) for i, eqn in enumerate(jaxpr.eqns) if live[i] for v in eqn.outvars}
    handed, res_bytes = [], 0
    for g in range(G):
        hv = tuple(v for v, s in produced.items() if s <= g and max(need.get(v, {-1})) > g and v not in defined)
        handed.append(hv)
        res_bytes = max(res_bytes, sum(_nbytes(v.aval) for v in hv))
    segments = tuple(tuple(eqn for i, eqn in enumerate(jaxpr.eqns) if live[i] and seg_of(eqn_level[i]) == g)
                     for g in range(G + 1))
    base = sum(_nbytes(v.aval) for v in jaxpr.invars[len(flat_params):])
    base += sum(_nbytes(a.aval) for atoms, _ in cap_atoms for a in atoms)
    if res_bytes > MAX_RESIDUAL_RATIO * base:
        return None
    return Plan(consts=tuple(zip(jaxpr.constvars, closed.consts)), invars=tuple(jaxpr.invars),
                params_def=jax.tree.structure(params), n_params=len(flat_params), segments=segments,
                handed=tuple(handed), captures=tuple(cap_atoms),
                out=(tuple(outvars[:n_out]), jax.tree.structure(out_shape)), n_groups=G,
                residual_bytes=res_bytes)

"""Every matmul in the solvers, rounders and reported objectives runs at Precision.HIGHEST.

On CPU the DEFAULT precision is float32 anyway, so no number can tell; on recent NVIDIA GPUs
DEFAULT is TF32 and on TPUs bf16 passes. These tests read the programs instead: each entry
point is traced to a jaxpr (``jax.make_jaxpr``, recursing into every sub-jaxpr: jit, while,
cond, scan, custom_jvp/custom_vjp calls, shard_map) and every ``dot_general`` in it must say
``precision=HIGHEST`` for both operands and accumulate in float32 (``preferred_element_type``
float32 or unset).

A function that synchronises with the host (``calib.epmq_layer`` reads the solve's ``ok``
flag and reports floats) cannot be traced whole; for it every ``dot_general`` that jax binds
while running it is recorded, with all compilation caches cleared first so that every jitted
piece is traced again.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr

from epmq_jax import calib, quant
from epmq_jax.calib import stats
from epmq_jax.quant import QuantSpec

HIGHEST = lax.Precision.HIGHEST


def _sub_jaxprs(value):
    if isinstance(value, ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _dot_generals(jaxpr: Jaxpr):
    """(input avals, params) of every dot_general in ``jaxpr`` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield tuple(v.aval for v in eqn.invars), eqn.params
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from _dot_generals(sub)


def _not_highest(dots) -> list[str]:
    """The dots (as text) whose precision is not HIGHEST or that accumulate in another type."""
    bad = []
    for avals, params in dots:
        prec = params.get("precision")
        prec = prec if isinstance(prec, tuple) else (prec,)
        acc = params.get("preferred_element_type")
        if any(p != HIGHEST for p in prec) or (acc is not None and acc != jnp.float32):
            bad.append(f"dot_general{[str(a) for a in avals]} precision={params.get('precision')} "
                       f"preferred_element_type={acc}")
    return bad


def assert_highest_traced(fn, *args) -> int:
    """Traces ``fn(*args)``; fails on a dot_general below HIGHEST; returns how many it saw."""
    dots = list(_dot_generals(jax.make_jaxpr(fn)(*args).jaxpr))
    bad = _not_highest(dots)
    assert not bad, "\n".join(bad)
    return len(dots)


def assert_highest_run(monkeypatch, fn, *args) -> int:
    """Runs ``fn(*args)`` recording every dot_general bound; fails on one below HIGHEST."""
    seen = []
    bind = lax.dot_general_p.bind

    def recording_bind(*operands, **params):
        if params.get("precision") is None and jax.config.jax_default_matmul_precision in ("highest", "float32"):
            # inside `with jax.default_matmul_precision("highest")`: the stated precision is HIGHEST
            params = {**params, "precision": (HIGHEST, HIGHEST)}
        seen.append((tuple(getattr(x, "aval", None) for x in operands), params))
        return bind(*operands, **params)

    monkeypatch.setattr(lax.dot_general_p, "bind", recording_bind)
    jax.clear_caches()
    jax.block_until_ready(fn(*args))
    bad = _not_highest(seen)
    assert not bad, "\n".join(bad)
    return len(seen)


# ---------------------------------------------------------------- the checks can fail

def test_helpers_catch_a_default_precision_dot(monkeypatch):
    def sloppy(a):
        return jnp.dot(a, a, precision=HIGHEST) + jax.jit(lambda b: b @ b)(a)

    x = jnp.ones((4, 4))
    with pytest.raises(AssertionError, match="precision=None"):
        assert_highest_traced(sloppy, x)
    with pytest.raises(AssertionError, match="precision=None"):
        assert_highest_run(monkeypatch, sloppy, x)
    bf16_acc = lambda a: lax.dot(a, a, precision=HIGHEST, preferred_element_type=jnp.bfloat16)
    with pytest.raises(AssertionError, match="bfloat16"):
        assert_highest_traced(bf16_acc, x.astype(jnp.bfloat16))


# ---------------------------------------------------------------- data


def _layer(d_in=64, d_out=16, n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)) * 0.1, jnp.float32)
    return x, w, jnp.matmul(x.T, x, precision=HIGHEST)


# ---------------------------------------------------------------- quant


GPTQ_OPTIONS = list(itertools.product([32, -1], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("group_size,act_order,static_groups,return_info", GPTQ_OPTIONS)
def test_gptq(group_size, act_order, static_groups, return_info):
    _, w, h = _layer()
    spec = QuantSpec(bits=4, group_size=group_size)
    n = assert_highest_traced(
        lambda w, h: quant.gptq(w, h, spec, block_size=32, act_order=act_order,
                                static_groups=static_groups, return_info=return_info), w, h)
    assert n >= 1 + return_info     # the lazy update (+ the objective)


def test_rtn_and_dequantize():
    _, w, _ = _layer()
    assert_highest_traced(lambda w: quant.rtn(w, QuantSpec(bits=3, group_size=16)).dequantize(), w)


def test_awq(monkeypatch):
    """The one-layer AWQ (scale search judged on the layer's output, clip search) and the pieces
    the block-level AWQ of calib.awq is built from."""
    x, w, _ = _layer()
    spec = QuantSpec(bits=4, group_size=32)
    assert assert_highest_run(monkeypatch, lambda: quant.awq(w, x, spec)) >= 2
    weight = jnp.ones(x.shape[0], jnp.float32)
    grams = quant.group_grams(x, weight, spec)
    assert assert_highest_traced(lambda x, wt: quant.group_grams(x, wt, spec), x, weight) >= 1
    assert assert_highest_traced(
        lambda w, g: quant.clip_search(w, g, jnp.float32(x.shape[0]), spec), w, grams) >= 1


# ---------------------------------------------------------------- calib


def test_statistics():
    x, w, _ = _layer()
    y = jnp.matmul(x, w, precision=HIGHEST)
    assert assert_highest_traced(stats.moments, x, y) >= 3
    assert assert_highest_traced(
        lambda x, y: calib.accumulate([[(x, y)], [(2 * x, y)]], "frobenius")[0], x, y) >= 6


def test_solve():
    x, w, h = _layer()
    # Cholesky + triangular solves (no dot_general of its own); any product must still be HIGHEST
    assert_highest_traced(lambda h, b, c: calib.solve(h, b, c, 0.01), h, h @ w, w)


def test_block_awq_through_the_driver(monkeypatch):
    """llm-awq's block-level search (model forwards under default_matmul_precision("highest"))."""
    from flax import nnx

    from epmq_jax.models import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, projection_dim=8)
    model = CLIPVisionModelWithProjection(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    images = [np.random.default_rng(0).standard_normal((4, 16, 16, 1)).astype(np.float32)]
    config = calib.CalibConfig(objective=calib.Objective(kind="gptq"), rounding="awq",
                               spec=QuantSpec(bits=4, group_size=32), batch_size=4)
    n = assert_highest_run(monkeypatch, lambda: jax.tree.leaves(
        calib.calibrate(calib.vit_adapter(model), params, images, config).params))
    assert n >= 6


@pytest.mark.parametrize("rounding", ["gptq", "rtn", "none"])   # AWQ is block-level (calib.awq)
def test_epmq_layer(monkeypatch, rounding):
    x, w, _ = _layer()
    experts = [w + 0.01, w - 0.02]
    xs = [x, 0.5 * x]
    n = assert_highest_run(monkeypatch, lambda: calib.epmq_layer(
        w, experts, xs, QuantSpec(bits=4, group_size=32), rounding=rounding))
    assert n >= 4

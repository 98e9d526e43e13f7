"""A block's forward split at its groups' inputs (epmq_jax.calib._segments), against run_block.

For every adapter family (a user's linen block, CLIP ViT, T5 encoder and decoder blocks, Llama
and a sliding-window Qwen2 decoder) the chain of segments, each fed the residuals of the one
before, must give run_block's capture of every group and the block's output; and the driver
must calibrate the same whether it runs the segments or the whole block per group.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_calib_llm import calib_inputs
from test_calib_t5 import _task_inputs as t5_inputs
from test_calib_t5 import _tiny_model as t5_model
from test_driver import GROUPS, ToyAdapter, _problem
from test_driver_vit import CFG as VIT_CFG
from test_driver_vit import _perturbed
from test_models_llama import CASES, torch_model

from epmq_jax.calib import (
    CalibConfig,
    Objective,
    _segments,
    calibrate,
    decoder_adapter,
    t5_adapter,
    vit_adapter,
)
from epmq_jax.calib.adapter import get_path, key_path, set_path
from epmq_jax.models import from_pretrained
from epmq_jax.models.clip import CLIPVisionModelWithProjection
from epmq_jax.quant import QuantSpec


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, what
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(w).max())), err_msg=what)


def _check_chain(adapter, params, inputs):
    """Every block, calibrated group by group as the driver does (each group's kernels replaced
    before the next segment runs): segment g, fed the residuals of the segments before, equals
    run_block's capture of group g (its output for g = G) on the block as it then stands."""
    carry = adapter.embed(params, inputs)
    for i, path in enumerate(adapter.block_paths(params)):
        kind, block = adapter.block_kind(i), get_path(params, path)
        groups = adapter.linear_groups(kind)
        plan = _segments.plan(adapter, kind, groups, block, carry)
        assert plan is not None and plan.n_groups == len(groups), (i, kind)
        assert all(plan.segments[g] for g in range(1, len(groups) + 1)), (i, kind)   # a real split
        residuals = ()
        for g in range(len(groups) + 1):
            if g > 0:                  # group g - 1 "calibrated": its kernels change
                for rel in groups[g - 1]:
                    block = set_path(block, key_path(rel), 1.3 * get_path(block, key_path(rel)))
            out, caps = adapter.run_block(kind, block, carry)
            got, residuals = plan.run(g, block, carry, residuals)
            _assert_close(got, caps[groups[g][0]] if g < len(groups) else out, f"block {i} segment {g}")
        assert residuals == ()
        carry = out


def test_user_linen_block():
    merged, _, inputs = _problem()
    _check_chain(ToyAdapter(), merged, jnp.asarray(inputs[1]))


def test_clip_vit_blocks():
    model = CLIPVisionModelWithProjection(VIT_CFG, rngs=nnx.Rngs(0))
    params = _perturbed(_params(model), 3)
    _check_chain(vit_adapter(model), params, jax.random.normal(jax.random.key(1), (3, 16, 16, 3)))


def test_t5_encoder_and_decoder_blocks():
    model = t5_model(0)
    inputs = {k: jnp.asarray(v) for k, v in t5_inputs(1, n=4).items()}
    _check_chain(t5_adapter(model), _params(model), inputs)


@pytest.mark.parametrize("case", ["llama", "qwen2-window"])
def test_decoder_blocks(tmp_path, case):
    family, overrides = CASES[case]
    torch_model(tmp_path, family, **overrides)
    model = from_pretrained(tmp_path)
    inputs = {k: jnp.asarray(v) for k, v in calib_inputs(2, n=3).items()}
    _check_chain(decoder_adapter(model), _params(model), inputs)


def test_unsafe_or_large_splits_are_refused(monkeypatch):
    # down's input depends on up and gate: listed first, it cannot be captured before them
    merged, _, inputs = _problem()
    carry = ToyAdapter().embed(merged, jnp.asarray(inputs[0]))
    assert _segments.plan(ToyAdapter(), 0, GROUPS[::-1], merged["block0"], carry) is None
    assert _segments.plan(ToyAdapter(), 0, GROUPS, merged["block0"], carry) is not None
    monkeypatch.setattr(_segments, "MAX_RESIDUAL_RATIO", 0.0)       # residuals never small enough
    _segments._plan.cache_clear()
    assert _segments.plan(ToyAdapter(), 0, GROUPS, merged["block0"], carry) is None
    _segments._plan.cache_clear()


@pytest.mark.parametrize("objective", ["gptq", "epmq"])
def test_driver_calibrates_the_same_with_and_without_the_split(objective, monkeypatch):
    # ViT, 3 tasks of 3/5/2 images in batches of 2 (padding; GPTQ pools them): the segments'
    # residuals are handed on per task and batch, and the last segment gives the next block's
    # input. Unrounded, so the kernels agree up to float32 order.
    model = CLIPVisionModelWithProjection(VIT_CFG, rngs=nnx.Rngs(0))
    merged = _params(model)
    experts = [_perturbed(merged, 10 + t) for t in range(3)]
    pixels = [np.asarray(jax.random.normal(jax.random.key(t), (n, 16, 16, 3))) for t, n in enumerate((3, 5, 2))]
    cfg = CalibConfig(objective=Objective(kind=objective, lam=0.3), rounding="none", batch_size=2)
    real, used = _segments.plan, []
    monkeypatch.setattr(_segments, "plan", lambda *a: (used.append(real(*a)), used[-1])[1])
    split = calibrate(vit_adapter(model), merged, pixels, cfg, experts=experts if objective == "epmq" else None)
    assert used and all(p is not None for p in used)          # every block ran split
    monkeypatch.setattr(_segments, "plan", lambda *a: None)
    whole = calibrate(vit_adapter(model), merged, pixels, cfg, experts=experts if objective == "epmq" else None)
    for a, b in zip(split.stats, whole.stats, strict=True):
        assert a["path"] == b["path"]
        assert a["obj_relaxed"] == pytest.approx(b["obj_relaxed"], rel=1e-4, abs=1e-6), a["path"]
    for p, w in zip(jax.tree.leaves(split.params), jax.tree.leaves(whole.params), strict=True):
        np.testing.assert_allclose(np.asarray(p), np.asarray(w), rtol=1e-4, atol=1e-5)
    # and with rounding: the same quality
    spec = QuantSpec(bits=4, group_size=16)
    cfg = CalibConfig(objective=Objective(kind=objective, lam=0.3), spec=spec, batch_size=2)
    monkeypatch.setattr(_segments, "plan", real)
    q_split = calibrate(vit_adapter(model), merged, pixels, cfg, experts=experts if objective == "epmq" else None)
    monkeypatch.setattr(_segments, "plan", lambda *a: None)
    q_whole = calibrate(vit_adapter(model), merged, pixels, cfg, experts=experts if objective == "epmq" else None)
    for a, b in zip(q_split.stats, q_whole.stats, strict=True):
        assert a["obj_rounded"] == pytest.approx(b["obj_rounded"], rel=0.1), a["path"]   # as test_driver's mesh test


def test_without_a_budget_the_split_is_held_to_a_size(monkeypatch):
    # the handed-on values of all tasks must fit in max(2 GiB, 3x the carries) per device; with
    # both limits at 0 the driver runs every block whole, and calibrates the same
    from epmq_jax.calib import driver

    merged, experts, inputs = _problem()
    cfg = CalibConfig(objective=Objective(kind="epmq", lam=0.5), rounding="none", damp=0.0, batch_size=4)
    real, split = driver._advance_segment, []
    monkeypatch.setattr(driver, "_advance_segment", lambda *a, **k: (split.append(1), real(*a, **k))[1])
    a = calibrate(ToyAdapter(), merged, inputs, cfg, experts=experts)
    assert len(split) == 2 * 3                                   # 2 blocks x 3 tasks
    monkeypatch.setattr(driver, "_UNBUDGETED_SPLIT_BYTES", 0)
    monkeypatch.setattr(driver, "_UNBUDGETED_SPLIT_CARRIES", 0)
    b = calibrate(ToyAdapter(), merged, inputs, cfg, experts=experts)
    assert len(split) == 2 * 3
    for x, y in zip(a.stats, b.stats, strict=True):
        assert y["obj_relaxed"] == pytest.approx(x["obj_relaxed"], rel=1e-4), x["path"]

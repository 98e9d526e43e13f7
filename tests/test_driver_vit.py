"""The ViT adapter (epmq_jax.calib.vit_adapter) on a tiny CLIP vision model from epmq_jax.models.clip."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epmq_jax import quant
from epmq_jax.calib import CalibConfig, Objective, calibrate, vit_adapter
from epmq_jax.calib.adapter import VIT_GROUPS, get_path
from epmq_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from epmq_jax.quant import QuantSpec

CFG = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=16, patch_size=8, projection_dim=16)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _perturbed(params, seed, scale=0.2):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([a + scale * jnp.std(a) * jax.random.normal(k, a.shape) if a.ndim >= 2 else a
                              for a, k in zip(leaves, keys)])


def _features(model, params, pixels):
    deq = jax.tree.map(lambda q: q.dequantize() if quant.is_quantized(q) else q, params,
                       is_leaf=quant.is_quantized)
    graphdef, _ = nnx.split(model)
    return np.asarray(nnx.merge(graphdef, deq).get_image_features(pixels))


def test_run_block_matches_the_model_and_captures_layer_inputs():
    model = CLIPVisionModelWithProjection(CFG, rngs=nnx.Rngs(0))
    ad = vit_adapter(model)
    p = _params(model)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    h = ad.embed(p, x)
    np.testing.assert_allclose(h, model.embed(x), rtol=1e-6)
    paths = ad.block_paths(p)
    assert paths == [("encoder", "layers", 0), ("encoder", "layers", 1)]
    y, caps = ad.run_block(0, get_path(p, paths[1]), h)
    layer = model.encoder.layers[1]
    np.testing.assert_allclose(y, layer(h), rtol=1e-5, atol=1e-5)
    assert set(caps) == {q for g in VIT_GROUPS for q in g}
    ln1 = layer.layer_norm1(h)
    for k in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_allclose(caps[f"self_attn/{k}/kernel"], ln1, rtol=1e-5, atol=1e-6)
    mid = h + layer.self_attn(ln1)
    np.testing.assert_allclose(caps["mlp/fc1/kernel"], layer.layer_norm2(mid), rtol=1e-5, atol=1e-5)
    assert caps["mlp/fc2/kernel"].shape == (3, 5, 64)


def test_epmq_on_vit_moves_features_toward_the_experts():
    model = CLIPVisionModelWithProjection(CFG, rngs=nnx.Rngs(0))
    base = _params(model)
    experts = [_perturbed(base, s) for s in (1, 2)]
    merged = jax.tree.map(lambda a, b: (a + b) / 2, *experts)
    r = np.random.default_rng(0)
    pixels = [r.normal(size=(24, 16, 16, 3)).astype(np.float32) for _ in experts]
    cfg = CalibConfig(objective=Objective(kind="epmq", lam=0.1), spec=QuantSpec(bits=8, group_size=-1),
                      batch_size=16)
    res = calibrate(vit_adapter(model), merged, pixels, cfg, experts=experts)
    assert len(res.stats) == 12
    for path in (f"encoder/layers/{i}/{q}" for i in range(2) for g in VIT_GROUPS for q in g):
        leaf = get_path(res.params, [int(s) if s.isdigit() else s for s in path.split("/")])
        assert isinstance(leaf, quant.QuantizedWeight), path
    # on every task's data, the calibrated model is closer to that task's expert than the merge is
    for t, x in enumerate(pixels):
        target = _features(model, experts[t], x)
        d_merge = np.linalg.norm(_features(model, merged, x) - target)
        d_epmq = np.linalg.norm(_features(model, res.params, x) - target)
        assert d_epmq < d_merge, (t, d_epmq, d_merge)


CFG3 = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                        image_size=16, patch_size=8, projection_dim=16)


def test_compilation_is_paid_in_the_first_block_only():
    model = CLIPVisionModelWithProjection(CFG3, rngs=nnx.Rngs(0))
    base = _params(model)
    experts = [_perturbed(base, s) for s in (3, 4)]
    merged = jax.tree.map(lambda a, b: (a + b) / 2, *experts)
    r = np.random.default_rng(1)
    pixels = [r.normal(size=(n, 16, 16, 3)).astype(np.float32) for n in (5, 7)]
    compiles, per_block = [], []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for objective in (Objective(kind="gptq"), Objective(kind="epmq", lam=0.1)):
            per_block.clear()
            compiles.clear()
            cfg = CalibConfig(objective=objective, spec=QuantSpec(bits=4, group_size=16), batch_size=4)
            calibrate(vit_adapter(model), merged, pixels, cfg,
                      experts=experts if objective.kind == "epmq" else None,
                      on_block=lambda k: (per_block.append(len(compiles)), compiles.clear()))
            assert len(per_block) == 3
            assert per_block[1:] == [0, 0], (objective.kind, per_block)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_bfloat16_model_end_to_end_keeps_its_dtype():
    model = CLIPVisionModelWithProjection(CFG, rngs=nnx.Rngs(0))
    base = _params(model)
    experts = [_perturbed(base, s) for s in (5, 6)]
    merged = jax.tree.map(lambda a, b: (a + b) / 2, *experts)
    bf16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    r = np.random.default_rng(2)
    pixels = [r.normal(size=(8, 16, 16, 3)).astype(np.float32) for _ in experts]
    kernels = [f"encoder/layers/{i}/{q}" for i in range(2) for g in VIT_GROUPS for q in g]
    for name, cfg, with_experts in [
        ("gptq", CalibConfig(objective=Objective(kind="gptq"), spec=QuantSpec(bits=8, group_size=-1)), False),
        ("rtn", CalibConfig(objective=Objective(kind="gptq"), rounding="rtn", spec=QuantSpec(bits=8, group_size=-1)), False),
        ("epmq", CalibConfig(objective=Objective(kind="epmq", lam=0.1), spec=QuantSpec(bits=8, group_size=-1)), True),
        ("epmq-fp", CalibConfig(objective=Objective(kind="epmq", lam=0.1), rounding="none"), True),
    ]:
        res = calibrate(vit_adapter(model), bf16(merged), pixels, cfg,
                        experts=[bf16(e) for e in experts] if with_experts else None)
        deq = jax.tree.map(lambda q: q.dequantize() if quant.is_quantized(q) else q, res.params,
                           is_leaf=quant.is_quantized)
        assert {a.dtype for a in jax.tree.leaves(deq)} == {jnp.dtype(jnp.bfloat16)}, name
        for path in kernels:
            leaf = get_path(res.params, [int(s) if s.isdigit() else s for s in path.split("/")])
            if name != "epmq-fp":
                assert isinstance(leaf, quant.QuantizedWeight) and leaf.dtype == "bfloat16", (name, path)
        if name in ("rtn", "epmq"):
            continue
        # the bfloat16 run computes what the float32 run computes, to bfloat16's precision
        ref = calibrate(vit_adapter(model), merged, pixels, cfg, experts=experts if with_experts else None)
        x = pixels[0]
        f_bf16 = _features(model, jax.tree.map(lambda a: a.astype(jnp.float32), deq), x)
        f_ref = _features(model, ref.params, x)
        assert np.linalg.norm(f_bf16 - f_ref) < 0.05 * np.linalg.norm(f_ref), name

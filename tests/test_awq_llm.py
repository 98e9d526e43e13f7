"""AWQ as llm-awq does it (epmq_jax.calib.awq through the driver, rounding="awq").

Checked against a NumPy float64 transcription of llm-awq's search (tests/_llm_awq_numpy.py) on a
CLIP block (LayerNorm -> q/k/v attention -> out_proj, LayerNorm -> MLP), against the original
float model for the folding, and against RTN on block outputs for a tiny ViT and a tiny T5.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _llm_awq_numpy import (
    apply_clip,
    auto_clip_layer,
    clip_errors,
    pseudo_quantize,
    search_module_scale,
)
from flax import nnx

from epmq_jax import quant
from epmq_jax.calib import (
    CalibConfig,
    NnxAdapter,
    Objective,
    calibrate,
    decoder_adapter,
    solve_layer,
    t5_adapter,
    vit_adapter,
)
from epmq_jax.calib.adapter import VIT_GROUPS, get_path, set_path
from epmq_jax.calib.awq import fold_scales
from epmq_jax.calib.stats import moments
from epmq_jax.models import llama, t5
from epmq_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection

SPEC = quant.QuantSpec(bits=3, group_size=16)
VIT = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=16, patch_size=8, projection_dim=16)
LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _deq(tree):
    return jax.tree.map(lambda q: q.dequantize() if quant.is_quantized(q) else q, tree, is_leaf=quant.is_quantized)


def _awq_config(**kw):
    return CalibConfig(objective=Objective(kind="gptq"), rounding="awq", spec=SPEC, **kw)


def _outliers(r, width, scale):
    """A norm scale with a few outlier channels (as pretrained transformers have)."""
    s = 1.0 + 0.1 * r.normal(size=width)
    s[r.choice(width, 3, replace=False)] *= 6.0
    return jnp.asarray(s * scale, jnp.float32)


def _vit(n_layers, seed=0):
    model = CLIPVisionModelWithProjection(dataclasses.replace(VIT, num_hidden_layers=n_layers), rngs=nnx.Rngs(seed))
    p = _params(model)
    r = np.random.default_rng(seed)
    for i in range(n_layers):
        layer = p["encoder"]["layers"][i]
        for ln in ("layer_norm1", "layer_norm2"):
            layer[ln]["scale"] = _outliers(r, VIT.hidden_size, 1.0)
            layer[ln]["bias"] = jnp.asarray(0.1 * r.normal(size=VIT.hidden_size), jnp.float32)
    return model, p


def _pixels(seed, sizes):
    r = np.random.default_rng(seed)
    return [r.normal(size=(n, 16, 16, 3)).astype(np.float32) for n in sizes]


# ----------------------------------------------------------------------------- float64 CLIP block


def _np_block(block):
    """Float64 torch-layout weights ``(out, in)``, biases and norms of a CLIP encoder block."""
    f = lambda a: np.asarray(a, np.float64)
    d = {}
    for sub, names in (("self_attn", LAYERS[:4]), ("mlp", LAYERS[4:])):
        for n in names:
            d[n] = f(block[sub][n]["kernel"]).T
            d[n + ".b"] = f(block[sub][n]["bias"])
    for ln in ("layer_norm1", "layer_norm2"):
        d[ln + ".w"], d[ln + ".b"] = f(block[ln]["scale"]), f(block[ln]["bias"])
    return d


def _ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _linear(x, w, b):
    return x @ w.T + b


def _heads(d, x):
    """Attention before out_proj: (n, t, width)."""
    n, t, width = x.shape
    hd = width // VIT.num_attention_heads
    split = lambda y: y.reshape(n, t, -1, hd)
    q, k, v = (split(_linear(x, d[m], d[m + ".b"])) for m in ("q_proj", "k_proj", "v_proj"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v).reshape(n, t, width)


def _attention(d, x):
    return _linear(_heads(d, x), d["out_proj"], d["out_proj.b"])


def _act(d, x):
    y = _linear(x, d["fc1"], d["fc1.b"])
    return y / (1.0 + np.exp(-1.702 * y))


def _mlp(d, x):
    return _linear(_act(d, x), d["fc2"], d["fc2.b"])


def _llm_awq(d, h, bits, gs):
    """llm-awq's run_awq on one CLIP block with float inputs ``h``: its OPT recipe, fc2 unscaled."""
    x1 = _ln(h, d["layer_norm1.w"], d["layer_norm1.b"])
    xo = _heads(d, x1)
    x2 = _ln(h + _attention(d, x1), d["layer_norm2.w"], d["layer_norm2.b"])
    feats = {"q_proj": x1, "k_proj": x1, "v_proj": x1, "out_proj": xo, "fc1": x2, "fc2": _act(d, x2)}
    pick = lambda names: {n: d[n] for n in names}
    searches = {
        "qkv": search_module_scale(lambda ws, x: _attention({**d, **ws}, x), pick(LAYERS[:3]), x1, bits, gs),
        "out_proj": search_module_scale(lambda ws, x: _linear(x, ws["out_proj"], d["out_proj.b"]),
                                        pick(["out_proj"]), xo, bits, gs),
        "fc1": search_module_scale(lambda ws, x: _mlp({**d, **ws}, x), pick(["fc1"]), x2, bits, gs),
    }
    s_qkv, s_o, s_fc1 = (searches[k][1] for k in ("qkv", "out_proj", "fc1"))
    f = dict(d)   # apply_scale: scale_ln_fcs, scale_fc_fc
    f["layer_norm1.w"], f["layer_norm1.b"] = d["layer_norm1.w"] / s_qkv, d["layer_norm1.b"] / s_qkv
    for n in LAYERS[:3]:
        f[n] = d[n] * s_qkv[None, :]
    f["v_proj"] = f["v_proj"] / s_o[:, None]
    f["v_proj.b"] = d["v_proj.b"] / s_o
    f["out_proj"] = d["out_proj"] * s_o[None, :]
    f["layer_norm2.w"], f["layer_norm2.b"] = d["layer_norm2.w"] / s_fc1, d["layer_norm2.b"] / s_fc1
    f["fc1"] = d["fc1"] * s_fc1[None, :]
    feats = {**feats, "q_proj": x1 / s_qkv, "k_proj": x1 / s_qkv, "v_proj": x1 / s_qkv,
             "out_proj": xo / s_o, "fc1": x2 / s_fc1}
    clipped = {n: f[n] if n in ("q_proj", "k_proj") else
               apply_clip(f[n], auto_clip_layer(f[n], feats[n], bits, gs)) for n in LAYERS}
    final = {n: pseudo_quantize(clipped[n], bits, gs) for n in LAYERS}
    return searches, f, feats, final


# ----------------------------------------------------------------------------- against llm-awq


@pytest.fixture(scope="module")
def vit_one_block():
    model, p = _vit(1, seed=0)
    pixels = _pixels(1, (107, 118))          # 1125 tokens: the clipping samples every 2nd
    res = calibrate(vit_adapter(model), p, pixels, _awq_config(batch_size=32))
    h = np.concatenate([np.asarray(model.embed(x), np.float64) for x in pixels])
    return model, p, pixels, res, h


def test_matches_numpy_llm_awq_on_a_clip_block(vit_one_block):
    model, p, _, res, h = vit_one_block
    d = _np_block(p["encoder"]["layers"][0])
    searches, folded, feats, final = _llm_awq(d, h, SPEC.bits, SPEC.group_size)
    ours = res.params["encoder"]["layers"][0]
    stats = {s["path"].split("/")[-2]: s for s in res.stats}

    # 1. the chosen ratios (each search is well separated in the reference: no near-ties)
    for key, layer in (("qkv", "q_proj"), ("out_proj", "out_proj"), ("fc1", "fc1")):
        ratio, _, hist = searches[key]
        best = sorted(hist)
        assert best[1] > best[0] * 1.002, (key, best[:2])
        assert stats[layer]["awq_ratio"] == pytest.approx(ratio, abs=1e-6), key
        assert stats[layer]["awq_loss"] == pytest.approx(min(hist), rel=1e-3), key
        assert stats[layer]["awq_loss_rtn"] == pytest.approx(hist[0], rel=1e-3), key
        assert ratio > 0, key    # the outlier channels make real scaling pay
    assert stats["fc2"]["awq_ratio"] is None          # quick_gelu: no scale for fc2

    # 2. the scales folded into layer_norm1 / layer_norm2 and v_proj's bias
    for ln in ("layer_norm1", "layer_norm2"):
        for leaf, key in (("scale", ".w"), ("bias", ".b")):
            np.testing.assert_allclose(ours[ln][leaf], folded[ln + key], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(ours["self_attn"]["v_proj"]["bias"], folded["v_proj.b"], rtol=2e-5, atol=1e-7)

    # 3. the quantized kernels: q/k are the unclipped RTN of the folded kernels; the others are
    # clipped about as well as llm-awq clips them (judged by auto_clip's own error on its
    # sampled tokens: the clipped grid has a tie that float precisions break differently, see
    # _llm_awq_numpy) and clearly better than not clipping
    for n in LAYERS:
        sub = "mlp" if n.startswith("fc") else "self_attn"
        qw = ours[sub][n]["kernel"]
        assert isinstance(qw, quant.QuantizedWeight) and qw.input_scale is None
        mine = np.asarray(qw.dequantize(), np.float64).T
        err = lambda q, n=n: clip_errors(folded[n], q, feats[n], SPEC.group_size).sum()
        unclipped = pseudo_quantize(folded[n], SPEC.bits, SPEC.group_size)
        if n in ("q_proj", "k_proj"):
            assert stats[n]["clip_shrink"] is None
            close = np.isclose(mine, final[n], rtol=1e-4, atol=1e-5 * np.abs(final[n]).max())
            assert close.mean() > 0.99, (n, close.mean())
            assert err(mine) == pytest.approx(err(final[n]), rel=1e-3), n
            # clipping would have changed them: the test tells clipped from unclipped
            bound = auto_clip_layer(folded[n], feats[n], SPEC.bits, SPEC.group_size)
            assert err(pseudo_quantize(apply_clip(folded[n], bound), SPEC.bits, SPEC.group_size)) < 0.99 * err(mine)
        else:
            assert stats[n]["clip_shrink"] > 0
            assert 0.8 < err(mine) / err(final[n]) < 1.25, (n, err(mine) / err(final[n]))
            assert err(mine) < 0.9 * err(unclipped), n


def test_result_is_a_plain_deployable_tree(vit_one_block):
    """Same structure as the float params, every kernel packed without input_scale, and the
    dequantized tree runs in the unchanged CLIP model."""
    model, p, pixels, res, _ = vit_one_block
    is_q = quant.is_quantized
    assert jax.tree.structure(res.params, is_leaf=is_q) == jax.tree.structure(p)
    qws = [x for x in jax.tree.leaves(res.params, is_leaf=is_q) if is_q(x)]
    assert len(qws) == 6 and all(q.input_scale is None for q in qws)
    graphdef, _ = nnx.split(model)
    out = nnx.merge(graphdef, _deq(res.params)).get_image_features(pixels[0][:4])
    assert out.shape == (4, VIT.projection_dim) and np.isfinite(np.asarray(out)).all()


def test_resumed_run_equals_uninterrupted(tmp_path):
    """The driver's checkpoint holds the folded norms and biases too, not only the kernels."""
    model, p = _vit(2, seed=5)
    adapter, pixels = vit_adapter(model), _pixels(8, (20,))
    full = calibrate(adapter, p, pixels, _awq_config(batch_size=16))

    def stop(k):
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(adapter, p, pixels, _awq_config(batch_size=16), checkpoint_dir=str(tmp_path), on_block=stop)
    resumed = calibrate(adapter, p, pixels, _awq_config(batch_size=16), checkpoint_dir=str(tmp_path))
    a, b = _deq(full.params), _deq(resumed.params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert [s["awq_ratio"] for s in full.stats] == [s["awq_ratio"] for s in resumed.stats]


# ----------------------------------------------------------------------------- folding is exact


def _keys(rel):
    return [int(k) if k.isdigit() else k for k in rel.split("/")]


def _random_scales(adapter, kind, block, seed):
    """Lognormal positive scales, one per AWQ group (the folding must be exact for any)."""
    r = np.random.default_rng(seed)
    return [jnp.asarray(np.exp(r.normal(size=get_path(block, _keys(g.layers[0])).shape[0])), jnp.float32)
            for g in adapter.awq_groups(kind)]


def _jitter_vectors(params, seed):
    """Every bias and norm scale moved off its initial 0 / 1, so that folding into it shows."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([a + 0.2 * jax.random.normal(k, a.shape) if a.ndim == 1 else a
                              for a, k in zip(leaves, keys)])


def _fold_all(adapter, params, seed):
    out = params
    for k, path in enumerate(adapter.block_paths(params)):
        kind = adapter.block_kind(k)
        block = get_path(params, path)
        out = set_path(out, path, fold_scales(block, adapter.awq_groups(kind),
                                              _random_scales(adapter, kind, block, seed + k)))
    return out


@pytest.mark.parametrize("act", ["quick_gelu", "relu"])
def test_folding_is_exact_vit(act):
    cfg = dataclasses.replace(VIT, num_hidden_layers=2, hidden_act=act)
    model = CLIPVisionModelWithProjection(cfg, rngs=nnx.Rngs(3))
    p = _jitter_vectors(_params(model), 4)
    adapter = vit_adapter(model)
    folded = _fold_all(adapter, p, seed=5)
    changed = [k for k in ("layer_norm1", "layer_norm2") if not np.allclose(
        folded["encoder"]["layers"][0][k]["scale"], p["encoder"]["layers"][0][k]["scale"])]
    assert changed == ["layer_norm1", "layer_norm2"]
    fc1_bias_changed = not np.allclose(folded["encoder"]["layers"][0]["mlp"]["fc1"]["bias"],
                                       p["encoder"]["layers"][0]["mlp"]["fc1"]["bias"])
    assert fc1_bias_changed == (act == "relu")   # fc2's scale goes into fc1 only through ReLU
    graphdef, _ = nnx.split(model)
    x = _pixels(4, (6,))[0]
    features = jax.jit(lambda params: nnx.merge(graphdef, params).get_image_features(x))
    want, got = np.asarray(features(p)), np.asarray(features(folded))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _t5(ff, seed=0, layers=2):
    cfg = t5.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=layers, num_decoder_layers=layers,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                      feed_forward_proj=ff)
    model = t5.T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(seed))
    return model, _params(model)


def _t5_inputs(seed, n):
    r = np.random.default_rng(seed)
    ids = r.integers(2, 40, (n, 12))
    mask = np.ones_like(ids)
    mask[::3, 8:] = 0
    dec = r.integers(2, 40, (n, 5))
    dec[:, 0] = 0
    dec_mask = np.ones_like(dec)
    dec_mask[1::4, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_folding_is_exact_t5(ff):
    model, p = _t5(ff, seed=1)
    p = _jitter_vectors(p, 2)
    adapter = t5_adapter(model)
    folded = _fold_all(adapter, p, seed=7)
    graphdef, _ = nnx.split(model)
    x = _t5_inputs(2, 6)

    @jax.jit
    def logits(params):
        return nnx.merge(graphdef, params)(
            x["input_ids"], x["attention_mask"], decoder_input_ids=x["decoder_input_ids"],
            decoder_attention_mask=x["decoder_attention_mask"])

    want, got = np.asarray(logits(p)), np.asarray(logits(folded))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for stack in ("encoder", "decoder"):
        blk = folded[stack]["block"][0]
        assert not np.allclose(blk["layer"][0]["layer_norm"]["scale"], p[stack]["block"][0]["layer"][0]["layer_norm"]["scale"])


# ----------------------------------------------------------------------------- better than RTN


def _hidden(kind, carry):
    """The block output to compare and its token mask: ViT hidden states, T5's stack states, a decoder's ``hidden``."""
    if not isinstance(carry, dict):
        return carry, None
    if "hidden" in carry:
        return carry["hidden"], carry["attention_mask"]
    key = "enc" if kind[0] == "encoder" else "dec"
    return carry[key], carry[key + "_mask"]


def _block_mse(adapter, params, quantized, inputs):
    """Σ over blocks of the masked MSE of the quantized block's output, both on the float model's inputs."""
    total = 0.0
    run = jax.jit(adapter.run_block, static_argnums=0)
    for x in inputs:
        carry = adapter.embed(params, jax.tree.map(jnp.asarray, x))
        for k, path in enumerate(adapter.block_paths(params)):
            kind = adapter.block_kind(k)
            want, _ = run(kind, get_path(params, path), carry)
            got, _ = run(kind, _deq(get_path(quantized, path)), carry)
            (w, m), (g, _) = _hidden(kind, want), _hidden(kind, got)
            m = np.ones(w.shape[:-1]) if m is None else np.asarray(m, np.float64)
            total += float(np.sum(m[..., None] * (np.asarray(g) - np.asarray(w)) ** 2) / (m.sum() * w.shape[-1]))
            carry = want
    return total


def _rtn_config():
    return CalibConfig(objective=Objective(kind="gptq"), rounding="rtn", spec=SPEC)


def test_awq_beats_rtn_on_block_outputs_vit():
    model, p = _vit(2, seed=2)
    adapter = vit_adapter(model)
    calib, held_out = _pixels(6, (40, 48)), _pixels(7, (32,))
    awq = calibrate(adapter, p, calib, _awq_config(batch_size=32)).params
    rtn = calibrate(adapter, p, calib, _rtn_config()).params
    e_awq, e_rtn = _block_mse(adapter, p, awq, held_out), _block_mse(adapter, p, rtn, held_out)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


def test_awq_beats_rtn_on_block_outputs_t5():
    model, p = _t5("gated-gelu", seed=3, layers=1)
    r = np.random.default_rng(3)
    for stack in ("encoder", "decoder"):
        for blk in p[stack]["block"].values():
            for layer in blk["layer"].values():
                layer["layer_norm"]["scale"] = _outliers(r, 32, 1.0)
    adapter = t5_adapter(model)
    calib, held_out = [_t5_inputs(8, 24), _t5_inputs(9, 20)], [_t5_inputs(10, 16)]
    awq = calibrate(adapter, p, calib, _awq_config(batch_size=16))
    rtn = calibrate(adapter, p, calib, _rtn_config()).params
    e_awq, e_rtn = _block_mse(adapter, p, awq.params, held_out), _block_mse(adapter, p, rtn, held_out)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    by_layer = {s["path"].split("/", 3)[-1]: s for s in awq.stats if s["block"] == 1}   # the decoder block
    assert by_layer["layer/1/EncDecAttention/k/kernel"]["awq_ratio"] is None   # the encoder output: no scale
    assert by_layer["layer/1/EncDecAttention/q/kernel"]["awq_ratio"] is not None
    assert by_layer["layer/1/EncDecAttention/k/kernel"]["clip_shrink"] is None
    assert by_layer["layer/1/EncDecAttention/v/kernel"]["clip_shrink"] is not None


def _llama(seed=0, **overrides):
    model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(**overrides), rngs=nnx.Rngs(seed))
    return model, _params(model)


def _llama_inputs(seed, n, seq=12):
    r = np.random.default_rng(seed)
    ids = r.integers(0, 128, (n, seq))
    mask = (np.arange(seq)[None, :] >= r.integers(0, seq - 4, (n, 1))).astype(np.int32)   # left padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4}, {"model_type": "qwen2"}],
                         ids=["gqa", "mha", "qwen2-bias"])
def test_folding_is_exact_llama(overrides):
    model, p = _llama(1, **overrides)
    p = _jitter_vectors(p, 3)
    adapter = decoder_adapter(model)
    folded = _fold_all(adapter, p, seed=9)
    graphdef, _ = nnx.split(model)
    x = _llama_inputs(2, 4)
    logits = jax.jit(lambda params: nnx.merge(graphdef, params)(x["input_ids"], x["attention_mask"]))
    want, got = np.asarray(logits(p)), np.asarray(logits(folded))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    attn = lambda tree: tree["model"]["layers"][0]["self_attn"]
    o_scaled = not np.allclose(attn(folded)["o_proj"]["kernel"], attn(p)["o_proj"]["kernel"])
    assert o_scaled == (overrides.get("num_key_value_heads") == 4)   # GQA: o_proj <- v_proj skipped


def test_awq_beats_rtn_on_block_outputs_llama():
    model, p = _llama(4, num_hidden_layers=1)
    r = np.random.default_rng(4)
    for blk in p["model"]["layers"].values():
        for ln in ("input_layernorm", "post_attention_layernorm"):
            blk[ln]["scale"] = _outliers(r, 64, 1.0)
    adapter = decoder_adapter(model)
    calib, held_out = [_llama_inputs(5, 16), _llama_inputs(6, 12)], [_llama_inputs(7, 12)]
    awq = calibrate(adapter, p, calib, _awq_config(batch_size=8))
    rtn = calibrate(adapter, p, calib, _rtn_config()).params
    e_awq, e_rtn = _block_mse(adapter, p, awq.params, held_out), _block_mse(adapter, p, rtn, held_out)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    ratios = {s["path"].split("/")[-2]: s["awq_ratio"] for s in awq.stats}
    assert ratios["o_proj"] is None and ratios["down_proj"] is not None   # GQA: o_proj unscaled


# ----------------------------------------------------------------------------- errors


def test_adapter_without_awq_groups_is_refused():
    model, p = _vit(1)
    plain = NnxAdapter.from_model(model, "encoder/layers", VIT_GROUPS)
    with pytest.raises(ValueError, match="no AWQ groups"):
        calibrate(plain, p, _pixels(0, (4,)), _awq_config())
    with pytest.raises(ValueError, match="objective kind 'gptq'"):
        CalibConfig(objective=Objective(kind="epmq"), rounding="awq")
    x = jnp.ones((8, 32))
    with pytest.raises(ValueError, match="whole blocks"):
        solve_layer(Objective(kind="gptq"), moments(x), jnp.ones((32, 16)), SPEC, rounding="awq")

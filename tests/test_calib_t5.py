"""The T5 calibration adapter against transformers' PyTorch T5 (block composition, captured inputs)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from epmq_jax.calib.adapters_t5 import t5_adapter
from epmq_jax.models import t5

VOCAB = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, our model, inputs dict) for a tiny random gated-GELU T5 with an untied head."""
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
        dropout_rate=0.0)
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(cfg)
    ref.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    ref.eval()
    path = tmp_path_factory.mktemp("t5")
    ref.save_pretrained(path)
    ours = t5.from_hf(json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors"))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, VOCAB, (3, 14))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    dec = rng.integers(2, VOCAB, (3, 5))
    dec[:, 0] = 0
    dec_mask = np.ones_like(dec)
    dec_mask[2, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
              "decoder_attention_mask": dec_mask}
    return ref, ours, inputs


def _key(torch_name):
    """``encoder.block.1.layer.0.SelfAttention.q`` -> ``encoder.1/layer/0/SelfAttention/q/kernel``."""
    stack, _, index, rest = torch_name.split(".", 3)
    return f"{stack}.{index}/{rest.replace('.', '/')}/kernel"


def _run_all(adapter, params, inputs):
    carry = adapter.embed(params, jax.tree.map(jnp.asarray, inputs))
    captures = {}
    for i, path in enumerate(adapter.block_paths(params)):
        block = params
        for k in path:
            block = block[k]
        carry, caps = adapter.run_block(adapter.block_kind(i), block, carry)
        captures.update({f"{path[0]}.{path[2]}/{p}": v for p, v in caps.items()})
    return carry, captures


def test_blocks_compose_to_torch_logits_and_capture_torch_linear_inputs(tiny):
    ref, ours, inputs = tiny
    adapter = t5_adapter(ours)
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    carry, captures = _run_all(adapter, params, inputs)

    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, _n=name: seen.__setitem__(_n, a[0].numpy()))
             for name, m in ref.named_modules()
             if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    with torch.no_grad():
        logits = ref(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    for h in hooks:
        h.remove()

    np.testing.assert_allclose(np.asarray(adapter.logits(params, carry)), logits, atol=1e-4, rtol=0)
    # every torch Linear but the head is a calibrated kernel, and it saw the same input
    assert set(captures) == {_key(name) for name in seen}
    for name, x in seen.items():
        got, weight = captures[_key(name)]
        np.testing.assert_allclose(np.asarray(got), x, atol=1e-5, rtol=0, err_msg=name)
        on_encoder = name.startswith("encoder") or "EncDecAttention.k" in name or "EncDecAttention.v" in name
        np.testing.assert_array_equal(
            np.asarray(weight), inputs["attention_mask" if on_encoder else "decoder_attention_mask"])


def test_groups_and_kinds_follow_the_model(tiny):
    _, ours, _ = tiny
    adapter = t5_adapter(ours)
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    paths = adapter.block_paths(params)
    assert paths == [("encoder", "block", 0), ("encoder", "block", 1), ("decoder", "block", 0),
                     ("decoder", "block", 1), ("decoder", "block", 2)]
    assert [adapter.block_kind(i) for i in range(5)] == [
        ("encoder", True), ("encoder", False), ("decoder", True), ("decoder", False), ("decoder", False)]
    groups = adapter.linear_groups(("decoder", False))
    assert groups[0] == tuple(f"layer/0/SelfAttention/{p}/kernel" for p in "qkv")
    assert groups[3] == ("layer/1/EncDecAttention/k/kernel", "layer/1/EncDecAttention/v/kernel")
    assert groups[-1] == ("layer/2/DenseReluDense/wo/kernel",)
    assert hash(adapter) == hash(t5_adapter(ours))  # static jit argument: equal adapters
    with pytest.raises(ValueError, match="expects 3"):
        adapter.block_paths({**params, "decoder": {**params["decoder"], "block": {0: None}}})


# --- the sequential driver on a tiny T5 ----------------------------------------------------------


def _tiny_model(seed):
    cfg = t5.T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return t5.T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(seed))


def _task_inputs(seed, n=32):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 48, (n, 12))
    mask = (np.arange(12)[None] < rng.integers(6, 13, (n, 1))).astype(np.int32)
    dec = np.concatenate([np.zeros((n, 1), int), rng.integers(2, 48, (n, 4))], 1)
    return {"input_ids": ids * mask, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": np.ones_like(dec)}


def _logits(graphdef, params, inputs):
    from epmq_jax.quant import QuantizedWeight

    floats = jax.tree.map(lambda x: x.dequantize() if isinstance(x, QuantizedWeight) else x,
                          params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    model = nnx.merge(graphdef, floats)
    return np.asarray(model(jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]),
                            decoder_input_ids=jnp.asarray(inputs["decoder_input_ids"])))


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _calibrate(model, params, tasks, objective, rounding, bits=8, experts=None):
    from epmq_jax.calib.driver import CalibConfig, calibrate
    from epmq_jax.quant import QuantSpec

    cfg = CalibConfig(objective=objective, rounding=rounding, batch_size=32,
                      spec=QuantSpec(bits=bits, group_size=-1))
    return calibrate(t5_adapter(model), params, tasks, cfg, experts=experts)


def test_driver_gptq_on_t5_stays_close_to_float_and_beats_rtn():
    from epmq_jax.calib import Objective
    from epmq_jax.quant import QuantizedWeight

    model = _tiny_model(0)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tasks = [_task_inputs(1), _task_inputs(2)]
    ref = [_logits(graphdef, params, x) for x in tasks]

    gptq = _calibrate(model, params, tasks, Objective(kind="gptq"), "gptq")
    assert len(gptq.stats) == 7 + 11  # encoder block: q k v o wi_0 wi_1 wo; decoder: + cross q k v o
    quantized = [leaf for leaf in jax.tree_util.tree_leaves(
        gptq.params, is_leaf=lambda x: isinstance(x, QuantizedWeight)) if isinstance(leaf, QuantizedWeight)]
    assert len(quantized) == 18  # lm_head, embedding, norms and position tables stay float
    rtn = _calibrate(model, params, tasks, Objective(kind="gptq"), "rtn")
    for x, r in zip(tasks, ref):
        err_gptq = _rel_err(_logits(graphdef, gptq.params, x), r)
        err_rtn = _rel_err(_logits(graphdef, rtn.params, x), r)
        assert err_gptq < 0.02 and err_gptq < err_rtn


def test_driver_epmq_relaxation_on_t5_moves_outputs_toward_the_experts():
    """E-PMQ's W* (unrounded) with expert paths through both stacks: each task's logits get
    closer to its own expert's than the Task Arithmetic merge's are."""
    from epmq_jax import merge
    from epmq_jax.calib import Objective

    model = _tiny_model(0)
    graphdef, base = nnx.split(model)
    base = nnx.to_pure_dict(base)
    experts = [jax.tree.map(lambda b, e: b + 0.3 * e, base, nnx.to_pure_dict(nnx.split(_tiny_model(s))[1]))
               for s in (5, 6)]
    merged = merge.task_arithmetic(base, experts, scaling=0.5)
    tasks = [_task_inputs(1), _task_inputs(2)]
    res = _calibrate(model, merged, tasks, Objective(kind="epmq", lam=0.1), "none", experts=experts)
    for x, expert in zip(tasks, experts):
        target = _logits(graphdef, expert, x)
        assert _rel_err(_logits(graphdef, res.params, x), target) < 0.85 * _rel_err(
            _logits(graphdef, merged, x), target)

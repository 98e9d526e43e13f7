"""Llama-family decoders in Flax against transformers' PyTorch models (tiny random configs).

Every case is a random transformers model saved with ``save_pretrained`` (safetensors) and read
back with ``epmq_jax.models.from_pretrained``; the references are the PyTorch model's logits and
its ``generate(do_sample=False)``.
"""

import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from epmq_jax.models import CheckpointMismatchError, LlamaForCausalLM, from_pretrained, hf, llama

VOCAB = 96
_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}
# (family, config overrides): every switch of the module at least once.
CASES = {
    "llama": ("llama", {}),
    "llama3-tied-biases": ("llama", {"rope_scaling": _LLAMA3, "tie_word_embeddings": True,
                                     "attention_bias": True, "mlp_bias": True}),
    "llama-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                               "rope_theta": 500.0}),
    "llama-dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                "max_position_embeddings": 8}),
    "mistral-window": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 3,
                               "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 16}),   # explicit head_dim != hidden / heads
}


def torch_model(directory, family, seed=0, **overrides):
    """A tiny random transformers model (hidden 32, 4 query / 2 kv heads, 2 layers), saved."""
    config_cls, model_cls = _CLASSES[family]
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = config_cls(**{**kw, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():   # norms and biases away from their 1 / 0 init, so loading is tested
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def padded_batch(seed=1, batch=3, seq=10):
    """Token ids and a left-padding mask: full, 3 and 6 padding tokens."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


def torch_logits(model, ids, mask=None):
    """transformers' logits with the positions its generate uses (cumsum of the mask - 1)."""
    kw = {}
    if mask is not None:
        kw = {"attention_mask": torch.tensor(mask),
              "position_ids": torch.tensor(np.where(mask == 0, 0, mask.cumsum(-1) - 1))}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), **kw).logits.float().numpy()


def torch_generate(model, ids, mask, n, **kw):
    with torch.no_grad():
        return model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                              max_new_tokens=n, do_sample=False, **kw).numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_torch(tmp_path, case):
    family, overrides = CASES[case]
    ref_model = torch_model(tmp_path, family, **overrides)
    model = from_pretrained(tmp_path)
    assert isinstance(model, LlamaForCausalLM) and model.config.model_type == family
    assert hasattr(model, "lm_head") == (not overrides.get("tie_word_embeddings", False))
    ids, mask = padded_batch()

    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == (3, 10, VOCAB) and out.dtype == np.float32
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], torch_logits(ref_model, ids, mask)[real], atol=1e-4, rtol=0)
    if case != "llama-dynamic":   # dynamic NTK scales by the batch's longest position
        # a left-padded row is the unpadded sequence
        np.testing.assert_allclose(out[2, 6:], torch_logits(ref_model, ids[2:, 6:])[0], atol=1e-4,
                                   rtol=0)
    # no mask: positions 0..S-1, as transformers' forward without position_ids
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), torch_logits(ref_model, ids),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_torch(tmp_path, case):
    family, overrides = CASES[case]
    ref_model = torch_model(tmp_path, family, **overrides)
    model = from_pretrained(tmp_path)
    ids, mask = padded_batch()
    ref = torch_generate(ref_model, ids, mask, 8)   # no eos: all 8 tokens
    out = np.asarray(model.generate(ids, mask, max_new_tokens=8))
    assert out.shape == (3, 18) and out.dtype == np.int32
    np.testing.assert_array_equal(out, ref)

    compiles = []   # same shapes, other prompt and padding: no new compilation
    listener = lambda event, secs, **kw: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = np.asarray(model.generate(ids[[2, 0, 1]], mask[[2, 0, 1]], max_new_tokens=8))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    # a fresh reference: transformers' dynamic rope keeps the longest length seen across calls
    fresh = torch_model(tmp_path, family, **overrides)
    np.testing.assert_array_equal(again, torch_generate(fresh, ids[[2, 0, 1]], mask[[2, 0, 1]], 8))


@pytest.mark.parametrize("pad", [5, None])
def test_generate_stops_at_any_eos_and_pads(tmp_path, pad):
    ref_model = torch_model(tmp_path, "qwen3", head_dim=16)
    ids, mask = padded_batch()
    free = torch_generate(ref_model, ids, mask, 10)
    eos = [int(free[0, 10 + 2]), VOCAB - 1]    # row 0 ends by its third new token
    ref_model.config.eos_token_id, ref_model.config.pad_token_id = eos, pad
    ref_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == eos
    model = from_pretrained(tmp_path)
    assert model.config.eos_ids == tuple(eos)
    fill = eos[0] if pad is None else pad     # transformers' fallback: the first eos
    ref = torch_generate(ref_model, ids, mask, 10, eos_token_id=eos, pad_token_id=fill)
    out = np.asarray(model.generate(ids, mask, max_new_tokens=10))
    assert out.shape == (3, 20)
    length = ref.shape[1]                       # transformers stops when every row has ended
    np.testing.assert_array_equal(out[:, :length], ref)
    assert (out[:, length:] == fill).all()
    row0 = out[0, 10:]
    end = int(np.flatnonzero(np.isin(row0, eos))[0])
    assert end <= 2 and (row0[end + 1:] == fill).all()


def test_bfloat16_load_stays_close(tmp_path):
    ref_model = torch_model(tmp_path, "llama", rope_scaling=_LLAMA3)
    ids, mask = padded_batch()
    real = mask.astype(bool)
    ref32 = torch_logits(ref_model, ids, mask)[real]
    ref16 = torch_logits(ref_model.to(torch.bfloat16), ids, mask)[real]
    model = from_pretrained(tmp_path, dtype="bfloat16")
    kernel = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[real]
    assert out.dtype == np.float32
    scale = np.abs(ref32).max()
    assert np.abs(ref16 - ref32).max() < 0.05 * scale            # bf16 itself is this far off
    assert np.abs(out - ref16).max() < 0.05 * scale
    assert np.abs(out - ref32).max() < 0.05 * scale
    gen = np.asarray(model.generate(ids, mask, max_new_tokens=4))
    assert gen.shape == (3, 14) and (gen[:, :10] == ids).all()
    assert ((gen >= 0) & (gen < VOCAB)).all()


def test_tied_checkpoint_drops_a_stored_lm_head(tmp_path):
    ref_model = torch_model(tmp_path, "llama", tie_word_embeddings=True)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = np.ascontiguousarray(tensors["model.embed_tokens.weight"])
    save_file(tensors, tmp_path / "model.safetensors")
    model = from_pretrained(tmp_path)
    assert not hasattr(model, "lm_head")
    ids, mask = padded_batch()
    real = mask.astype(bool)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out[real], torch_logits(ref_model, ids, mask)[real], atol=1e-4, rtol=0)


class CountingMapping(Mapping):
    """A read-on-access tensor mapping that counts the reads of each name."""

    def __init__(self, tensors):
        self.tensors, self.reads = tensors, {}

    def __getitem__(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def test_lazy_tensor_mapping_is_read_once_per_tensor(tmp_path):
    ref_model = torch_model(tmp_path, "qwen2")
    lazy = CountingMapping(load_file(tmp_path / "model.safetensors"))
    model = llama.from_hf(hf.load_config(tmp_path), lazy)
    assert lazy.reads == dict.fromkeys(lazy.tensors, 1)
    ids, mask = padded_batch()
    real = mask.astype(bool)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out[real], torch_logits(ref_model, ids, mask)[real], atol=1e-4, rtol=0)


def test_untied_config_without_lm_head_is_refused(tmp_path):
    torch_model(tmp_path, "mistral")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    with pytest.raises(CheckpointMismatchError, match="lm_head/kernel"):
        llama.from_hf(hf.load_config(tmp_path), tensors)


def test_llama31_rope_frequencies_match_transformers():
    """Llama-3.1-8B's config.json (legacy rope_scaling + rope_theta) -> transformers' inv_freq."""
    legacy = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
              "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "eos_token_id": [128001, 128008, 128009], "num_hidden_layers": 1}
    cfg = llama.LlamaConfig.from_dict(legacy)
    assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0 and cfg.head_dim == 128
    assert cfg.eos_ids == (128001, 128008, 128009) and cfg.pad_id == 128001
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, scaling = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**legacy))
    assert scaling == 1.0
    np.testing.assert_allclose(llama._inv_freq(cfg), ref.numpy(), rtol=1e-6)


def test_config_reads_family_rules():
    qwen = {"model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 32,
            "num_attention_heads": 4, "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 8,
            "max_window_layers": 2}
    cfg = llama.LlamaConfig.from_dict(qwen)
    ref = transformers.Qwen2Config(**qwen)
    assert list(cfg.layer_types) == list(ref.layer_types)
    assert [cfg.layer_window(i) for i in range(4)] == [None, None, 8, 8]
    assert cfg.qkv_bias and not cfg.attention_bias
    off = llama.LlamaConfig.from_dict({**qwen, "use_sliding_window": False})
    assert off.sliding_window is None and set(off.layer_types) == {"full_attention"}
    assert llama.LlamaConfig.from_dict({"model_type": "qwen3", "hidden_size": 64}).head_dim == 128
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        llama.LlamaConfig.from_dict({"model_type": "llama", "rope_scaling": {
            "rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="model_type='gemma'"):
        llama.LlamaConfig.from_dict({"model_type": "gemma"})


def test_bad_inputs_are_refused():
    model = hf.abstract(lambda: LlamaForCausalLM(llama.LlamaConfig.tiny(), rngs=hf.ABSTRACT_RNGS))
    with pytest.raises(ValueError, match=r"input_ids has shape \(5,\)"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected \(2, 5\)"):
        model.generate(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4)), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        model.generate(jnp.zeros((2, 5), jnp.int32), max_new_tokens=0)

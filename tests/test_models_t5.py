"""T5 / FLAN-T5 in Flax against transformers' PyTorch T5ForConditionalGeneration (float32)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from epmq_jax.models import CheckpointMismatchError, from_pretrained, t5

VOCAB = 48


def _torch_t5(tmp_path, *, feed_forward_proj="gated-gelu", untied=True, seed=0):
    """A tiny random T5 saved with save_pretrained; returns (torch model, config dict, tensors)."""
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=not untied,
        decoder_start_token_id=0, dropout_rate=0.0)
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(cfg)
    if untied:  # transformers 5 ties the head at init; give it its own weights, as v1.1 has
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    model.eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    return model, config, load_file(tmp_path / "model.safetensors")


def _inputs(seed=1, batch=3, src=20, tgt=17):
    """Token ids (batch, src), a padding mask with right and left padding, decoder ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, (batch, src))
    mask = np.ones((batch, src), np.int64)
    mask[1, 13:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    dec = rng.integers(2, VOCAB, (batch, tgt))
    dec[:, 0] = 0
    return ids, mask, dec


@pytest.mark.parametrize("ff,untied", [("gated-gelu", True), ("gated-gelu", False), ("relu", False)])
def test_teacher_forced_logits_match_torch(tmp_path, ff, untied):
    model, config, tensors = _torch_t5(tmp_path, feed_forward_proj=ff, untied=untied)
    assert ("lm_head.weight" in tensors) == untied
    ids, mask, dec = _inputs()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = t5.from_hf(config, tensors)
    assert ours.config.tie_word_embeddings == (not untied)
    out = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), decoder_input_ids=jnp.asarray(dec)))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_flan_style_config_untied_without_scaling(tmp_path):
    """FLAN-T5's config.json says tie_word_embeddings=false and has a separate lm_head."""
    model, config, tensors = _torch_t5(tmp_path, untied=True)
    config.pop("scale_decoder_outputs")
    config["tie_word_embeddings"] = False
    ours = t5.from_hf(config, tensors)
    assert not ours.config.scale_decoder_outputs and not ours.config.tie_word_embeddings
    ids, _, dec = _inputs()
    ids, dec = ids[:1], dec[:1]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), decoder_input_ids=jnp.asarray(dec))),
                               ref, atol=1e-4, rtol=0)


def test_greedy_generation_matches_torch_with_early_eos(tmp_path):
    model, config, tensors = _torch_t5(tmp_path, untied=True, seed=3)
    ids, mask, _ = _inputs(seed=4)
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
              do_sample=False, num_beams=1, use_cache=False)
    with torch.no_grad():
        free = model.generate(**kw, eos_token_id=VOCAB + 1).numpy()  # an id it never emits
    # Make one row stop early: declare its second generated token the end of sequence.
    eos = int(free[1, 2])
    assert eos not in free[1, :2] and eos != 0
    with torch.no_grad():
        ref = model.generate(**kw, eos_token_id=eos, pad_token_id=0).numpy()
    ours = t5.from_hf(dict(config, eos_token_id=eos), tensors)
    out = np.asarray(ours.generate(jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=8))
    assert out.shape == (3, 9)
    np.testing.assert_array_equal(out[:, : ref.shape[1]], ref)
    assert (out[:, ref.shape[1]:] == 0).all()
    np.testing.assert_array_equal(out[1, 3:], 0)  # padded after its eos


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_torch(bidirectional):
    rel = np.arange(-300, 301)
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=bidirectional, num_buckets=32, max_distance=128).numpy()
    out = t5.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                      num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_module_paths_follow_transformers(tmp_path):
    _, config, tensors = _torch_t5(tmp_path)
    ours = t5.from_hf(config, tensors)
    kernel = ours.decoder.block[1].layer[2].DenseReluDense.wi_0.kernel[...]
    np.testing.assert_array_equal(
        np.asarray(kernel), tensors["decoder.block.1.layer.2.DenseReluDense.wi_0.weight"].T)
    assert not hasattr(ours.encoder.block[1].layer[0].SelfAttention, "relative_attention_bias")


def test_checkpoint_mismatches_are_listed(tmp_path):
    _, config, tensors = _torch_t5(tmp_path)
    bad = dict(tensors)
    del bad["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    bad["encoder.block.9.layer.0.SelfAttention.q.weight"] = np.zeros((16, 16), np.float32)
    bad["decoder.block.0.layer.0.SelfAttention.k.weight"] = np.zeros((8, 16), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        t5.from_hf(config, bad)
    assert err.value.missing == ["encoder/block/1/layer/1/DenseReluDense/wo/kernel"]
    assert err.value.unknown == ["encoder.block.9.layer.0.SelfAttention.q.weight"]
    assert [m[0] for m in err.value.mismatched] == ["decoder.block.0.layer.0.SelfAttention.k.weight"]


def test_stack_embedding_copies_must_equal_shared(tmp_path):
    _, config, tensors = _torch_t5(tmp_path)
    same = dict(tensors, **{"encoder.embed_tokens.weight": tensors["shared.weight"].copy()})
    t5.from_hf(config, same)  # older checkpoints store tied copies: accepted
    other = dict(tensors, **{"decoder.embed_tokens.weight": tensors["shared.weight"] + 1})
    with pytest.raises(ValueError, match="decoder.embed_tokens.weight"):
        t5.from_hf(config, other)


def test_from_pretrained_dispatches_to_t5(tmp_path):
    model, _, _ = _torch_t5(tmp_path)
    ids, mask, dec = _inputs(seed=5)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, t5.T5ForConditionalGeneration)
    out = ours(jnp.asarray(ids), jnp.asarray(mask), decoder_input_ids=jnp.asarray(dec))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_bad_feed_forward_proj_is_rejected():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config(feed_forward_proj="gelu-gated")

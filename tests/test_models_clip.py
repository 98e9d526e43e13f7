"""CLIP in Flax: the block API of the vision tower, parity with transformers' PyTorch CLIP,
and the checkpoint loader (sharded files, half precision, key-mismatch report, offline hub)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epmq_jax.models import CLIPVisionConfig, CLIPVisionModelWithProjection

try:
    import torch
    import transformers
except ImportError:  # the parity tests need the "torch" extra
    torch = transformers = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and transformers")

VISION_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=16, patch_size=8, projection_dim=8)
TINY_VISION = CLIPVisionConfig(**VISION_KW)


def test_vision_blocks_compose_to_image_features():
    model = CLIPVisionModelWithProjection(TINY_VISION, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    hidden = model.embed(x)
    assert hidden.shape == (3, 1 + 4, 32)
    for layer in model.encoder.layers:
        hidden = layer(hidden)
    out = model.head(hidden)
    assert out.shape == (3, 8)
    np.testing.assert_array_equal(out, model.get_image_features(x))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), out, rtol=1e-5, atol=1e-5)
    assert model.encoder.layers[0].self_attn.q_proj.kernel.shape == (32, 32)
    assert model.embeddings.patch_embedding.kernel.shape == (8, 8, 3, 32)
    assert model.visual_projection.kernel.shape == (32, 8)


def test_vision_rejects_nchw():
    model = CLIPVisionModelWithProjection(TINY_VISION, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 16, 16)))


def test_presets():
    assert CLIPVisionConfig.vit_b32().num_patches == 49
    assert CLIPVisionConfig.vit_b16().num_patches == 196
    l14 = CLIPVisionConfig.vit_l14()
    assert (l14.num_patches, l14.hidden_size, l14.projection_dim) == (256, 1024, 768)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="swish2")


# --- parity with transformers' PyTorch CLIP (tiny random configs, float32) ---------------------

TEXT_KW = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=12, pad_token_id=1,
               bos_token_id=0)


def _torch_clip(eos_token_id, hidden_act="quick_gelu"):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(TEXT_KW, eos_token_id=eos_token_id, hidden_act=hidden_act),
        vision_config=dict(VISION_KW, hidden_act=hidden_act), projection_dim=8)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm affine params too, so a swapped scale/bias shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model


def _pixels(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype(np.float32)


def _text_batch(eos_token_id):
    """Ids with an EOS per row and padding after it; ids elsewhere avoid the EOS id."""
    rng = np.random.default_rng(1)
    lengths = [12, 5, 8]
    ids = np.full((3, 12), 1, np.int64)
    mask = np.zeros((3, 12), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(4, 98, size=n)
        ids[i, 0] = 0
        ids[i, n - 1] = eos_token_id if eos_token_id != 2 else 99  # legacy: EOS = largest id
        mask[i, :n] = 1
    return ids, mask


@needs_torch
@pytest.mark.parametrize("eos_token_id,hidden_act", [(2, "quick_gelu"), (3, "gelu")])
def test_clip_matches_torch(tmp_path, eos_token_id, hidden_act):
    from epmq_jax.models import CLIPModel, from_pretrained

    ref = _torch_clip(eos_token_id, hidden_act)
    ref.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert isinstance(model, CLIPModel)

    x = _pixels()
    with torch.no_grad():
        want_img = ref.get_image_features(
            pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output.numpy()
    got_img = np.asarray(model.get_image_features(jnp.asarray(x)))
    np.testing.assert_allclose(got_img, want_img, atol=1e-4, rtol=0)

    ids, mask = _text_batch(eos_token_id)
    with torch.no_grad():
        want_txt = ref.get_text_features(input_ids=torch.from_numpy(ids),
                                         attention_mask=torch.from_numpy(mask)).pooler_output
    got_txt = np.asarray(model.get_text_features(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got_txt, want_txt.numpy(), atol=1e-4, rtol=0)
    with torch.no_grad():
        want_logits = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    got_logits = model(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(got_logits, want_logits.logits_per_image.numpy(), atol=1e-4, rtol=0)


@needs_torch
@pytest.mark.parametrize("cls", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_clip_vision_checkpoints(tmp_path, cls):
    """Vision-only checkpoints (FusionBench experts are CLIPVisionModel), sharded on disk."""
    from epmq_jax.models import CLIPVisionModelWithProjection, from_pretrained

    torch.manual_seed(0)
    ref = getattr(transformers, cls)(transformers.CLIPVisionConfig(**VISION_KW)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = from_pretrained(tmp_path)
    assert isinstance(model, CLIPVisionModelWithProjection)
    x = _pixels(2, seed=3)
    with torch.no_grad():
        out = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    if cls == "CLIPVisionModel":
        assert model.visual_projection is None
        got = model.pool(model.encoder(model.embed(jnp.asarray(x))))
        np.testing.assert_allclose(got, out.pooler_output.numpy(), atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="visual_projection"):
            model.get_image_features(jnp.asarray(x))
    else:
        np.testing.assert_allclose(model(jnp.asarray(x)), out.image_embeds.numpy(),
                                   atol=1e-4, rtol=0)


@needs_torch
def test_key_mismatch_lists_unknown_missing_and_mismatched(tmp_path):
    from safetensors.numpy import load_file, save_file

    from epmq_jax.models import CheckpointMismatchError, from_pretrained

    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**VISION_KW)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["vision_model.post_layernorm.bias"]
    tensors["vision_model.encoder.layers.0.mlp.fc3.weight"] = np.zeros((2, 2), np.float32)
    tensors["vision_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((64, 31), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        from_pretrained(tmp_path)
    e = err.value
    assert e.unknown == ["vision_model.encoder.layers.0.mlp.fc3.weight"]
    assert e.missing == ["post_layernorm/bias"]
    assert e.mismatched == [("vision_model.encoder.layers.1.mlp.fc1.weight",
                             "encoder/layers/1/mlp/fc1/kernel", (31, 64), (32, 64))]
    for text in ("fc3", "post_layernorm/bias", "(31, 64)"):
        assert text in str(e)


def test_missing_repo_fails_fast_offline(monkeypatch):
    from epmq_jax.models import from_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        from_pretrained("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        from_pretrained("./no/such/dir")


@needs_torch
def test_open_tensors_half_precision(tmp_path):
    """bfloat16/float16 tensors (numpy has no bfloat16 of its own) are read in their own dtype."""
    import ml_dtypes
    from safetensors.torch import save_file

    from epmq_jax.models.hf import open_tensors

    t = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(4).to(torch.float16),
         "ids": torch.arange(6).reshape(2, 3)}
    save_file(t, tmp_path / "model.safetensors")
    got = open_tensors(tmp_path)
    assert (got["a"].dtype, got["b"].dtype, got["ids"].dtype) == (
        ml_dtypes.bfloat16, np.float16, np.int64)
    for k in t:
        np.testing.assert_array_equal(got[k].astype(np.float32), t[k].float().numpy())


def test_load_into_layouts_dtype_and_duplicates():
    """Torch layouts -> Flax ones on a bare module; the param's dtype is kept; a second name for
    a filled param is reported."""
    from epmq_jax.models.hf import CheckpointMismatchError, load_into

    class Net(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            self.conv = nnx.Conv(3, 4, (2, 2), use_bias=False, rngs=nnx.Rngs(0))

    w = np.arange(6, dtype=np.float32).reshape(2, 3)  # torch (out, in)
    c = np.arange(48, dtype=np.float32).reshape(4, 3, 2, 2)  # torch OIHW
    tensors = {"fc.weight": w, "fc.bias": np.ones(2, np.float32), "conv.weight": c}
    net = load_into(Net(), tensors)
    assert net.fc.kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(net.fc.kernel[...], np.float32), w.T)
    np.testing.assert_array_equal(net.conv.kernel[...][1, 0, 2, 3], c[3, 2, 1, 0])  # [h,w,i,o]
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(Net(), {**tensors, "tied.weight": w}, rename=lambda n: n.replace("tied", "fc"))
    assert err.value.unknown == ["tied.weight"] and not err.value.missing

"""CLIP in Flax: structure and the block-by-block API of the vision tower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epmq_jax.models import CLIPVisionConfig, CLIPVisionModelWithProjection

TINY_VISION = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=16, patch_size=8,
                               projection_dim=8)


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

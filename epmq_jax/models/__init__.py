"""Flax nnx model definitions (CLIP, BERT, T5) and loading of Hugging Face checkpoints."""

from epmq_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

__all__ = [
    "CLIPConfig",
    "CLIPModel",
    "CLIPTextConfig",
    "CLIPTextModelWithProjection",
    "CLIPVisionConfig",
    "CLIPVisionModelWithProjection",
]

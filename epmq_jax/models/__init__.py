"""Flax nnx model definitions (CLIP, BERT, T5, Llama-family decoders) and loading of Hugging Face checkpoints."""

from epmq_jax.models.bert import BertConfig, BertModel, mean_pool
from epmq_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from epmq_jax.models.hf import CheckpointMismatchError, from_pretrained
from epmq_jax.models.llama import LlamaConfig, LlamaForCausalLM
from epmq_jax.models.t5 import T5Config, T5ForConditionalGeneration

__all__ = [
    "BertConfig",
    "BertModel",
    "CheckpointMismatchError",
    "CLIPConfig",
    "CLIPModel",
    "CLIPTextConfig",
    "CLIPTextModelWithProjection",
    "CLIPVisionConfig",
    "CLIPVisionModelWithProjection",
    "from_pretrained",
    "LlamaConfig",
    "LlamaForCausalLM",
    "mean_pool",
    "T5Config",
    "T5ForConditionalGeneration",
]

"""CLIP in Flax nnx: the vision transformer, the text transformer and the two-tower model.

The module trees mirror Hugging Face's ``transformers`` CLIP so that checkpoint tensors map by
name (see :mod:`epmq_jax.models.hf`): ``q_proj`` here is ``q_proj`` there, with the Flax kernel
layout ``(d_in, d_out)`` (the transpose of torch's ``weight``).

:class:`CLIPVisionModelWithProjection` is also the ViT of the offline benchmark (with
:meth:`CLIPVisionConfig.small`). It exposes the pieces a block-by-block calibration driver needs:
``embed(pixels) -> hidden``, the blocks ``encoder.layers[i](hidden) -> hidden`` and
``head(hidden) -> embeddings``, so that ``head(layers[-1](...layers[0](embed(x))))`` is exactly
``get_image_features(x)``.

Images are NHWC float32 (already resized and normalised, see :mod:`epmq_jax.models.preprocess`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epmq_jax.models import hf
from epmq_jax.models._layers import (
    activation,
    config_from_dict,
    layer_norm,
    multi_head_attention,
    padding_mask,
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The CLIP vision tower's hyper-parameters, with Hugging Face's field names and defaults.

    The defaults are ViT-B/32 (``openai/clip-vit-base-patch32``).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        activation(self.hidden_act)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> CLIPVisionConfig:
        """From a ``config.json`` dict (``clip_vision_model``) or CLIP's ``vision_config``."""
        return config_from_dict(cls, d)

    @classmethod
    def vit_b32(cls) -> CLIPVisionConfig:
        """ViT-B/32, as ``openai/clip-vit-base-patch32``."""
        return cls()

    @classmethod
    def vit_b16(cls) -> CLIPVisionConfig:
        """ViT-B/16, as ``openai/clip-vit-base-patch16``."""
        return cls(patch_size=16)

    @classmethod
    def vit_l14(cls) -> CLIPVisionConfig:
        """ViT-L/14, as ``openai/clip-vit-large-patch14``."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, patch_size=14, projection_dim=768)

    @classmethod
    def small(cls) -> CLIPVisionConfig:
        """The offline benchmark's small ViT: 32x32 images, 8x8 patches (16 + 1 tokens),
        width 128, 4 blocks of 4 heads, 64-d embeddings. Fast on a CPU."""
        return cls(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, image_size=32, patch_size=8, projection_dim=64)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The CLIP text tower's hyper-parameters, with Hugging Face's field names and defaults.

    ``eos_token_id == 2`` marks legacy configs (e.g. ``openai/clip-vit-base-patch32``), whose
    sentences are pooled at the largest token id instead of at the first EOS token.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        activation(self.hidden_act)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        """From a ``config.json`` dict (``clip_text_model``) or CLIP's ``text_config``."""
        return config_from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """The two-tower CLIP model: both towers' configs, the shared projection width and the
    initial logit scale (log of 1/temperature)."""

    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        """From a ``config.json`` dict with ``model_type == "clip"``.

        The top-level ``projection_dim`` overrides the towers' own (as in transformers).
        """
        proj = d.get("projection_dim", 512)
        # old configs may carry the towers as *_config_dict instead
        vision = d.get("vision_config") or d.get("vision_config_dict") or {}
        text = d.get("text_config") or d.get("text_config_dict") or {}
        vision = CLIPVisionConfig.from_dict({**vision, "projection_dim": proj})
        text = CLIPTextConfig.from_dict({**text, "projection_dim": proj})
        return cls(vision_config=vision, text_config=text, projection_dim=proj,
                   logit_scale_init_value=d.get("logit_scale_init_value", 2.6592))


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (all
    ``(width, width)`` kernels with bias)."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.q_proj = nnx.Linear(width, width, rngs=rngs)
        self.k_proj = nnx.Linear(width, width, rngs=rngs)
        self.v_proj = nnx.Linear(width, width, rngs=rngs)
        self.out_proj = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``(batch, tokens, width) -> (batch, tokens, width)``; ``mask`` as in
        :func:`epmq_jax.models._layers.multi_head_attention`."""
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                   self.num_heads, mask)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))`` with kernels ``fc1: (width, intermediate)``, ``fc2: (intermediate, width)``."""

    def __init__(self, width: int, intermediate: int, hidden_act: str, *, rngs: nnx.Rngs):
        self.hidden_act = hidden_act
        self.fc1 = nnx.Linear(width, intermediate, rngs=rngs)
        self.fc2 = nnx.Linear(intermediate, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPVisionConfig | CLIPTextConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.layer_norm1 = layer_norm(d, config.layer_norm_eps, rngs)
        self.self_attn = CLIPAttention(d, config.num_attention_heads, rngs=rngs)
        self.layer_norm2 = layer_norm(d, config.layer_norm_eps, rngs)
        self.mlp = CLIPMLP(d, config.intermediate_size, config.hidden_act, rngs=rngs)

    def __call__(self, hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``(batch, tokens, width) -> (batch, tokens, width)``."""
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), mask)
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPEncoder(nnx.Module):
    """The stack of blocks, ``layers`` (an ``nnx.List`` of :class:`CLIPEncoderLayer`)."""

    def __init__(self, config: CLIPVisionConfig | CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden


class CLIPVisionEmbeddings(nnx.Module):
    """Patchify + class token + learned positions.

    ``patch_embedding``: an ``nnx.Conv`` without bias, kernel ``(patch, patch, channels, width)``
    (HWIO; torch's is OIHW), stride ``patch``. ``class_embedding``: ``(width,)``.
    ``position_embedding``: an ``nnx.Embed`` with table ``(num_patches + 1, width)``.
    """

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)) * d ** -0.5)
        self.patch_embedding = nnx.Conv(config.num_channels, d, (p, p), strides=(p, p),
                                        padding="VALID", use_bias=False, rngs=rngs)
        self.position_embedding = nnx.Embed(config.num_patches + 1, d, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """``(batch, H, W, C)`` -> ``(batch, 1 + num_patches, width)``."""
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected NHWC "
                             f"(batch, {c.image_size}, {c.image_size}, {c.num_channels})")
        patches = self.patch_embedding(pixel_values.astype(jnp.float32))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, c.hidden_size))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...]


class CLIPVisionModelWithProjection(nnx.Module):
    """The CLIP image tower: ViT + CLS pooling + linear projection into the joint space.

    Sub-modules (Hugging Face names, without HF's ``vision_model.`` prefix): ``embeddings``,
    ``pre_layrnorm``, ``encoder.layers[i]``, ``post_layernorm``, ``visual_projection``
    (kernel ``(hidden_size, projection_dim)``, no bias). ``visual_projection`` is None for
    checkpoints that have none (``CLIPVisionModel``, e.g. FusionBench's experts); give such a
    model the base CLIP's with ``model.visual_projection = nnx.data(nnx.clone(base.vision_model.visual_projection))``.
    """

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, with_projection: bool = True):
        self.config = config
        d = config.hidden_size
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs)
        self.pre_layrnorm = layer_norm(d, config.layer_norm_eps, rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs)
        self.post_layernorm = layer_norm(d, config.layer_norm_eps, rngs)
        self.visual_projection = (nnx.Linear(d, config.projection_dim, use_bias=False, rngs=rngs)
                                  if with_projection else None)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """NHWC ``(batch, H, W, C)`` -> the first block's input ``(batch, tokens, width)``."""
        return self.pre_layrnorm(self.embeddings(pixel_values))

    def pool(self, hidden: jax.Array) -> jax.Array:
        """Last block's output ``(batch, tokens, width)`` -> ``post_layernorm`` of the CLS
        token ``(batch, width)`` (transformers' ``pooler_output``)."""
        return self.post_layernorm(hidden[:, 0])

    def head(self, hidden: jax.Array) -> jax.Array:
        """Last block's output ``(batch, tokens, width)`` -> image embeddings
        ``(batch, projection_dim)`` (not normalised)."""
        if self.visual_projection is None:
            raise ValueError("this CLIP vision model has no visual_projection (it was loaded from "
                             "a CLIPVisionModel checkpoint); set model.visual_projection from the "
                             "base CLIP model before asking for image features")
        return self.visual_projection(self.pool(hidden))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """NHWC float32 pixels ``(batch, H, W, C)`` -> image embeddings ``(batch, projection_dim)``,
        as transformers' ``get_image_features``."""
        return self.head(self.encoder(self.embed(pixel_values)))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Same as :meth:`get_image_features`."""
        return self.get_image_features(pixel_values)


class CLIPTextEmbeddings(nnx.Module):
    """``token_embedding`` ``(vocab, width)`` + ``position_embedding`` ``(max_positions, width)``."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                            rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """``(batch, seq)`` int -> ``(batch, seq, width)``."""
        seq = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.embedding[:seq]


class CLIPTextModelWithProjection(nnx.Module):
    """The CLIP text tower: causal transformer, EOS pooling, linear projection.

    Sub-modules (Hugging Face names without the ``text_model.`` prefix): ``embeddings``,
    ``encoder.layers[i]``, ``final_layer_norm``, ``text_projection`` (kernel
    ``(hidden_size, projection_dim)``, no bias).
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs)
        self.final_layer_norm = layer_norm(d, config.layer_norm_eps, rngs)
        self.text_projection = nnx.Linear(d, config.projection_dim, use_bias=False, rngs=rngs)

    def get_text_features(self, input_ids: jax.Array,
                          attention_mask: jax.Array | None = None) -> jax.Array:
        """Token ids ``(batch, seq)`` -> text embeddings ``(batch, projection_dim)``.

        As transformers: causal attention (plus the padding ``attention_mask``, ``(batch, seq)``
        of 0/1), final LayerNorm, then the hidden state at the EOS token: the largest id for
        legacy configs (``eos_token_id == 2``), else the first ``eos_token_id``. Each row must
        contain its EOS token.
        """
        input_ids = jnp.asarray(input_ids)
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, seq) "
                             f"with seq <= max_position_embeddings={c.max_position_embeddings}")
        mask = padding_mask(attention_mask, causal=True, length=input_ids.shape[1])
        hidden = self.encoder(self.embeddings(input_ids), mask)
        hidden = self.final_layer_norm(hidden)
        if c.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(hidden, eos[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Same as :meth:`get_text_features`."""
        return self.get_text_features(input_ids, attention_mask)


class CLIPModel(nnx.Module):
    """Two-tower CLIP: ``vision_model`` (:class:`CLIPVisionModelWithProjection`, which owns
    ``visual_projection``), ``text_model`` (:class:`CLIPTextModelWithProjection`, which owns
    ``text_projection``) and the scalar ``logit_scale`` (log of 1/temperature)."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionModelWithProjection(config.vision_config, rngs=rngs)
        self.text_model = CLIPTextModelWithProjection(config.text_config, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """NHWC ``(batch, H, W, C)`` -> ``(batch, projection_dim)``."""
        return self.vision_model.get_image_features(pixel_values)

    def get_text_features(self, input_ids: jax.Array,
                          attention_mask: jax.Array | None = None) -> jax.Array:
        """``(batch, seq)`` ids -> ``(batch, projection_dim)``."""
        return self.text_model.get_text_features(input_ids, attention_mask)

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        """Image-text logits ``(n_images, n_texts)``: scaled cosine similarities."""
        img = self.get_image_features(pixel_values)
        txt = self.get_text_features(input_ids, attention_mask)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return jnp.exp(self.logit_scale[...]) * img @ txt.T


def from_hf(config: dict, tensors: Mapping[str, np.ndarray], *, dtype: Any = None
            ) -> CLIPModel | CLIPVisionModelWithProjection:
    """Builds a CLIP model from a Hugging Face ``config.json`` dict and its tensors.

    ``model_type == "clip"`` gives a :class:`CLIPModel`; ``"clip_vision_model"``
    (``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` checkpoints, names with or
    without the ``vision_model.`` prefix) gives a :class:`CLIPVisionModelWithProjection`, whose
    ``visual_projection`` is None when the checkpoint has none. ``dtype``: storage dtype of the
    params (None: float32).
    """
    ignore = [r"position_ids$"]
    model_type = config.get("model_type")
    if model_type == "clip":
        cfg = CLIPConfig.from_dict(config)
        moved = {"visual_projection.": "vision_model.visual_projection.",
                 "text_projection.": "text_model.text_projection."}

        def rename(name: str) -> str:
            for old, new in moved.items():
                if name.startswith(old):
                    return new + name[len(old):]
            return name

        model = hf.abstract(lambda: CLIPModel(cfg, rngs=hf.ABSTRACT_RNGS))
        return hf.load_into(model, tensors, rename, ignore, dtype=dtype)
    if model_type == "clip_vision_model":
        cfg = CLIPVisionConfig.from_dict(config)
        with_projection = "visual_projection.weight" in tensors
        model = hf.abstract(lambda: CLIPVisionModelWithProjection(
            cfg, rngs=hf.ABSTRACT_RNGS, with_projection=with_projection))
        return hf.load_into(model, tensors, lambda n: n.removeprefix("vision_model."), ignore,
                            dtype=dtype)
    raise ValueError(f"clip.from_hf: model_type={model_type!r}; expected 'clip' or "
                     "'clip_vision_model'")


def hf_config(config: CLIPVisionConfig | CLIPConfig) -> dict:
    """The transformers ``config.json`` dict of a model's config (:func:`from_hf` reads it back).

    A :class:`CLIPVisionConfig` gives a ``clip_vision_model`` config (architecture
    ``CLIPVisionModelWithProjection``), a :class:`CLIPConfig` a two-tower ``clip`` one.
    """
    if isinstance(config, CLIPVisionConfig):
        return {"model_type": "clip_vision_model",
                "architectures": ["CLIPVisionModelWithProjection"], **dataclasses.asdict(config)}
    if isinstance(config, CLIPConfig):
        return {"model_type": "clip", "architectures": ["CLIPModel"],
                "projection_dim": config.projection_dim,
                "logit_scale_init_value": config.logit_scale_init_value,
                "vision_config": dataclasses.asdict(config.vision_config),
                "text_config": dataclasses.asdict(config.text_config)}
    raise ValueError(f"clip.hf_config: expected a CLIPVisionConfig or CLIPConfig, got "
                     f"{type(config).__name__}")


def to_hf(name: str, model_type: str) -> str:
    """The checkpoint name of a model param's dotted name: the inverse of :func:`from_hf`'s renaming.

    ``clip_vision_model`` (``CLIPVisionModelWithProjection``): ``visual_projection.*`` as is,
    everything else under ``vision_model.``; ``clip``: the projections move out of the towers
    (``vision_model.visual_projection.*`` -> ``visual_projection.*``, same for the text side).
    """
    if model_type == "clip_vision_model":
        return name if name.startswith("visual_projection.") else "vision_model." + name
    if model_type == "clip":
        for tower, head in (("vision_model.", "visual_projection."), ("text_model.", "text_projection.")):
            if name.startswith(tower + head):
                return name[len(tower):]
        return name
    raise ValueError(f"clip.to_hf: model_type={model_type!r}; expected 'clip' or 'clip_vision_model'")

"""A BERT encoder in Flax nnx (for MiniLM / sentence-transformers checkpoints).

The module tree mirrors transformers' ``BertModel`` (``embeddings.word_embeddings``,
``encoder.layer[i].attention.self.query``, ``...attention.output.LayerNorm``,
``...intermediate.dense``, ``...output.dense``, ``pooler.dense``) so that checkpoints load by
name through :mod:`epmq_jax.models.hf`. Linear kernels are Flax ``(d_in, d_out)``.
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
class BertConfig:
    """BERT hyper-parameters with Hugging Face's field names and defaults (BERT-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type={self.position_embedding_type!r} is not "
                             "supported; expected 'absolute'")
        activation(self.hidden_act)

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """From a ``config.json`` dict with ``model_type == "bert"``."""
        return config_from_dict(cls, d)


class _Dense(nnx.Module):
    """``dense`` (+ optional post-residual ``LayerNorm``), HF's BertSelfOutput/BertOutput/
    BertIntermediate/BertPooler shape."""

    def __init__(self, d_in: int, d_out: int, eps: float | None, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(d_in, d_out, rngs=rngs)
        self.LayerNorm = layer_norm(d_out, eps, rngs) if eps is not None else None


class BertSelfAttention(nnx.Module):
    """``query``, ``key``, ``value``: ``(width, width)`` kernels with bias."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        return multi_head_attention(self.query(x), self.key(x), self.value(x), self.num_heads,
                                    mask)


class BertAttention(nnx.Module):
    """``self`` (the attention) and ``output`` (``dense`` + residual ``LayerNorm``)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, rngs=rngs)
        self.output = _Dense(config.hidden_size, config.hidden_size, config.layer_norm_eps,
                             rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        return self.output.LayerNorm(self.output.dense(self.self(x, mask)) + x)


class BertLayer(nnx.Module):
    """A post-LayerNorm block: ``h = LN(x + attn(x))``, ``LN(h + W2 act(W1 h))``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.hidden_act = config.hidden_act
        self.attention = BertAttention(config, rngs=rngs)
        self.intermediate = _Dense(d, f, None, rngs=rngs)
        self.output = _Dense(f, d, config.layer_norm_eps, rngs=rngs)

    def __call__(self, hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``(batch, seq, width) -> (batch, seq, width)``; ``mask`` from
        :func:`epmq_jax.models._layers.padding_mask`."""
        h = self.attention(hidden, mask)
        inner = activation(self.hidden_act)(self.intermediate.dense(h))
        return self.output.LayerNorm(self.output.dense(inner) + h)


class BertEmbeddings(nnx.Module):
    """Word + token-type + absolute position embeddings, then ``LayerNorm``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.word_embeddings = nnx.Embed(config.vocab_size, d, rngs=rngs)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, d, rngs=rngs)
        self.LayerNorm = layer_norm(d, config.layer_norm_eps, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        seq = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings.embedding[:seq])
        return self.LayerNorm(x)


class BertEncoder(nnx.Module):
    """``layer``: an ``nnx.List`` of :class:`BertLayer` (HF's name, singular)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(config, rngs=rngs)
                               for _ in range(config.num_hidden_layers)])

    def __call__(self, hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.layer:
            hidden = layer(hidden, mask)
        return hidden


class BertModel(nnx.Module):
    """The BERT encoder; ``model(input_ids, attention_mask, token_type_ids)`` returns the last
    hidden state ``(batch, seq, hidden_size)``.

    ``pooler`` (``dense``, tanh on the first token) exists when the checkpoint has one; it is
    not used by ``__call__``. Block API: ``embed(input_ids, token_type_ids) -> hidden``,
    ``encoder.layer[i](hidden, mask)``, with ``mask = padding_mask(attention_mask)``.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, add_pooling_layer: bool = True):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = (_Dense(config.hidden_size, config.hidden_size, None, rngs=rngs)
                       if add_pooling_layer else None)

    def embed(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        """Token ids ``(batch, seq)`` -> the first block's input ``(batch, seq, hidden_size)``."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, seq) "
                             f"with seq <= {self.config.max_position_embeddings}")
        return self.embeddings(input_ids, token_type_ids)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        """Ids ``(batch, seq)``, 0/1 padding mask ``(batch, seq)`` -> ``(batch, seq, width)``."""
        return self.encoder(self.embed(input_ids, token_type_ids), padding_mask(attention_mask))

    def pooled(self, hidden: jax.Array) -> jax.Array:
        """BERT's pooler: ``tanh(dense(hidden[:, 0]))``, ``(batch, width)``."""
        if self.pooler is None:
            raise ValueError("this BertModel has no pooler (the checkpoint had none)")
        return jnp.tanh(self.pooler.dense(hidden[:, 0]))


def mean_pool(hidden: jax.Array, attention_mask: jax.Array, normalize: bool = True) -> jax.Array:
    """sentence-transformers' mean pooling: the average of the non-padding tokens' states.

    Args:
        hidden: ``(batch, seq, width)`` last hidden state.
        attention_mask: ``(batch, seq)`` 0/1.
        normalize: L2-normalise each embedding (the ``Normalize`` module of e.g. all-MiniLM).

    Returns:
        ``(batch, width)`` sentence embeddings.
    """
    m = jnp.asarray(attention_mask, hidden.dtype)[..., None]
    emb = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    if normalize:
        emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb


def from_hf(config: dict, tensors: Mapping[str, np.ndarray], *, dtype: Any = None) -> BertModel:
    """Builds a :class:`BertModel` from a ``config.json`` dict and its tensors.

    Names may carry the ``bert.`` prefix of ``BertFor*`` checkpoints; task heads (``cls.*``,
    ``classifier.*``) are not part of the encoder and are skipped. ``dtype``: storage dtype of
    the params (None: float32).
    """
    cfg = BertConfig.from_dict(config)
    names = {n.removeprefix("bert.") for n in tensors}
    model = hf.abstract(lambda: BertModel(cfg, rngs=hf.ABSTRACT_RNGS,
                                          add_pooling_layer="pooler.dense.weight" in names))
    return hf.load_into(model, tensors, lambda n: n.removeprefix("bert."),
                        ignore=[r"position_ids$", r"token_type_ids$", r"^(cls|classifier)\."],
                        dtype=dtype)


def hf_config(config: BertConfig) -> dict:
    """The transformers ``config.json`` dict of ``config`` (:meth:`BertConfig.from_dict` reads it back)."""
    return {"model_type": "bert", "architectures": ["BertModel"], **dataclasses.asdict(config)}


def to_hf(name: str, model_type: str) -> str:
    """The checkpoint name of a model param's dotted name (the inverse of :func:`from_hf`'s
    renaming: a ``BertModel`` checkpoint's names, without the ``bert.`` of ``BertFor*``)."""
    return name

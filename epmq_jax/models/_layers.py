"""Building blocks shared by the Flax model families (CLIP, BERT): activations, attention, masks.

All functions are pure and jit-able. Hidden states are ``(batch, tokens, width)`` float32;
attention heads are split as ``(batch, tokens, heads, head_dim)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


#: Hugging Face ``hidden_act`` names -> functions (exact erf GELU for "gelu", as torch does).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called ``name`` in Hugging Face configs."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act={name!r} is not supported; expected one of "
                         f"{sorted(ACTIVATIONS)}") from None


def layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """A LayerNorm that computes the variance as torch does (two-pass, not E[x^2]-E[x]^2).

    The one-pass formula loses float32 precision on the large residual activations of
    pretrained transformers, so parity with the PyTorch reference needs the two-pass one.
    """
    return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, rngs=rngs)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                         mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention over already projected queries, keys and values.

    Args:
        q: ``(batch, q_len, width)`` projected queries.
        k: ``(batch, kv_len, width)`` projected keys.
        v: ``(batch, kv_len, width)`` projected values.
        num_heads: number of heads; ``width`` must be divisible by it.
        mask: optional boolean mask broadcastable to ``(batch, heads, q_len, kv_len)``;
            True = attend.

    Returns:
        ``(batch, q_len, width)``: the heads' outputs concatenated (before the output projection).
    """
    b, tq, width = q.shape
    if width % num_heads:
        raise ValueError(f"attention width {width} is not divisible by num_heads={num_heads}")
    head_dim = width // num_heads

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], num_heads, head_dim)

    out = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask,
                                       implementation="xla")
    return out.reshape(b, tq, width)


def padding_mask(attention_mask: jax.Array | None, causal: bool = False,
                 length: int | None = None) -> jax.Array | None:
    """Turns a ``(batch, kv_len)`` 0/1 padding mask into a boolean attention mask.

    Args:
        attention_mask: ``(batch, kv_len)`` with 1 for real tokens and 0 for padding, or None.
        causal: also forbid attending to later positions (queries and keys share positions).
        length: sequence length; required when ``attention_mask`` is None and ``causal``.

    Returns:
        Boolean ``(batch|1, 1, q_len|1, kv_len)`` (True = attend), or None when nothing is masked.
    """
    mask = None
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.ndim != 2:
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected "
                             "(batch, seq_len)")
        mask = attention_mask.astype(bool)[:, None, None, :]
        length = attention_mask.shape[1]
    if causal:
        if length is None:
            raise ValueError("padding_mask(causal=True) needs attention_mask or length")
        tri = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        mask = tri if mask is None else mask & tri
    return mask


def config_from_dict(cls: type, d: dict) -> object:
    """Builds config dataclass ``cls`` from a Hugging Face ``config.json`` dict.

    Keys that ``cls`` does not declare (``architectures``, ``dtype``, dropout rates, ...) are
    ignored; missing ones take ``cls``'s defaults, which are Hugging Face's.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

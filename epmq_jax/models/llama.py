"""Llama-family decoder LLMs in Flax nnx: Llama 2/3/3.1/3.2, Mistral, Qwen2 and Qwen3.

One module tree serves the four Hugging Face ``model_type``s, mirroring transformers'
``LlamaForCausalLM`` (and ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``) so
that checkpoint tensors map by name (:func:`epmq_jax.models.hf.load_into`)::

    model.embed_tokens                          nnx.Embed  (embedding (vocab, hidden))
    model.layers[i].input_layernorm             RMSNorm    (scale (hidden,))
    model.layers[i].self_attn.{q,k,v,o}_proj    nnx.Linear (kernel (d_in, d_out) = torch weight.T)
    model.layers[i].self_attn.{q,k}_norm        RMSNorm over head_dim (qwen3 only)
    model.layers[i].post_attention_layernorm    RMSNorm
    model.layers[i].mlp.{gate,up,down}_proj     nnx.Linear
    model.norm                                  RMSNorm
    lm_head                                     nnx.Linear, absent when tie_word_embeddings

The families differ only in switches of :class:`LlamaConfig`: grouped-query attention
(``num_key_value_heads``), an explicit ``head_dim``, biases on q/k/v (qwen2, or every attention
projection with ``attention_bias``) and on the MLP (``mlp_bias``), per-head RMSNorm of queries and
keys before the rotary embedding (qwen3), sliding-window attention (mistral's
``sliding_window``; qwen2/qwen3 with ``use_sliding_window``, per ``layer_types``), and the rotary
embedding's ``rope_theta`` and ``rope_scaling`` (``linear``, ``dynamic`` or ``llama3``).

Computation follows transformers for the parameter dtype (float32 or bfloat16): RMSNorm in
float32, cast back, then times its weight; rotary cos/sin in float32, cast to the hidden dtype;
attention logits and softmax in float32. Logits are returned in float32.

Block API (for block-by-block calibration, see :mod:`epmq_jax.calib.adapters_llm`):
``carry = model.embed(input_ids, attention_mask)`` (a dict: ``hidden`` (B, S, hidden),
``attention_mask`` (B, S), ``position_ids`` (B, S)), ``carry = model.model.layers[i](carry)``,
``logits = model.head(carry["hidden"])``; ``model(input_ids, attention_mask)`` is exactly that.
Position ids come from the attention mask (``cumsum - 1``, 0 on padding), as transformers'
``generate`` computes them, so a left-padded row gets the logits of the unpadded sequence.

Use :func:`from_hf` to build a model from a ``config.json`` dict and its safetensors tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epmq_jax.models import hf, streamed
from epmq_jax.models._layers import activation

#: The ``config.json`` ``model_type``s this module builds.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# transformers' defaults where a family's differ from LlamaConfig's, for keys a config.json omits.
_QWEN_DEFAULTS = {"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
                  "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None}
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": _QWEN_DEFAULTS,
    "qwen3": {**_QWEN_DEFAULTS, "head_dim": 128},
}
# config.json keys a family's transformers code does not read (its biases are fixed).
_UNREAD: dict[str, tuple[str, ...]] = {
    "llama": (), "mistral": ("attention_bias", "mlp_bias"), "qwen2": ("attention_bias", "mlp_bias"),
    "qwen3": ("mlp_bias",),
}
# rope_type -> the keys its parameters need (besides rope_type).
_ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (), "linear": ("factor",), "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder; field names follow transformers' configs.

    ``__post_init__`` resolves the derived fields, so every instance holds concrete values:
    ``num_key_value_heads`` (default: ``num_attention_heads``), ``head_dim`` (default:
    ``hidden_size // num_attention_heads``), ``rope_scaling`` (a dict in, stored as a sorted
    tuple of ``(key, value)`` pairs with ``rope_type``, or None for the plain rotary embedding,
    so the config stays hashable), ``eos_token_id`` (an int or a tuple of ints) and
    ``layer_types`` (one of ``"full_attention"``/``"sliding_attention"`` per layer; default:
    every layer slides when ``sliding_window`` is set). Build one from a ``config.json`` dict
    with :meth:`from_dict`.

    Attributes:
      model_type: ``llama``, ``mistral``, ``qwen2`` (biases on q/k/v) or ``qwen3`` (q/k norms).
      attention_bias: biases on all four attention projections (llama, qwen3).
      mlp_bias: biases on the MLP projections (llama).
      sliding_window: attention span of the sliding layers (a query at index i sees keys
        i - sliding_window < j <= i), or None.
      tie_word_embeddings: logits from ``model.embed_tokens`` (no ``lm_head`` leaf).
      pad_token_id: what :meth:`LlamaForCausalLM.generate` writes after a sequence's end of
        sequence (default: the first ``eos_token_id``).
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        if self.model_type not in FAMILIES:
            raise ValueError(f"LlamaConfig.model_type={self.model_type!r}; expected one of {FAMILIES}")
        if self.num_key_value_heads is None:
            fix("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}; give head_dim")
            fix("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a "
                             f"multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even (rotary embedding)")
        activation(self.hidden_act)
        fix("rope_scaling", _normalize_rope(self.rope_scaling, self.max_position_embeddings))
        if isinstance(self.eos_token_id, (list, tuple)):
            fix("eos_token_id", tuple(int(e) for e in self.eos_token_id))
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"LlamaConfig: sliding_window={self.sliding_window}; expected >= 1 or None")
        n = self.num_hidden_layers
        if self.sliding_window is None:
            layer_types = ("full_attention",) * n
        elif self.layer_types is None:
            layer_types = ("sliding_attention",) * n
        else:
            layer_types = tuple(self.layer_types)
        if len(layer_types) != n or any(t not in _LAYER_TYPES for t in layer_types):
            raise ValueError(f"LlamaConfig.layer_types={self.layer_types!r}: expected "
                             f"{n} entries from {_LAYER_TYPES}")
        fix("layer_types", layer_types)

    @property
    def rope_type(self) -> str:
        """``default``, ``linear``, ``dynamic`` or ``llama3``."""
        return "default" if self.rope_scaling is None else dict(self.rope_scaling)["rope_type"]

    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections have biases (always for qwen2)."""
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids (empty when the config has none)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def pad_id(self) -> int:
        """``pad_token_id``, else the first end-of-sequence id (transformers' fallback), else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else 0

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer ``index`` (None: full causal attention)."""
        return self.sliding_window if self.layer_types[index] == "sliding_attention" else None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """Reads a transformers ``config.json`` dict (``model_type`` llama/mistral/qwen2/qwen3).

        Keys the dict omits take the family's transformers defaults. The rotary parameters are
        read from ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta``
        (older configs). For qwen2/qwen3 the window applies only with ``use_sliding_window``,
        to the layers ``layer_types`` marks (default: index >= ``max_window_layers``).

        Raises:
          ValueError: an unknown ``model_type``, an unsupported ``rope_type`` (supported:
            default, linear, dynamic, llama3), per-layer-type rope parameters, or a
            ``partial_rotary_factor`` other than 1.
        """
        model_type = config.get("model_type", "llama")
        if model_type not in FAMILIES:
            raise ValueError(f"LlamaConfig.from_dict: model_type={model_type!r}; expected one of "
                             f"{FAMILIES}")
        d = {**_FAMILY_DEFAULTS[model_type],
             **{k: v for k, v in config.items() if k not in _UNREAD[model_type]}}
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if any(isinstance(v, Mapping) for v in rope.values()):
            raise ValueError(f"{model_type} config: per-layer-type rope parameters {sorted(rope)} "
                             "are not supported")
        if rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
            raise ValueError(f"{model_type} config: partial_rotary_factor != 1 is not supported")
        d["rope_theta"] = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        d["rope_scaling"] = rope or None
        if model_type in ("qwen2", "qwen3"):
            window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
            d["sliding_window"] = window
            if window is not None and d.get("layer_types") is None:
                first = d.get("max_window_layers", 28)
                d["layer_types"] = ["sliding_attention" if i >= first else "full_attention"
                                    for i in range(d.get("num_hidden_layers", cls.num_hidden_layers))]
        elif model_type == "mistral":
            d["layer_types"] = None   # transformers' Mistral slides in every layer
        else:
            d["sliding_window"] = d["layer_types"] = None
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("layer_types") is not None:
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        return cls(**kwargs)

    @classmethod
    def tiny(cls, model_type: str = "llama", **overrides: Any) -> LlamaConfig:
        """A 2-layer random-test model: hidden 64, 4 query / 2 key-value heads of 16, vocab 128."""
        return cls(**{"model_type": model_type, "vocab_size": 128, "hidden_size": 64,
                      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "max_position_embeddings": 256, **overrides})

    @classmethod
    def llama31_8b(cls) -> LlamaConfig:
        """Llama-3.1-8B's shapes (``meta-llama/Llama-3.1-8B``), e.g. for benchmarks."""
        return cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                   bos_token_id=128000, eos_token_id=128001)


def _normalize_rope(scaling: Any, max_position_embeddings: int) -> tuple | None:
    """``rope_scaling`` dict (or pairs) -> sorted ``(key, value)`` pairs, None for the default."""
    if scaling is None:
        return None
    params = dict(scaling)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("rope_theta", None)
    if rope_type not in _ROPE_KEYS:
        raise ValueError(f"LlamaConfig.rope_scaling: rope_type={rope_type!r} is not supported; "
                         f"expected one of {sorted(_ROPE_KEYS)}")
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in _ROPE_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(f"LlamaConfig.rope_scaling ({rope_type}) lacks {missing}")
    return tuple(sorted({**params, "rope_type": rope_type}.items()))


# --------------------------------------------------------------------------- rotary embedding


@functools.lru_cache(maxsize=32)
def _inv_freq(config: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies ``(head_dim // 2,)`` float32 (static part of every type)."""
    dim = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    params = dict(config.rope_scaling or ())
    if config.rope_type == "linear":
        inv = inv / params["factor"]
    elif config.rope_type == "llama3":
        factor, old_len = params["factor"], params["original_max_position_embeddings"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def _dynamic_inv_freq(config: LlamaConfig, position_ids: jax.Array) -> jax.Array:
    """Dynamic NTK scaling: the base grows once the longest position passes the trained length.

    As transformers recomputes it on every forward: ``seq_len = max(position_ids) + 1``; beyond
    ``max_position_embeddings`` the base becomes ``theta * (factor * seq_len / max_pos -
    (factor - 1)) ** (dim / (dim - 2))``.
    """
    dim, max_pos = config.head_dim, config.max_position_embeddings
    factor = dict(config.rope_scaling)["factor"]
    seq_len = (jnp.max(position_ids) + 1).astype(jnp.float32)
    base = config.rope_theta * (factor * seq_len / max_pos - (factor - 1)) ** (dim / (dim - 2))
    grown = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    return jnp.where(seq_len > max_pos, grown, jnp.asarray(_inv_freq(config)))


def rotary(config: LlamaConfig, position_ids: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, ``(B, S, head_dim // 2)`` each, computed in float32 and
    cast to ``dtype``.

    Args:
      config: the model's config (``head_dim``, ``rope_theta``, ``rope_scaling``).
      position_ids: ``(B, S)`` integer positions.
      dtype: the hidden-state dtype.
    """
    inv = (_dynamic_inv_freq(config, position_ids) if config.rope_type == "dynamic"
           else jnp.asarray(_inv_freq(config)))
    angles = position_ids.astype(jnp.float32)[..., None] * inv
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` for ``x (B, S, heads, head_dim)``, ``cos/sin (B, S, head_dim/2)``."""
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


# --------------------------------------------------------------------------- masks and positions


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``(B, S)`` 0/1 mask -> int32 positions ``cumsum - 1``, 0 on padding (transformers' rule)."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m == 0, 0, jnp.cumsum(m, axis=-1) - 1)


def causal_mask(key_mask: jax.Array, query_start: int | jax.Array, query_len: int,
                window: int | None = None) -> jax.Array:
    """Boolean attention mask ``(B, 1, query_len, K)``, True = may attend.

    Queries sit at sequence indices ``query_start + arange(query_len)``, keys at ``arange(K)``;
    a query at index i sees key j when ``key_mask[b, j]``, ``j <= i`` and, with a ``window``,
    ``j > i - window``.

    Args:
      key_mask: ``(B, K)`` 1 for real tokens (prompt and generated), 0 for padding.
      query_start: sequence index of the first query (0 without a KV cache).
      query_len: number of queries.
      window: sliding-window span, or None.
    """
    qi = query_start + jnp.arange(query_len)[:, None]
    kj = jnp.arange(key_mask.shape[1])[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed = allowed & (kj > qi - window)
    return key_mask.astype(bool)[:, None, None, :] & allowed[None, None]


# --------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """transformers' ``LlamaRMSNorm``: ``scale * (x / rms(x))`` with the statistics in float32,
    the normalised value cast back to ``x``'s dtype before the scale (leaf ``scale``)."""

    def __init__(self, dim: int, eps: float, *, dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        return self.scale[...] * (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


Cache = tuple[jax.Array, jax.Array]


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (``q_norm``/``k_norm`` for qwen3).

    Kernels: ``q_proj (hidden, heads*head_dim)``, ``k_proj``/``v_proj (hidden, kv_heads*head_dim)``,
    ``o_proj (heads*head_dim, hidden)``. Query head h reads key-value head
    ``h // (heads / kv_heads)``, as transformers' ``repeat_kv``.
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.config = config
        c = config
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_proj = linear(c.hidden_size, q_out, use_bias=c.qkv_bias)
        self.k_proj = linear(c.hidden_size, kv_out, use_bias=c.qkv_bias)
        self.v_proj = linear(c.hidden_size, kv_out, use_bias=c.qkv_bias)
        self.o_proj = linear(q_out, c.hidden_size, use_bias=c.attention_bias)
        if c.model_type == "qwen3":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: Cache | None = None, cache_index: int | jax.Array = 0
                 ) -> tuple[jax.Array, Cache | None]:
        """Attention output ``(B, S, hidden)`` and the updated KV cache.

        Args:
          x: normed hidden states ``(B, S, hidden)``.
          cos, sin: rotary tables ``(B, S, head_dim // 2)`` (:func:`rotary`).
          mask: boolean ``(B, 1, S, K)`` (:func:`causal_mask`); K = S without a cache, else
            the cache length.
          cache: ``(keys, values)``, each ``(B, K, kv_heads, head_dim)``, or None.
          cache_index: where this call's keys and values are written into the cache.
        """
        c = self.config
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, s, c.num_key_value_heads, c.head_dim)
        if c.model_type == "qwen3":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            at = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
            cache = (k, v)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=c.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, s, c.num_attention_heads * c.head_dim)), cache


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=config.mlp_bias, dtype=dtype,
                                   param_dtype=dtype, rngs=rngs)
        self.gate_proj = linear(config.hidden_size, config.intermediate_size)
        self.up_proj = linear(config.hidden_size, config.intermediate_size)
        self.down_proj = linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


Carry = dict[str, jax.Array]


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``h += self_attn(input_layernorm(h))``, ``h += mlp(post_attention_layernorm(h))``."""

    def __init__(self, config: LlamaConfig, layer_idx: int, *, dtype: Any, rngs: nnx.Rngs):
        self.config = config
        self.sliding_window = config.layer_window(layer_idx)
        self.self_attn = LlamaAttention(config, dtype=dtype, rngs=rngs)
        self.mlp = LlamaMLP(config, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def __call__(self, carry: Carry) -> Carry:
        """Block API: the carry of :meth:`LlamaForCausalLM.embed` with ``hidden`` advanced by one layer."""
        hidden, _ = self.forward(carry["hidden"], carry["position_ids"], carry["attention_mask"])
        return {**carry, "hidden": hidden}

    def forward(self, hidden: jax.Array, position_ids: jax.Array, key_mask: jax.Array,
                cache: Cache | None = None, cache_index: int | jax.Array = 0
                ) -> tuple[jax.Array, Cache | None]:
        """One layer on ``hidden (B, S, d)`` at ``position_ids (B, S)``.

        Args:
          key_mask: ``(B, K)`` padding mask of the keys (K = S without a cache, else the cache
            length; the queries sit at ``cache_index ...`` in it).
          cache, cache_index: see :meth:`LlamaAttention.__call__`.

        Returns:
          ``(hidden (B, S, d), updated cache or None)``.
        """
        mask = causal_mask(key_mask, cache_index, hidden.shape[1], self.sliding_window)
        cos, sin = rotary(self.config, position_ids, hidden.dtype)
        attn, cache = self.self_attn(self.input_layernorm(hidden), cos, sin, mask, cache, cache_index)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), cache


class LlamaModel(nnx.Module):
    """``embed_tokens``, ``layers`` (an ``nnx.List`` of :class:`LlamaDecoderLayer`), ``norm``."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, i, dtype=dtype, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)


def _check_ids(input_ids: Any, attention_mask: Any, where: str) -> tuple[jax.Array, jax.Array]:
    """Validates ``(B, S)`` integer ids and an equal-shaped mask (ones when None)."""
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{where}: input_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}; "
                         "expected integer (batch, seq)")
    if attention_mask is None:
        return ids, jnp.ones(ids.shape, jnp.int32)
    mask = jnp.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"{where}: attention_mask has shape {tuple(mask.shape)}; expected "
                         f"{tuple(ids.shape)} like input_ids")
    return ids, mask.astype(jnp.int32)


def embed_inputs(embed_tokens: nnx.Embed, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> Carry:
    """The block-API carry from token ids: see :meth:`LlamaForCausalLM.embed`."""
    ids, mask = _check_ids(input_ids, attention_mask, "LlamaForCausalLM.embed")
    return {"hidden": embed_tokens(ids), "attention_mask": mask,
            "position_ids": position_ids_from_mask(mask)}


class LlamaForCausalLM(nnx.Module):
    """A Llama / Mistral / Qwen2 / Qwen3 causal language model (see the module docstring).

    Args:
      config: the :class:`LlamaConfig`.
      dtype: parameter and computation dtype (float32 or bfloat16).
      rngs: initialisation keys.
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"LlamaForCausalLM: dtype={dtype}; expected a float dtype "
                             "(float32 or bfloat16)")
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype=dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                                      dtype=dtype, param_dtype=dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> Carry:
        """Block 0's input.

        Args:
          input_ids: ``(B, S)`` token ids.
          attention_mask: ``(B, S)``, 1 for tokens and 0 for (left) padding; None = no padding.

        Returns:
          ``{"hidden": (B, S, hidden) in the model dtype, "attention_mask": (B, S) int32,
          "position_ids": (B, S) int32}``.
        """
        return embed_inputs(self.model.embed_tokens, input_ids, attention_mask)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final norm and LM head: ``(B, S, hidden)`` -> float32 logits ``(B, S, vocab)``."""
        h = self.model.norm(hidden)
        logits = (self.model.embed_tokens.attend(h) if self.config.tie_word_embeddings
                  else self.lm_head(h))
        return logits.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits ``(B, S, vocab)`` float32, causal; positions from ``attention_mask``.

        Logits at padding positions are meaningless (those queries see no key).
        """
        carry = self.embed(input_ids, attention_mask)
        for layer in self.model.layers:
            carry = layer(carry)
        return self.head(carry["hidden"])

    def generate(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 max_new_tokens: int) -> jax.Array:
        """Greedy decoding with a KV cache, as transformers' ``generate(do_sample=False)``.

        Jitted; compiles once per (batch, prompt length, ``max_new_tokens``).

        Args:
          input_ids: ``(B, S)`` prompts, left-padded.
          attention_mask: ``(B, S)``, 0 on the padding; None = no padding.
          max_new_tokens: number of tokens to generate (>= 1).

        Returns:
          int32 ``(B, S + max_new_tokens)``: the prompt, then the greedy tokens; every token
          after a row's first ``eos_token_id`` is ``config.pad_id``. transformers stops once
          every row has finished, so its output is a prefix of this one.
        """
        ids, mask = _check_ids(input_ids, attention_mask, "LlamaForCausalLM.generate")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}; expected an int >= 1")
        return _greedy(self, ids, mask, max_new_tokens=max_new_tokens)


def _decode(model: LlamaForCausalLM, input_ids: jax.Array, position_ids: jax.Array,
            key_mask: jax.Array, caches: list[Cache], cache_index: int | jax.Array
            ) -> tuple[jax.Array, list[Cache]]:
    """Runs ``input_ids (B, S)`` at ``cache_index`` through every layer with the KV caches;
    returns the last position's logits ``(B, vocab)`` and the updated caches."""
    hidden = model.model.embed_tokens(input_ids)
    new = []
    for layer, cache in zip(model.model.layers, caches, strict=True):
        hidden, cache = layer.forward(hidden, position_ids, key_mask, cache, cache_index)
        new.append(cache)
    return model.head(hidden[:, -1:])[:, 0], new


@nnx.jit(static_argnames=("max_new_tokens",))
def _greedy(model: LlamaForCausalLM, input_ids: jax.Array, attention_mask: jax.Array, *,
            max_new_tokens: int) -> jax.Array:
    cfg = model.config
    b, s = input_ids.shape
    total = s + max_new_tokens
    # Generated tokens are real tokens; the causal mask hides the ones not yet written.
    key_mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
    shape = (b, total, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
              for _ in range(cfg.num_hidden_layers)]
    positions = position_ids_from_mask(attention_mask)
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def pick(logits, done):
        tok = jnp.where(done, cfg.pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return tok, done | jnp.any(tok[:, None] == eos[None, :], axis=-1)

    logits, caches = _decode(model, input_ids, positions, key_mask, caches, 0)
    tok, done = pick(logits, jnp.zeros((b,), bool))
    out = jnp.full((b, max_new_tokens), cfg.pad_id, jnp.int32).at[:, 0].set(tok)

    def step(i, carry):   # feeds token i-1 (sequence index s+i-1), picks token i
        out, caches, tok, done = carry
        pos = positions[:, -1:] + i   # transformers: the last position + 1 per new token
        logits, caches = _decode(model, tok[:, None], pos, key_mask, caches, s + i - 1)
        tok, done = pick(logits, done)
        return out.at[:, i].set(tok), caches, tok, done

    out, *_ = jax.lax.fori_loop(1, max_new_tokens, step, (out, caches, tok, done))
    return jnp.concatenate([input_ids.astype(jnp.int32), out], axis=1)


# --------------------------------------------------------------------------- checkpoint loading

# Buffers some older checkpoints store; transformers recomputes them.
_IGNORED = (r"rotary_emb\.inv_freq$",)


def from_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
            dtype: Any = None) -> LlamaForCausalLM:
    """Builds a :class:`LlamaForCausalLM` from a transformers checkpoint.

    Args:
      config: the parsed ``config.json`` (``model_type`` llama, mistral, qwen2 or qwen3).
      tensors: checkpoint tensors by transformers name (torch layout); may be a lazy mapping
        (only ``keys``, ``[]`` and ``items`` are used, each tensor is read once). With
        ``tie_word_embeddings`` a stored ``lm_head.weight`` is dropped (transformers ties it
        to ``model.embed_tokens.weight``).
      dtype: parameter and computation dtype; None means float32.

    Raises:
      ValueError: see :meth:`LlamaConfig.from_dict`;
        ``epmq_jax.models.hf.CheckpointMismatchError`` listing unknown, missing and
        shape-mismatched tensors (e.g. an untied config whose checkpoint has no ``lm_head``).
    """
    cfg = LlamaConfig.from_dict(config)
    dtype = jnp.float32 if dtype is None else dtype
    model = hf.abstract(lambda: LlamaForCausalLM(cfg, dtype=dtype, rngs=hf.ABSTRACT_RNGS))
    return hf.load_into(model, tensors, _rename(cfg), ignore=_IGNORED)


def _rename(config: LlamaConfig):
    """Checkpoint name -> model name: the same, but a tied model drops a stored ``lm_head``."""
    tied = config.tie_word_embeddings
    return lambda k: None if tied and k == "lm_head.weight" else k


def experts_from_pretrained(paths: Sequence[str | os.PathLike], like: Any, *,
                            revision: str | None = None, allow_nonfinite: bool = False
                            ) -> list[streamed.CheckpointTree]:
    """Expert param trees streamed from their checkpoints, for calibration at LLM size.

    Each expert is a :class:`~epmq_jax.models.streamed.CheckpointTree`: it holds no tensor, and
    :func:`epmq_jax.calib.calibrate` / :func:`epmq_jax.calib.regmean_merge` read expert t's
    block k when they reach block k (memory: about one block times T, not T models)::

        model = from_pretrained(merged_dir)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        experts = llama.experts_from_pretrained(expert_dirs, like=params)
        calibrate(decoder_adapter(model), params, task_inputs, cfg, experts=experts)

    Args:
      paths: one checkpoint directory or hub repo id per expert (a Llama-family
        ``config.json`` and weights in any format :func:`~epmq_jax.models.hf.open_tensors`
        reads; sharded safetensors for LLMs).
      like: the model's pure param tree (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``,
        arrays or ``jax.ShapeDtypeStruct``): structure, shapes and the dtypes tensors are cast
        to when read (Flax kernels ``(d_in, d_out)``).
      revision: hub branch, tag or commit (hub repo ids only).
      allow_nonfinite: accept NaN/inf in the weights (refused when read, by default).

    Raises:
      FileNotFoundError: see :func:`~epmq_jax.models.hf.resolve_checkpoint`. ValueError: a
        ``config.json`` that is not a Llama-family one;
        :class:`~epmq_jax.models.hf.CheckpointMismatchError` for tensors that do not fit
        ``like`` (checked from the headers, before anything is read).
    """
    out = []
    for path in paths:
        directory = hf.resolve_checkpoint(path, revision=revision)
        cfg = LlamaConfig.from_dict(hf.load_config(directory))
        out.append(streamed.CheckpointTree(directory, like, rename=_rename(cfg), ignore=_IGNORED,
                                           allow_nonfinite=allow_nonfinite))
    return out


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config(config: LlamaConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of ``config`` (:meth:`LlamaConfig.from_dict` reads it back).

    The rotary parameters are written as the legacy ``rope_theta`` + ``rope_scaling`` keys,
    which transformers 4 and 5 and vLLM all read; qwen2/qwen3 get ``use_sliding_window``.
    """
    d: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d["rope_scaling"] = dict(config.rope_scaling) if config.rope_scaling else None
    d["layer_types"] = list(config.layer_types)
    if isinstance(config.eos_token_id, tuple):
        d["eos_token_id"] = list(config.eos_token_id)
    if config.model_type in ("qwen2", "qwen3"):
        d["use_sliding_window"] = config.sliding_window is not None
    return {"architectures": [_ARCHITECTURES[config.model_type]], **d}


def to_hf(name: str, model_type: str) -> str:
    """The checkpoint name of a model param's dotted name (the inverse of :func:`from_hf`'s
    renaming: transformers' names are the model's own)."""
    return name

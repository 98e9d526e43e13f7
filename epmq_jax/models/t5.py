"""T5 v1.1 / FLAN-T5 in Flax NNX: encoder-decoder, greedy generation, Hugging Face weights.

The module tree mirrors transformers' ``T5ForConditionalGeneration`` so leaf paths read like
the checkpoint keys, e.g. ``encoder/block/0/layer/0/SelfAttention/q/kernel`` or
``decoder/block/3/layer/2/DenseReluDense/wi_0/kernel``. Every linear kernel is in Flax layout
``(d_in, d_out)`` (the transpose of PyTorch's ``weight``). The architecture:

- RMS layer norm without bias or mean subtraction (``T5LayerNorm``), pre-norm residual blocks;
- attention without the ``1/sqrt(d_kv)`` scaling; a bucketed relative position bias, held by
  the first self-attention layer of each stack and shared by all its layers (bidirectional
  in the encoder, causal in the decoder);
- the feed-forward ``wo(act(wi_0 x) * wi_1 x)`` for ``feed_forward_proj="gated-gelu"`` (T5 v1.1,
  FLAN-T5: ``gelu_new``, the tanh approximation) or ``wo(act(wi x))`` for ``"relu"`` (T5 v1.0);
- an untied ``lm_head`` (v1.1), or logits from the shared embedding when the checkpoint has
  none; the decoder output is scaled by ``d_model**-0.5`` before the head when
  ``scale_decoder_outputs`` (transformers' rule: on for tied heads, off for v1.1).

Use :func:`from_hf` to build the model from a ``config.json`` dict and safetensors tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epmq_jax.models import hf

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """Hyper-parameters of a T5 model; field names follow transformers' ``T5Config``.

    ``tie_word_embeddings`` here means the logits come from the shared embedding (no
    ``lm_head`` leaf); :func:`from_hf` sets it from whether the checkpoint holds
    ``lm_head.weight``.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: expected '<act>' or "
                "'gated-<act>', e.g. 'gated-gelu' or 'relu'")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: activation "
                             f"{self.activation!r} is not one of {sorted(_ACTIVATIONS)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Activation name as transformers resolves it ('gated-gelu' uses ``gelu_new``)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def n_decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, has_lm_head: bool = True) -> T5Config:
        """Reads a transformers ``config.json`` dict.

        Args:
          config: the parsed ``config.json``.
          has_lm_head: whether the checkpoint holds a separate ``lm_head.weight``.

        The output scaling follows transformers 5: an explicit ``scale_decoder_outputs`` wins;
        otherwise it is on unless ``tie_word_embeddings`` is false (older configs, FLAN-T5).
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"tie_word_embeddings",
                                                              "scale_decoder_outputs"}
        kwargs = {k: config[k] for k in names if config.get(k) is not None}
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if "scale_decoder_outputs" in config:
            scale = bool(config["scale_decoder_outputs"])
        else:
            scale = config.get("tie_word_embeddings", True) is not False
        return cls(tie_word_embeddings=not has_lm_head, scale_decoder_outputs=scale, **kwargs)


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
    """Maps ``memory_pos - query_pos`` to a bucket in ``[0, num_buckets)`` (Mesh-TF's rule).

    Half of the buckets (per direction when ``bidirectional``) hold exact small distances;
    the rest are log-spaced up to ``max_distance``, beyond which all share the last bucket.
    With ``bidirectional=False`` positive (future) offsets fall into bucket 0.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 like the reference, so the bucket boundaries agree exactly; log(0) is masked below.
    safe = jnp.maximum(distance, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


def position_bias(table: jax.Array, query_length: int, key_length: int, *, bidirectional: bool,
                  max_distance: int) -> jax.Array:
    """The additive attention bias ``(1, H, query_length, key_length)``.

    Args:
      table: the ``relative_attention_bias`` embedding, ``(num_buckets, H)``.
      bidirectional: True in the encoder, False (causal) in the decoder.
      max_distance: ``relative_attention_max_distance``.
    """
    rel = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None]
    bucket = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=table.shape[0],
                                      max_distance=max_distance)
    return jnp.transpose(table[bucket], (2, 0, 1))[None]


def self_attention_mask(attention_mask: jax.Array | None, length: int, *, causal: bool
                        ) -> jax.Array | None:
    """Boolean self-attention mask broadcastable to (B, H, L, L), True = may attend.

    Args:
      attention_mask: (B, L), 1 for tokens and 0 for padding, or None (no padding).
      causal: also forbid attending to later positions (the decoder).
    """
    mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
    if causal:
        tri = jnp.tril(jnp.ones((length, length), bool))[None, None]
        mask = tri if mask is None else mask & tri
    return mask


class T5Attention(nnx.Module):
    """Multi-head attention with ``q, k, v, o`` kernels ``(d_model, H*d_kv)`` / ``(H*d_kv, d_model)``.

    When ``has_relative_attention_bias``, also holds ``relative_attention_bias`` (an embedding
    of shape ``(num_buckets, num_heads)``) and computes the stack's position bias.
    """

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, causal: bool,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.causal = causal
        self.max_distance = config.relative_attention_max_distance
        inner = config.num_heads * config.d_kv
        linear = partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = linear(config.d_model, inner)
        self.k = linear(config.d_model, inner)
        self.v = linear(config.d_model, inner)
        self.o = linear(inner, config.d_model)
        if has_relative_attention_bias:
            self.relative_attention_bias = nnx.Embed(
                config.relative_attention_num_buckets, config.num_heads, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)

    def position_bias(self, query_length: int, key_length: int) -> jax.Array:
        """The relative position bias ``(1, H, query_length, key_length)``."""
        return position_bias(self.relative_attention_bias.embedding[...], query_length, key_length,
                             bidirectional=not self.causal, max_distance=self.max_distance)

    def __call__(self, x: jax.Array, kv: jax.Array, bias: jax.Array, mask: jax.Array | None
                 ) -> jax.Array:
        """Attends from ``x`` (B, Lq, d_model) to ``kv`` (B, Lk, d_model).

        Args:
          bias: additive position bias broadcastable to (B, H, Lq, Lk).
          mask: boolean, broadcastable to (B, H, Lq, Lk), True where attending is allowed.
        """
        b, lq, _ = x.shape
        lk = kv.shape[1]
        q = self.q(x).reshape(b, lq, self.num_heads, self.d_kv)
        k = self.k(kv).reshape(b, lk, self.num_heads, self.d_kv)
        v = self.v(kv).reshape(b, lk, self.num_heads, self.d_kv)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
        if mask is not None:
            # where() rather than adding a large negative: a fully masked row stays finite.
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, self.num_heads * self.d_kv)
        return self.o(out)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, causal: bool,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(config, has_relative_attention_bias=has_relative_attention_bias,
                                         causal=causal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = nnx.RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = self.layer_norm(h)
        return h + self.SelfAttention(x, x, bias, mask)


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, config: T5Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False, causal=False,
                                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = nnx.RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array, enc: jax.Array, mask: jax.Array | None) -> jax.Array:
        return h + self.EncDecAttention(self.layer_norm(h), enc, jnp.zeros((), jnp.float32), mask)


class T5DenseGatedActDense(nnx.Module):
    """``wo(act(x @ wi_0) * (x @ wi_1))``; kernels (d_model, d_ff), (d_model, d_ff), (d_ff, d_model)."""

    def __init__(self, config: T5Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = linear(config.d_model, config.d_ff)
        self.wi_1 = linear(config.d_model, config.d_ff)
        self.wo = linear(config.d_ff, config.d_model)
        self.act = _ACTIVATIONS[config.activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
    """``wo(act(x @ wi))``; kernels (d_model, d_ff), (d_ff, d_model)."""

    def __init__(self, config: T5Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi = linear(config.d_model, config.d_ff)
        self.wo = linear(config.d_ff, config.d_model)
        self.act = _ACTIVATIONS[config.activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nnx.Module):
    def __init__(self, config: T5Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        ff = T5DenseGatedActDense if config.is_gated else T5DenseActDense
        self.DenseReluDense = ff(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = nnx.RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return h + self.DenseReluDense(self.layer_norm(h))


class T5Block(nnx.Module):
    """``layer = [self-attention, (cross-attention,) feed-forward]``, as in transformers."""

    def __init__(self, config: T5Config, *, is_decoder: bool, has_relative_attention_bias: bool,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layers = [T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias,
                                       causal=is_decoder, **kw)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config, **kw))
        layers.append(T5LayerFF(config, **kw))
        self.layer = nnx.List(layers)
        self.is_decoder = is_decoder

    def __call__(self, h: jax.Array, bias: jax.Array, mask: jax.Array | None,
                 enc: jax.Array | None = None, enc_mask: jax.Array | None = None) -> jax.Array:
        """One block on ``h`` (B, L, d_model).

        Args:
          bias: the stack's self-attention position bias (1, H, L, L).
          mask: self-attention mask, boolean, broadcastable to (B, H, L, L).
          enc: encoder output (B, S, d_model) for the decoder's cross-attention.
          enc_mask: cross-attention mask, boolean, broadcastable to (B, H, L, S).
        """
        h = self.layer[0](h, bias, mask)
        if self.is_decoder:
            h = self.layer[1](h, enc, enc_mask)
        return self.layer[-1](h)


class T5Stack(nnx.Module):
    """A stack of :class:`T5Block` plus ``final_layer_norm``; the token embedding lives outside."""

    def __init__(self, config: T5Config, *, is_decoder: bool, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        n = config.n_decoder_layers if is_decoder else config.num_layers
        self.block = nnx.List([
            T5Block(config, is_decoder=is_decoder, has_relative_attention_bias=i == 0, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs) for i in range(n)])
        self.final_layer_norm = nnx.RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon,
                                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.is_decoder = is_decoder

    def self_attention_inputs(self, length: int, attention_mask: jax.Array | None
                              ) -> tuple[jax.Array, jax.Array | None]:
        """The position bias (1, H, L, L) and self-attention mask that every block shares.

        Args:
          length: sequence length L.
          attention_mask: (B, L) with 1 for real tokens and 0 for padding, or None.
        """
        bias = self.block[0].layer[0].SelfAttention.position_bias(length, length)
        mask = self_attention_mask(attention_mask, length, causal=self.is_decoder)
        return bias, mask

    def __call__(self, embeds: jax.Array, attention_mask: jax.Array | None = None,
                 enc: jax.Array | None = None, enc_mask: jax.Array | None = None) -> jax.Array:
        """Runs the stack on embeddings (B, L, d_model); returns the normed output (B, L, d_model).

        ``attention_mask`` (B, L) and ``enc_mask`` (B, S) use 1 for real tokens, 0 for padding.
        """
        bias, mask = self.self_attention_inputs(embeds.shape[1], attention_mask)
        cross_mask = None if enc_mask is None else enc_mask[:, None, None, :].astype(bool)
        h = embeds
        for block in self.block:
            h = block(h, bias, mask, enc, cross_mask)
        return self.final_layer_norm(h)


class T5ForConditionalGeneration(nnx.Module):
    """T5 encoder-decoder with a language-model head.

    Leaves: ``shared/embedding`` (vocab, d_model), ``encoder/...``, ``decoder/...`` and, unless
    ``config.tie_word_embeddings``, ``lm_head/kernel`` (d_model, vocab).
    """

    def __init__(self, config: T5Config, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        """Args: dtype: computation dtype; param_dtype: storage dtype of the weights."""
        self.config = config
        self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = T5Stack(config, is_decoder=False, **kw)
        self.decoder = T5Stack(config, is_decoder=True, **kw)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.d_model, config.vocab_size, use_bias=False, **kw)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Encoder output (B, S, d_model) for token ids (B, S); mask: 1 = token, 0 = padding."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden_states: jax.Array,
               attention_mask: jax.Array | None = None,
               decoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits (B, L, vocab) for decoder ids (B, L) given the encoder output (B, S, d_model).

        ``attention_mask`` (B, S) is the encoder's padding mask, used by cross-attention.
        """
        h = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask,
                         encoder_hidden_states, attention_mask)
        return self.lm_logits(h)

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """The head on decoder outputs (B, L, d_model) -> logits (B, L, vocab)."""
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5
        if self.config.tie_word_embeddings:
            return self.shared.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 decoder_input_ids: jax.Array,
                 decoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits (B, L, vocab).

        Args:
          input_ids: encoder token ids (B, S).
          attention_mask: (B, S), 1 for tokens and 0 for padding; None means no padding.
          decoder_input_ids: (B, L), starting with ``config.decoder_start_token_id``.
          decoder_attention_mask: optional (B, L) padding mask of the decoder inputs.
        """
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask)

    def generate(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 max_new_tokens: int = 20) -> jax.Array:
        """Greedy decoding, as transformers' ``generate(do_sample=False, num_beams=1)``.

        Args:
          input_ids: (B, S) encoder token ids.
          attention_mask: (B, S) padding mask, or None.
          max_new_tokens: number of decoding steps.

        Returns:
          int32 (B, 1 + max_new_tokens): ``decoder_start_token_id``, then the greedy tokens;
          after a sequence emits ``eos_token_id`` the rest is ``pad_token_id``. transformers
          stops early once every row is finished, so its output is a prefix of this one.
        """
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens}, expected >= 1")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return _greedy(self, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                       max_new_tokens=max_new_tokens)


@nnx.jit(static_argnames=("max_new_tokens",))
def _greedy(model: T5ForConditionalGeneration, input_ids: jax.Array, attention_mask: jax.Array,
            *, max_new_tokens: int) -> jax.Array:
    # Recompute loop over a fixed buffer: the causal mask keeps step i independent of the
    # (not yet written) positions > i, so every step has the same shapes and compiles once.
    cfg = model.config
    enc = model.encode(input_ids, attention_mask)
    batch = input_ids.shape[0]
    tokens = jnp.full((batch, max_new_tokens + 1), cfg.pad_token_id, jnp.int32)
    tokens = tokens.at[:, 0].set(cfg.decoder_start_token_id)

    def step(i, carry):
        tokens, done = carry
        logits = model.decode(tokens, enc, attention_mask)
        nxt = jnp.argmax(logits[:, i, :], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, cfg.pad_token_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i + 1))
        return tokens, done | (nxt == cfg.eos_token_id)

    tokens, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, jnp.zeros((batch,), bool)))
    return tokens


# --- Hugging Face checkpoint conversion ------------------------------------------------------

# Keys transformers itself ignores when loading (an unused bias of the first cross-attention).
_IGNORED = (r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",)
# Per-stack copies of the shared embedding that older checkpoints store explicitly.
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def from_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
            dtype: Any = None) -> T5ForConditionalGeneration:
    """Builds a :class:`T5ForConditionalGeneration` from a transformers checkpoint.

    Args:
      config: the parsed ``config.json`` (``model_type`` "t5").
      tensors: checkpoint tensors by transformers key (PyTorch layout: a Linear ``weight`` is
        ``(d_out, d_in)`` and becomes the Flax kernel ``(d_in, d_out)``). Without
        ``lm_head.weight`` the head is tied to ``shared``.
      dtype: storage dtype of the parameters (None: float32); computation is float32.

    Raises:
      ValueError: a per-stack ``embed_tokens`` copy that differs from ``shared.weight``;
        ``epmq_jax.models.hf.CheckpointMismatchError`` listing unknown, missing and
        shape-mismatched keys.
    """
    if config.get("model_type", "t5") != "t5":
        raise ValueError(f"from_hf(t5): config model_type={config.get('model_type')!r}, expected 't5'")
    for alias in _EMBED_ALIASES:
        if alias in tensors and not np.array_equal(tensors[alias], tensors.get("shared.weight")):
            raise ValueError(f"T5 checkpoint: {alias} {np.shape(tensors[alias])} differs from "
                             "shared.weight; this model ties the stacks' embeddings to it")
    cfg = T5Config.from_hf(config, has_lm_head="lm_head.weight" in tensors)
    model = hf.abstract(lambda: T5ForConditionalGeneration(cfg, rngs=hf.ABSTRACT_RNGS))
    return hf.load_into(model, tensors, rename=lambda k: None if k in _EMBED_ALIASES else k,
                        ignore=_IGNORED, dtype=dtype)


def hf_config(config: T5Config) -> dict[str, Any]:
    """The transformers ``config.json`` dict of ``config`` (:meth:`T5Config.from_hf` reads it back).

    ``tie_word_embeddings`` and ``scale_decoder_outputs`` are both written: transformers 5 reads
    the explicit ``scale_decoder_outputs``; the head is tied when the checkpoint has no
    ``lm_head.weight``.
    """
    d = dataclasses.asdict(config)
    d["num_decoder_layers"] = config.n_decoder_layers
    return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
            "is_encoder_decoder": True, **d}


def to_hf(name: str, model_type: str) -> str:
    """The checkpoint name of a model param's dotted name (the inverse of :func:`from_hf`'s
    renaming: transformers' names are the model's own)."""
    return name

"""The calibration adapter for T5 / FLAN-T5 (:mod:`epmq_jax.models.t5`): encoder, then decoder.

One stream runs through both stacks: the blocks are the encoder's, then the decoder's, in
forward order, so the decoder is calibrated on the quantized encoder's output (and, on the
expert paths, each expert's decoder on that expert's encoder output). The carry holds both
halves of the state, every leaf with the samples on axis 0:

- ``enc`` (n, S, d): the encoder hidden states; from the first decoder block on, the
  encoder's final output (``encoder.final_layer_norm`` applied there);
- ``enc_mask`` (n, S): the encoder padding mask;
- ``dec`` (n, L, d): the decoder hidden states (its token embeddings until the decoder starts);
- ``dec_mask`` (n, L): the decoder padding mask (answer tokens are 1);
- ``enc_table``, ``dec_table`` (n, num_buckets, H): the stacks' relative-attention tables,
  and ``enc_norm`` (n, d): the encoder's final norm scale. They are parameters outside the
  blocks, copied into the carry by ``embed`` (per path: the merged model's or an expert's).

Calibration inputs are teacher-forced: ``{"input_ids", "attention_mask", "decoder_input_ids",
"decoder_attention_mask"}`` (n, S) / (n, L), the decoder ids being the start token followed by
the target answer (see :func:`epmq_jax.data.glue.calibration_inputs`). Captured inputs carry
their padding mask as row weights, so padding tokens add nothing to H and B.

Calibrated kernels per block (paths relative to the block), grouped by shared input:
encoder ``SelfAttention/{q,k,v}``, ``o``, ``DenseReluDense/{wi_0,wi_1}`` (``wi`` for
non-gated T5), ``wo``; the decoder adds ``EncDecAttention/q``, ``{k,v}`` (input: the encoder
output) and ``o`` between its self-attention and feed-forward. The shared embedding, the
relative-attention tables, the norms and ``lm_head`` are not calibrated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from epmq_jax.calib.adapter import Captures, capture_nnx
from epmq_jax.models import hf, t5

PyTree = Any
Kind = tuple[str, bool]  # (stack, is first block of the stack)


def _group_paths(config: t5.T5Config, stack: str) -> tuple[tuple[str, ...], ...]:
    ff = 2 if stack == "decoder" else 1
    wi = ("wi_0", "wi_1") if config.is_gated else ("wi",)
    groups = [tuple(f"layer/0/SelfAttention/{p}/kernel" for p in "qkv"),
              ("layer/0/SelfAttention/o/kernel",)]
    if stack == "decoder":
        groups += [("layer/1/EncDecAttention/q/kernel",),
                   ("layer/1/EncDecAttention/k/kernel", "layer/1/EncDecAttention/v/kernel"),
                   ("layer/1/EncDecAttention/o/kernel",)]
    groups += [tuple(f"layer/{ff}/DenseReluDense/{w}/kernel" for w in wi),
               (f"layer/{ff}/DenseReluDense/wo/kernel",)]
    return tuple(groups)


@dataclasses.dataclass(frozen=True)
class T5Adapter:
    """Adapter (see :class:`epmq_jax.calib.adapter.CalibAdapter`) for a T5 parameter tree.

    Params: ``nnx.state(model, nnx.Param).to_pure_dict()`` of a
    :class:`~epmq_jax.models.t5.T5ForConditionalGeneration`. Build it with :func:`t5_adapter`.

    Attributes:
      config: the model's :class:`~epmq_jax.models.t5.T5Config`.
      block_defs: graph definitions of the four block kinds, keyed like :meth:`block_kind`.
      norm_def: graph definition of a ``T5LayerNorm`` (for the encoder's final norm).
    """

    config: t5.T5Config
    block_defs: tuple[tuple[Kind, Any], ...]
    norm_def: Any

    def embed(self, params: PyTree, inputs: PyTree) -> PyTree:
        """Token embeddings of both stacks plus the non-block parameters the blocks need."""
        ids, dec_ids = inputs["input_ids"], inputs["decoder_input_ids"]
        n = ids.shape[0]
        if dec_ids.shape[0] != n:
            raise ValueError(f"T5 calibration inputs: input_ids {ids.shape} and decoder_input_ids "
                             f"{dec_ids.shape} differ in the number of samples")
        emb = params["shared"]["embedding"]
        tile = lambda a: jnp.broadcast_to(a, (n, *a.shape))
        first = lambda stack: params[stack]["block"][0]["layer"][0]["SelfAttention"]
        return {
            "enc": jnp.take(emb, ids, axis=0),
            "enc_mask": inputs.get("attention_mask", jnp.ones(ids.shape, jnp.int32)),
            "dec": jnp.take(emb, dec_ids, axis=0),
            "dec_mask": inputs.get("decoder_attention_mask", jnp.ones(dec_ids.shape, jnp.int32)),
            "enc_table": tile(first("encoder")["relative_attention_bias"]["embedding"]),
            "dec_table": tile(first("decoder")["relative_attention_bias"]["embedding"]),
            "enc_norm": tile(params["encoder"]["final_layer_norm"]["scale"]),
        }

    def block_paths(self, params: PyTree) -> list[tuple]:
        paths = []
        for stack, want in (("encoder", self.config.num_layers),
                            ("decoder", self.config.n_decoder_layers)):
            have = len(params[stack]["block"])
            if have != want:
                raise ValueError(f"T5 params hold {have} blocks at {stack}/block, the adapter's "
                                 f"config expects {want}")
            paths += [(stack, "block", i) for i in range(have)]
        return paths

    def block_kind(self, index: int) -> Kind:
        n_enc = self.config.num_layers
        return ("encoder", index == 0) if index < n_enc else ("decoder", index == n_enc)

    def linear_groups(self, kind: Hashable) -> tuple[tuple[str, ...], ...]:
        return _group_paths(self.config, kind[0])

    def run_block(self, kind: Hashable, block_params: PyTree, carry: PyTree
                  ) -> tuple[PyTree, Captures]:
        stack, first = kind
        cfg = self.config
        block_def = dict(self.block_defs)[kind]
        carry = dict(carry)
        if stack == "encoder":
            h = carry["enc"]
            bias = t5.position_bias(carry["enc_table"][0], h.shape[1], h.shape[1],
                                    bidirectional=True, max_distance=cfg.relative_attention_max_distance)
            mask = t5.self_attention_mask(carry["enc_mask"], h.shape[1], causal=False)
            carry["enc"], caps = capture_nnx(block_def, block_params,
                                             lambda blk, x: blk(x, bias, mask), h)
            return carry, {p: (x, carry["enc_mask"]) for p, x in caps.items()}

        if first:  # the encoder is done: its final norm, once, before any cross-attention
            norm = nnx.merge(self.norm_def, {"scale": carry["enc_norm"][0]})
            carry["enc"] = norm(carry["enc"])
        h = carry["dec"]
        bias = t5.position_bias(carry["dec_table"][0], h.shape[1], h.shape[1],
                                bidirectional=False, max_distance=cfg.relative_attention_max_distance)
        mask = t5.self_attention_mask(carry["dec_mask"], h.shape[1], causal=True)
        cross_mask = carry["enc_mask"][:, None, None, :].astype(bool)
        carry["dec"], caps = capture_nnx(
            block_def, block_params, lambda blk, x: blk(x, bias, mask, carry["enc"], cross_mask), h)
        enc_side = {"layer/1/EncDecAttention/k/kernel", "layer/1/EncDecAttention/v/kernel"}
        return carry, {p: (x, carry["enc_mask"] if p in enc_side else carry["dec_mask"])
                       for p, x in caps.items()}

    def logits(self, params: PyTree, carry: PyTree) -> jax.Array:
        """The decoder's final norm and LM head on the carry after the last block: (n, L, vocab)."""
        model = nnx.merge(_model_def(self.config), params)
        return model.lm_logits(model.decoder.final_layer_norm(carry["dec"]))


@functools.lru_cache(maxsize=8)
def _model_def(config: t5.T5Config) -> Any:
    """Graph definition of the whole model, built abstractly from the (hashable) config."""
    return nnx.split(hf.abstract(lambda: t5.T5ForConditionalGeneration(config, rngs=hf.ABSTRACT_RNGS)))[0]


def t5_adapter(model: t5.T5ForConditionalGeneration) -> T5Adapter:
    """The adapter for ``model`` and every model of the same config (merged, experts).

    Raises:
      ValueError: ``model`` is not a T5ForConditionalGeneration.
    """
    if not isinstance(model, t5.T5ForConditionalGeneration):
        raise ValueError(f"t5_adapter: expected a T5ForConditionalGeneration, got {type(model).__name__}")
    cfg = model.config
    kinds = [(("encoder", True), model.encoder.block[0])]
    if cfg.num_layers > 1:
        kinds.append((("encoder", False), model.encoder.block[1]))
    kinds.append((("decoder", True), model.decoder.block[0]))
    if cfg.n_decoder_layers > 1:
        kinds.append((("decoder", False), model.decoder.block[1]))
    norm_def = nnx.split(model.encoder.final_layer_norm)[0]
    return T5Adapter(cfg, tuple((k, nnx.split(b)[0]) for k, b in kinds), norm_def)

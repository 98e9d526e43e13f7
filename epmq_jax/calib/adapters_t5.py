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

AWQ groups (:meth:`T5Adapter.awq_groups`, llm-awq's Llama recipe on T5's RMSNorm blocks): q/k/v
share a scale folded into the self-attention's ``layer_norm`` and judged on the attention output;
``o``'s goes into ``v``'s output channels; the cross-attention's ``q`` into its ``layer_norm``
(judged on the cross-attention output); the feed-forward's ``wi_0``/``wi_1`` (or ``wi``) into
its ``layer_norm`` (judged on the feed-forward output); ``wo``'s into ``wi_1``'s output
channels (gated: ``act(x·wi_0) * (x·wi_1)/s`` is exact) or ``wi``'s for ReLU (positively
homogeneous); other activations leave ``wo`` unscaled. The cross-attention's ``k``/``v`` read
the encoder output, whose final norm is shared by every decoder block, so they get no scale.
q and k are not clipped.

E-PMQ-full (:class:`~epmq_jax.calib.adapter.FullAdapter`): the norms ``layer/i/layer_norm``
(RMSNorm, scale only) before the self-attention, the cross-attention and the feed-forward; the
residual writers ``o`` (self and cross) and ``wo``; a head pseudo block (``HEAD``: the decoder's
``final_layer_norm`` and, untied, ``lm_head`` on the decoder outputs). The task reads every
answer token (teacher-forced: the LM head scores each) and every encoder token reaches the
decoder through cross-attention, so ``readout`` names no subset: token weights change nothing
for T5. The encoder's final norm (carried into the decoder blocks) and the embeddings are not
calibrated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from epmq_jax._tree import iter_paths
from epmq_jax.calib.adapter import (
    HEAD,
    AwqGroup,
    Captures,
    NormSpec,
    capture_nnx,
    check_awq_groups,
    module_at,
)
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


def _norms(stack: str) -> tuple[NormSpec, ...]:
    """The block's norms and the group each precedes (see :func:`_group_paths` for the indices)."""
    if stack == "decoder":
        return (NormSpec("layer/0/layer_norm", 0), NormSpec("layer/1/layer_norm", 2),
                NormSpec("layer/2/layer_norm", 5))
    return NormSpec("layer/0/layer_norm", 0), NormSpec("layer/1/layer_norm", 2)


def _residuals(stack: str) -> dict[str, str]:
    out = {"layer/0/SelfAttention/o/kernel": "layer/0/layer_norm"}
    if stack == "decoder":
        out["layer/1/EncDecAttention/o/kernel"] = "layer/1/layer_norm"
    ff = 2 if stack == "decoder" else 1
    out[f"layer/{ff}/DenseReluDense/wo/kernel"] = f"layer/{ff}/layer_norm"
    return out


def _awq_groups(config: t5.T5Config, stack: str) -> tuple[AwqGroup, ...]:
    sa, ca = "layer/0/SelfAttention", "layer/1/EncDecAttention"
    ff = f"layer/{2 if stack == 'decoder' else 1}"
    dense = f"{ff}/DenseReluDense"
    kern = lambda *ps: tuple(f"{p}/kernel" for p in ps)
    groups = [AwqGroup(kern(f"{sa}/q", f"{sa}/k", f"{sa}/v"), "layer/0/layer_norm", "norm", sa,
                       no_clip=kern(f"{sa}/q", f"{sa}/k")),
              AwqGroup(kern(f"{sa}/o"), f"{sa}/v", "linear")]
    if stack == "decoder":
        groups += [AwqGroup(kern(f"{ca}/q"), "layer/1/layer_norm", "norm", ca, no_clip=kern(f"{ca}/q")),
                   AwqGroup(kern(f"{ca}/k", f"{ca}/v"), None, None, no_clip=kern(f"{ca}/k")),
                   AwqGroup(kern(f"{ca}/o"), f"{ca}/v", "linear")]
    wi = ("wi_0", "wi_1") if config.is_gated else ("wi",)
    groups.append(AwqGroup(kern(*(f"{dense}/{w}" for w in wi)), f"{ff}/layer_norm", "norm", dense))
    if config.is_gated:
        wo_prev = (f"{dense}/wi_1", "linear")
    else:
        wo_prev = (f"{dense}/wi", "linear") if config.activation == "relu" else (None, None)
    groups.append(AwqGroup(kern(f"{dense}/wo"), *wo_prev))
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
        if kind == HEAD:
            return () if self.config.tie_word_embeddings else (("lm_head/kernel",),)
        return _group_paths(self.config, kind[0])

    def _context(self, kind: Kind, carry: PyTree) -> dict[str, Any]:
        """The block's input carry with what its layers need beside the hidden states: the
        self-attention ``bias`` and ``mask``; in the decoder the (final-normed) encoder output
        ``enc`` and the cross-attention mask ``cross_mask``."""
        stack, first = kind
        ctx = dict(carry)
        if stack == "decoder" and first:  # the encoder is done: its final norm, once, before any cross-attention
            norm = nnx.merge(self.norm_def, {"scale": carry["enc_norm"][0]})
            ctx["enc"] = norm(carry["enc"])
        h = ctx["enc" if stack == "encoder" else "dec"]
        ctx["bias"] = t5.position_bias(
            ctx["enc_table" if stack == "encoder" else "dec_table"][0], h.shape[1], h.shape[1],
            bidirectional=stack == "encoder", max_distance=self.config.relative_attention_max_distance)
        ctx["mask"] = t5.self_attention_mask(ctx["enc_mask" if stack == "encoder" else "dec_mask"],
                                             h.shape[1], causal=stack == "decoder")
        if stack == "decoder":
            ctx["cross_mask"] = ctx["enc_mask"][:, None, None, :].astype(bool)
        return ctx

    def run_block(self, kind: Hashable, block_params: PyTree, carry: PyTree
                  ) -> tuple[PyTree, Captures]:
        return self._run(kind, block_params, carry, ())

    def _run(self, kind: Kind, block_params: PyTree, carry: PyTree, norms: tuple[str, ...]
             ) -> tuple[PyTree, Captures]:
        """One block, capturing the kernels' inputs and the ``norms``' (see ``capture_nnx``)."""
        block_def = dict(self.block_defs)[kind]
        ctx = self._context(kind, carry)
        carry = {k: ctx[k] for k in carry}
        if kind[0] == "encoder":
            carry["enc"], caps = capture_nnx(block_def, block_params,
                                             lambda blk, x: blk(x, ctx["bias"], ctx["mask"]), carry["enc"],
                                             norms=norms)
            return carry, {p: (x, carry["enc_mask"]) for p, x in caps.items()}
        carry["dec"], caps = capture_nnx(
            block_def, block_params,
            lambda blk, x: blk(x, ctx["bias"], ctx["mask"], ctx["enc"], ctx["cross_mask"]), carry["dec"],
            norms=norms)
        enc_side = {"layer/1/EncDecAttention/k/kernel", "layer/1/EncDecAttention/v/kernel"}
        return carry, {p: (x, carry["enc_mask"] if p in enc_side else carry["dec_mask"])
                       for p, x in caps.items()}

    # E-PMQ-full's extension (FullAdapter)
    def full_norms(self, kind: Hashable) -> tuple[NormSpec, ...]:
        return (NormSpec("decoder/final_layer_norm", 0),) if kind == HEAD else _norms(kind[0])

    def run_block_full(self, kind: Hashable, block_params: PyTree, carry: PyTree
                       ) -> tuple[PyTree, Captures]:
        if kind == HEAD:   # the decoder's final norm and the LM head on the decoder outputs
            model_def = _model_def(self.config)
            _, caps = capture_nnx(model_def, block_params,
                                  lambda m, h: m.lm_logits(m.decoder.final_layer_norm(h)), carry["dec"],
                                  norms=("decoder/final_layer_norm",))
            return None, {p: (x, carry["dec_mask"]) for p, x in caps.items()}
        return self._run(kind, block_params, carry, tuple(n.path for n in _norms(kind[0])))

    def readout(self, kind: Hashable, path: str, carry: PyTree) -> jax.Array | None:
        return None

    def residuals(self, kind: Hashable) -> dict[str, str]:
        return {} if kind == HEAD else _residuals(kind[0])

    def leaf_kinds(self) -> tuple[Hashable | None, Hashable | None]:
        return None, HEAD

    def awq_groups(self, kind: Hashable) -> tuple[AwqGroup, ...]:
        return _awq_groups(self.config, kind[0])

    def awq_module(self, kind: Hashable, module: str, block_params: PyTree, x: jax.Array,
                   carry: PyTree) -> jax.Array:
        ctx = self._context(kind, carry)
        m = module_at(nnx.merge(dict(self.block_defs)[kind], block_params), module)
        if module.endswith("SelfAttention"):
            return m(x, x, ctx["bias"], ctx["mask"])
        if module.endswith("EncDecAttention"):
            return m(x, ctx["enc"], jnp.zeros((), jnp.float32), ctx["cross_mask"])
        return m(x)

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
    for (stack, _), block in kinds:
        known = set(iter_paths(nnx.to_pure_dict(nnx.state(block, nnx.Param))))
        check_awq_groups(_awq_groups(cfg, stack), _group_paths(cfg, stack), known, where=f"T5 {stack} block")
    norm_def = nnx.split(model.encoder.final_layer_norm)[0]
    return T5Adapter(cfg, tuple((k, nnx.split(b)[0]) for k, b in kinds), norm_def)

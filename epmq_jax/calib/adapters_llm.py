"""The calibration adapter for the Llama-family decoders (:mod:`epmq_jax.models.llama`).

Params: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` of a
:class:`~epmq_jax.models.llama.LlamaForCausalLM` (paths like
``model/layers/3/self_attn/q_proj/kernel``). Inputs: ``{"input_ids": (n, S), "attention_mask":
(n, S)}`` (left padding, 0 on padding). The carry is the model's block-API dict (``hidden``
(n, S, hidden), ``attention_mask``, ``position_ids``), so the blocks run causally with the
positions transformers' ``generate`` uses.

Calibrated kernels per block, grouped by shared input in execution order:
``self_attn/{q,k,v}_proj``, ``self_attn/o_proj``, ``mlp/{gate,up}_proj``, ``mlp/down_proj``.
Every capture is ``(x, attention_mask)``: padding tokens get row weight 0, so they add nothing
to H and B. The embedding, the norms (and qwen3's q/k norms) and ``lm_head`` are not calibrated.
Blocks of a model with sliding-window layers come in two kinds (``"full_attention"``,
``"sliding_attention"``), each compiled once.

AWQ groups (:meth:`DecoderAdapter.awq_groups`): llm-awq's Llama recipe. q/k/v share a scale folded
into ``input_layernorm`` and judged on the attention output (q, k not clipped); ``o_proj``'s goes
into ``v_proj``'s output channels, skipped with grouped-query attention (``v_proj`` has fewer
outputs than ``o_proj`` inputs, as llm-awq checks); gate/up into ``post_attention_layernorm``,
judged on the MLP output; ``down_proj``'s into ``up_proj``'s output channels
(``act(x·gate) * (x·up)/s`` is exact).

E-PMQ-full (:class:`~epmq_jax.calib.adapter.FullAdapter`): the norms ``input_layernorm`` and
``post_attention_layernorm`` (RMSNorm, scale only), the residual writers ``o_proj`` and
``down_proj``, a head pseudo block (``HEAD``: ``model/norm`` and, untied, ``lm_head``). What the
task reads is the adapter's ``readout``: ``"all"`` (language modelling: every token) or
``"last"`` (the last position, e.g. a next-token answer after left padding: in a block, the rows
of ``o_proj``, ``post_attention_layernorm``, gate/up and ``down_proj`` there; q/k/v and
``input_layernorm`` reach every token). Qwen3's q/k norms and the embeddings are not calibrated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from epmq_jax._tree import iter_paths
from epmq_jax.calib.adapter import HEAD, AwqGroup, Captures, NormSpec, capture_nnx, check_awq_groups
from epmq_jax.models import hf, llama

PyTree = Any

DECODER_GROUPS = (
    ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel", "self_attn/v_proj/kernel"),
    ("self_attn/o_proj/kernel",),
    ("mlp/gate_proj/kernel", "mlp/up_proj/kernel"),
    ("mlp/down_proj/kernel",),
)

DECODER_AWQ_GROUPS = (
    AwqGroup(DECODER_GROUPS[0], "input_layernorm", "norm", "self_attn",
             no_clip=DECODER_GROUPS[0][:2]),
    AwqGroup(DECODER_GROUPS[1], "self_attn/v_proj", "linear"),
    AwqGroup(DECODER_GROUPS[2], "post_attention_layernorm", "norm", "mlp"),
    AwqGroup(DECODER_GROUPS[3], "mlp/up_proj", "linear"),
)

DECODER_NORMS = (NormSpec("input_layernorm", 0), NormSpec("post_attention_layernorm", 2))
#: Layers whose rows are read at the last position only (``readout="last"``): after attention.
_READ_LAST = ("post_attention_layernorm", "self_attn/o_proj/kernel", *DECODER_GROUPS[2], *DECODER_GROUPS[3])


@dataclasses.dataclass(frozen=True)
class DecoderAdapter:
    """Adapter (see :class:`epmq_jax.calib.adapter.CalibAdapter`) for a Llama-family param tree.

    Build it with :func:`decoder_adapter`; it serves every model of the same config (the merge,
    the experts).

    Attributes:
      config: the model's :class:`~epmq_jax.models.llama.LlamaConfig`.
      embed_def: graph definition of ``model.embed_tokens`` (for ``embed``).
      block_defs: ``(layer type, graph definition)`` of each block kind.
      dtype: the model's parameter dtype (for the head pseudo block's rebuilt model).
      readout: what the task reads, for E-PMQ-full's token weights: ``"all"`` or ``"last"``.
    """

    config: llama.LlamaConfig
    embed_def: Any
    block_defs: tuple[tuple[str, Any], ...]
    dtype: str = "float32"
    readout_tokens: Literal["all", "last"] = "all"

    def embed(self, params: PyTree, inputs: PyTree) -> PyTree:
        """``{"input_ids", "attention_mask"}`` -> the model's :meth:`embed` carry."""
        if "input_ids" not in inputs:
            raise ValueError(f"decoder calibration inputs need 'input_ids' (and 'attention_mask'); "
                             f"got keys {sorted(inputs)}")
        table = nnx.merge(self.embed_def, params["model"]["embed_tokens"])
        return llama.embed_inputs(table, inputs["input_ids"], inputs.get("attention_mask"))

    def block_paths(self, params: PyTree) -> list[tuple]:
        have = len(params["model"]["layers"])
        if have != self.config.num_hidden_layers:
            raise ValueError(f"decoder params hold {have} blocks at model/layers, the adapter's "
                             f"config expects {self.config.num_hidden_layers}")
        return [("model", "layers", i) for i in range(have)]

    def block_kind(self, index: int) -> str:
        return self.config.layer_types[index]

    def linear_groups(self, kind: Hashable) -> tuple[tuple[str, ...], ...]:
        if kind == HEAD:
            return () if self.config.tie_word_embeddings else (("lm_head/kernel",),)
        return DECODER_GROUPS

    def run_block(self, kind: Hashable, block_params: PyTree, carry: PyTree
                  ) -> tuple[PyTree, Captures]:
        return self._run(kind, block_params, carry, ())

    def _run(self, kind: Hashable, block_params: PyTree, carry: PyTree, norms: tuple[str, ...]
             ) -> tuple[PyTree, Captures]:
        out, caps = capture_nnx(dict(self.block_defs)[kind], block_params,
                                lambda block, c: block(c), carry, norms=norms)
        weight = carry["attention_mask"].astype(jnp.float32)
        return out, {path: (x, weight) for path, x in caps.items()}

    # E-PMQ-full's extension (FullAdapter)
    def full_norms(self, kind: Hashable) -> tuple[NormSpec, ...]:
        return (NormSpec("model/norm", 0),) if kind == HEAD else DECODER_NORMS

    def run_block_full(self, kind: Hashable, block_params: PyTree, carry: PyTree
                       ) -> tuple[PyTree, Captures]:
        if kind == HEAD:   # the final norm and the LM head
            _, caps = capture_nnx(_model_def(self.config, self.dtype), block_params,
                                  lambda m, h: m.head(h), carry["hidden"], norms=("model/norm",))
            weight = carry["attention_mask"].astype(jnp.float32)
            return None, {path: (x, weight) for path, x in caps.items()}
        return self._run(kind, block_params, carry, tuple(n.path for n in DECODER_NORMS))

    def readout(self, kind: Hashable, path: str, carry: PyTree) -> jax.Array | None:
        if self.readout_tokens == "all" or kind == HEAD or path not in _READ_LAST:
            return None
        mask = carry["attention_mask"]
        return jnp.broadcast_to(jnp.arange(mask.shape[1]) == mask.shape[1] - 1, mask.shape).astype(jnp.float32)

    def residuals(self, kind: Hashable) -> dict[str, str]:
        if kind == HEAD:
            return {}
        return {"self_attn/o_proj/kernel": "input_layernorm", "mlp/down_proj/kernel": "post_attention_layernorm"}

    def leaf_kinds(self) -> tuple[Hashable | None, Hashable | None]:
        return None, HEAD

    def awq_groups(self, kind: Hashable) -> tuple[AwqGroup, ...]:
        return DECODER_AWQ_GROUPS

    def awq_module(self, kind: Hashable, module: str, block_params: PyTree, x: jax.Array,
                   carry: PyTree) -> jax.Array:
        block = nnx.merge(dict(self.block_defs)[kind], block_params)
        if module == "mlp":
            return block.mlp(x)
        mask = llama.causal_mask(carry["attention_mask"], 0, x.shape[1], block.sliding_window)
        cos, sin = llama.rotary(self.config, carry["position_ids"], x.dtype)
        return block.self_attn(x, cos, sin, mask)[0]


@functools.lru_cache(maxsize=8)
def _model_def(config: llama.LlamaConfig, dtype: str) -> Any:
    """Graph definition of the whole model, built abstractly from the (hashable) config."""
    return nnx.split(hf.abstract(lambda: llama.LlamaForCausalLM(config, dtype=dtype, rngs=hf.ABSTRACT_RNGS)))[0]


def decoder_adapter(model: llama.LlamaForCausalLM, *, readout: Literal["all", "last"] = "all") -> DecoderAdapter:
    """The adapter for ``model`` and every model of the same config (merged, experts).

    ``readout``: the tokens the task reads, for E-PMQ-full's token weights (``"all"`` or
    ``"last"``, see the module docstring).

    Raises:
      ValueError: ``model`` is not a :class:`~epmq_jax.models.llama.LlamaForCausalLM`.
    """
    if not isinstance(model, llama.LlamaForCausalLM):
        raise ValueError(f"decoder_adapter: expected a LlamaForCausalLM, got {type(model).__name__}")
    if readout not in ("all", "last"):
        raise ValueError(f"decoder_adapter: readout must be 'all' or 'last', got {readout!r}")
    cfg = model.config
    first = {}
    for i, kind in enumerate(cfg.layer_types):
        first.setdefault(kind, model.model.layers[i])
    for kind, block in first.items():
        known = set(iter_paths(nnx.to_pure_dict(nnx.state(block, nnx.Param))))
        check_awq_groups(DECODER_AWQ_GROUPS, DECODER_GROUPS, known, where=f"decoder block ({kind})")
    return DecoderAdapter(cfg, nnx.split(model.model.embed_tokens)[0],
                          tuple((kind, nnx.split(block)[0]) for kind, block in first.items()),
                          jnp.dtype(model.dtype).name, readout)

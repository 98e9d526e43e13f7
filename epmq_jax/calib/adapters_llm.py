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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from epmq_jax.calib.adapter import Captures, capture_nnx
from epmq_jax.models import llama

PyTree = Any

DECODER_GROUPS = (
    ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel", "self_attn/v_proj/kernel"),
    ("self_attn/o_proj/kernel",),
    ("mlp/gate_proj/kernel", "mlp/up_proj/kernel"),
    ("mlp/down_proj/kernel",),
)


@dataclasses.dataclass(frozen=True)
class DecoderAdapter:
    """Adapter (see :class:`epmq_jax.calib.adapter.CalibAdapter`) for a Llama-family param tree.

    Build it with :func:`decoder_adapter`; it serves every model of the same config (the merge,
    the experts).

    Attributes:
      config: the model's :class:`~epmq_jax.models.llama.LlamaConfig`.
      embed_def: graph definition of ``model.embed_tokens`` (for ``embed``).
      block_defs: ``(layer type, graph definition)`` of each block kind.
    """

    config: llama.LlamaConfig
    embed_def: Any
    block_defs: tuple[tuple[str, Any], ...]

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
        return DECODER_GROUPS

    def run_block(self, kind: Hashable, block_params: PyTree, carry: PyTree
                  ) -> tuple[PyTree, Captures]:
        out, caps = capture_nnx(dict(self.block_defs)[kind], block_params,
                                lambda block, c: block(c), carry)
        weight = carry["attention_mask"].astype(jnp.float32)
        return out, {path: (x, weight) for path, x in caps.items()}


def decoder_adapter(model: llama.LlamaForCausalLM) -> DecoderAdapter:
    """The adapter for ``model`` and every model of the same config (merged, experts).

    Raises:
      ValueError: ``model`` is not a :class:`~epmq_jax.models.llama.LlamaForCausalLM`.
    """
    if not isinstance(model, llama.LlamaForCausalLM):
        raise ValueError(f"decoder_adapter: expected a LlamaForCausalLM, got {type(model).__name__}")
    cfg = model.config
    first = {}
    for i, kind in enumerate(cfg.layer_types):
        first.setdefault(kind, model.model.layers[i])
    return DecoderAdapter(cfg, nnx.split(model.model.embed_tokens)[0],
                          tuple((kind, nnx.split(block)[0]) for kind, block in first.items()))

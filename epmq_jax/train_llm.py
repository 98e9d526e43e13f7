"""Training for the offline LLM benchmark: a weak foundation model, then one expert per skill.

1. ``pretrain``: the project's Llama (:class:`~epmq_jax.models.llama.LlamaForCausalLM`) at a
   small size, from random weights, trained briefly on a mixture of every skill's training
   examples (next-token loss on the whole text): a weak "foundation" model.
2. ``finetune``: per skill, the whole model fine-tuned from the foundation on that skill's
   examples (loss on the answer and its end-of-sequence token): the expert.

Examples are ``[bos] prompt answer [eos]``, left-padded to ``suite.seq_len`` (the layout
generation uses). Parameters are pure nested dicts of arrays (merged and quantized directly).
Every stage is cached with orbax under ``cache_dir``, named by a hash of exactly what it depends
on (:func:`epmq_jax.train.config_hash`), as the image suite's training is; the optimisation
loop is the image suite's too (AdamW, warm-up + cosine, shuffled minibatches).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epmq_jax import train
from epmq_jax.data import offline_llm
from epmq_jax.models.llama import LlamaConfig, LlamaForCausalLM

Params = dict[str, Any]


def make_model(model_cfg: Any, vocab_size: int) -> LlamaForCausalLM:
    """The decoder with the config's sizes (``model`` section), float32, seeded by ``model.seed``.

    Args:
      model_cfg: ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads``, ``max_position_embeddings``,
        ``tie_word_embeddings``, ``seed``.
      vocab_size: the tokenizer's number of ids.
    """
    tok = offline_llm.CharTokenizer
    kw = {k: v for k, v in dict(model_cfg).items() if k != "seed"}
    cfg = LlamaConfig(vocab_size=vocab_size, bos_token_id=tok.BOS, eos_token_id=tok.EOS,
                      pad_token_id=tok.PAD, **kw)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(int(model_cfg.seed)))


def encode_examples(tokenizer: offline_llm.CharTokenizer, prompts: Sequence[str], answers: Sequence[str],
                    seq_len: int, *, answer_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training rows ``[bos] prompt answer [eos]``, left-padded.

    Returns:
      ``(x int32 (n, 2, seq_len) = stacked (input_ids, attention_mask), loss weights float32
      (n, seq_len))``: weight 1 on the tokens that are predicted (every token after the first,
      or only the answer and eos with ``answer_only``), 0 elsewhere.

    Raises:
      ValueError: an example longer than ``seq_len``.
    """
    from epmq_jax.eval.llm import pad_left

    rows, starts = [], []
    for p, a in zip(prompts, answers):
        ctx, cont = tokenizer.split_ids(str(p), str(a))
        rows.append([*ctx, *cont, tokenizer.eos_id])
        starts.append(len(ctx))
        if len(rows[-1]) > seq_len:
            raise ValueError(f"example {p!r} -> {a!r} has {len(rows[-1])} tokens; suite.seq_len={seq_len}")
    ids, mask = pad_left(rows, seq_len, tokenizer.pad_id)
    weights = np.zeros((len(rows), seq_len), np.float32)
    for i, (row, start) in enumerate(zip(rows, starts)):
        first = seq_len - len(row) + (start if answer_only else 1)
        weights[i, first:] = 1.0
    return np.stack([ids, mask], axis=1), weights


def _lm_loss(graphdef, _unused, params, const, xb, wb):
    """Mean next-token cross-entropy over the weighted target tokens of a batch."""
    logits = nnx.merge(graphdef, params)(xb[:, 0], xb[:, 1])[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    ll = jnp.take_along_axis(logp, xb[:, 0, 1:, None], axis=-1)[..., 0]
    w = wb[:, 1:]
    return -(ll * w).sum() / jnp.maximum(w.sum(), 1.0)


def fit(graphdef: Any, params: Params, x: np.ndarray, weights: np.ndarray, cfg: Any, *,
        batch_size: int, seed: int, desc: str) -> Params:
    """Minimises the weighted next-token loss with AdamW (``cfg``: ``lr``, ``steps`` or ``epochs``,
    ``warmup_steps``, ``weight_decay``, ``clip_norm``); ``x``/``weights`` from :func:`encode_examples`."""
    return train._fit(_lm_loss, graphdef, 0.0, params, None, x, weights, cfg, batch_size=batch_size,
                      seed=seed, desc=desc)


@dataclasses.dataclass
class TrainedLLMs:
    """The foundation model and the experts.

    Attributes:
      graphdef: the decoder's ``nnx.GraphDef``.
      pretrained: the foundation model's params.
      experts: ``{skill: params}`` in suite order.
      timings: seconds per stage (0 for cache hits) and ``cache_hits``.
    """

    graphdef: Any
    pretrained: Params
    experts: dict[str, Params]
    timings: dict[str, Any]


def train_all(cfg: Any, cache_dir: str, suite: Mapping[str, offline_llm.SkillData]) -> TrainedLLMs:
    """Pretrains the foundation model on the mixture and fine-tunes one expert per skill (cached).

    Args:
      cfg: the config with sections ``suite`` (``tasks``, ``seq_len``, sizes, ``seed``),
        ``model`` and ``train`` (``batch_size``, ``pretrain``, ``finetune``).
      cache_dir: where the stage checkpoints live.
      suite: the built skills (:func:`epmq_jax.data.offline_llm.build_suite`).
    """
    tok = offline_llm.CharTokenizer()
    tcfg, scfg = cfg.train, cfg.suite
    graphdef, state = nnx.split(make_model(cfg.model, tok.vocab_size), nnx.Param)
    init = nnx.to_pure_dict(state)
    os.makedirs(cache_dir, exist_ok=True)
    timings: dict[str, Any] = {"cache_hits": 0, "pretrain": 0.0, "finetune": 0.0}
    data_keys = [offline_llm.data_key(t, scfg) for t in scfg.tasks]

    def stage(name, path, compute):
        t0 = time.perf_counter()
        tree, hit = train._cached(path, init, compute)
        timings["cache_hits"] += int(hit)
        if not hit:
            timings[name] += time.perf_counter() - t0
        return tree

    pre_key = train.config_hash("llm-pretrain", cfg.model, tcfg.pretrain, tcfg.batch_size, scfg.seq_len,
                                data_keys)

    def do_pretrain():
        prompts = np.concatenate([suite[t].examples("train")[0] for t in scfg.tasks])
        answers = np.concatenate([suite[t].examples("train")[1] for t in scfg.tasks])
        x, w = encode_examples(tok, prompts, answers, int(scfg.seq_len), answer_only=False)
        return fit(graphdef, init, x, w, tcfg.pretrain, batch_size=int(tcfg.batch_size),
                   seed=int(scfg.seed), desc="pretrain")

    pretrained = stage("pretrain", os.path.join(cache_dir, f"llm-pretrained-{pre_key}"), do_pretrain)
    experts = {}
    for i, (task, dkey) in enumerate(zip(scfg.tasks, data_keys)):
        key = train.config_hash("llm-finetune", pre_key, dkey, tcfg.finetune, tcfg.batch_size)

        def do_finetune(task=task, i=i):
            x, w = encode_examples(tok, *suite[task].examples("train"), int(scfg.seq_len), answer_only=True)
            return fit(graphdef, pretrained, x, w, tcfg.finetune, batch_size=int(tcfg.batch_size),
                       seed=int(scfg.seed) + 1 + i, desc=f"finetune {task}")

        experts[task] = stage("finetune", os.path.join(cache_dir, f"llm-expert-{task}-{key}"), do_finetune)
    return TrainedLLMs(graphdef, pretrained, experts, timings)

"""The evaluators of LLM benchmarks: exact match after greedy generation, log-likelihood of choices.

Both take a decoder as ``(graphdef, params)`` (a :class:`~epmq_jax.models.llama.LlamaForCausalLM`
split with ``nnx.split(model, nnx.Param)``; params a pure dict of float arrays) and token ids
already made by a tokenizer (:mod:`epmq_jax.pipeline.llm_pools` holds the tokenizer side):

- :func:`greedy_continuations`: prompts are left-padded and decoded greedily with the model's KV
  cache (``model.generate``); each row's new tokens up to its first end-of-sequence token.
  :func:`exact_match` compares the decoded texts with the references, after the normalisation
  lm-evaluation-harness applies (regexes to ignore, then the last match of an extraction regex).
- :func:`continuation_logprobs`: ``sum_i log p(continuation_i | context, continuation_<i)`` of
  each (context, continuation) pair in one forward pass, as lm-evaluation-harness's
  ``loglikelihood`` requests; :func:`choice_accuracy` turns them into ``acc`` (argmax of the sum)
  and ``acc_norm`` (argmax of the sum divided by the choice's length in characters).

Batches have a fixed number of rows (the last one filled with copies of its first row) and
sequence lengths rounded up to a multiple of ``length_multiple``, so a whole benchmark compiles
once or a few times per shape.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Params = dict[str, Any]


def pad_left(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token sequences to ``length`` (longer ones lose their first tokens).

    Returns:
      ``(input_ids int32 (n, length), attention_mask int32 (n, length))``, mask 0 on padding.

    Raises:
      ValueError: an empty sequence or ``length < 1``.
    """
    if length < 1:
        raise ValueError(f"pad_left: length={length}; expected >= 1")
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"pad_left: sequence {i} is empty")
        s = list(s)[-length:]
        ids[i, length - len(s):] = s
        mask[i, length - len(s):] = 1
    return ids, mask


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _batches(n: int, batch_size: int, sharding: Any = None) -> list[np.ndarray]:
    """Row indices of each batch, the last one filled up with its first row.

    As few batches as ``batch_size`` allows, all of one size: ``n`` split evenly over them,
    rounded up to a multiple of 8 (and of the devices of ``sharding``) unless that exceeds
    ``batch_size``, so little is padding (900 rows in batches of at most 800: two of 456, not
    two of 800).
    """
    multiple = 8 if sharding is None else math.lcm(8, len(sharding.device_set))
    count = -(-n // batch_size)
    batch_size = min(batch_size, _round_up(-(-n // count), multiple))
    out = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        out.append(np.concatenate([idx, np.full(batch_size - len(idx), idx[0])]))
    return out


def _replicated(params: Params, sharding: Any) -> Params:
    """``params`` on every device of ``sharding``'s mesh (as they are without a sharding), so a
    batch split over the mesh finds them there."""
    if sharding is None:
        return params
    return jax.device_put(params, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def greedy_continuations(graphdef: Any, params: Params, prompts: Sequence[Sequence[int]], *,
                         max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                         batch_size: int = 64, length_multiple: int = 8,
                         max_length: int | None = None, sharding: Any = None) -> list[list[int]]:
    """Greedy continuations of prompts (KV-cache generation).

    Args:
      graphdef, params: the decoder (``nnx.merge(graphdef, params).generate`` is used).
      prompts: token ids of each prompt (special tokens included, e.g. bos).
      max_new_tokens: tokens generated per prompt.
      eos_ids: a continuation ends before the first of these.
      pad_id: the id prompts are left-padded with.
      batch_size: rows per ``generate`` call (a multiple of the devices of ``sharding``).
      length_multiple: prompt lengths are padded to a multiple of it (fewer compiles).
      max_length: longer prompts keep their last ``max_length`` tokens.
      sharding: optional ``NamedSharding`` splitting each batch's rows over devices (the
        params are replicated over its mesh).

    Returns:
      Per prompt, its new tokens before the first eos (the eos itself excluded).

    Raises:
      ValueError: no prompts, an empty prompt, or ``max_new_tokens < 1``.
    """
    if not prompts:
        raise ValueError("greedy_continuations: no prompts")
    if max_new_tokens < 1:
        raise ValueError(f"greedy_continuations: max_new_tokens={max_new_tokens}; expected >= 1")
    longest = max(len(p) for p in prompts)
    length = _round_up(longest if max_length is None else min(longest, max_length), length_multiple)
    ids, mask = pad_left(prompts, length, pad_id)
    model = nnx.merge(graphdef, _replicated(params, sharding))
    stop = set(int(e) for e in eos_ids)
    out: list[list[int] | None] = [None] * len(prompts)
    for rows in _batches(len(prompts), batch_size, sharding):
        x, m = ids[rows], mask[rows]
        if sharding is not None:
            x, m = jax.device_put(x, sharding), jax.device_put(m, sharding)
        new = np.asarray(model.generate(x, m, max_new_tokens=max_new_tokens))[:, length:]
        for r, toks in zip(rows, new):
            if out[r] is None:
                cut = next((i for i, t in enumerate(toks) if int(t) in stop), len(toks))
                out[r] = [int(t) for t in toks[:cut]]
    return out  # type: ignore[return-value]


def normalize_answer(text: str, *, ignore: Sequence[str] = (), extract: str | None = None) -> str:
    """lm-evaluation-harness' normalisation for exact match.

    Removes every match of each ``ignore`` regex, then keeps the last match of ``extract`` (its
    first group when it has groups; ``""`` when nothing matches), then strips whitespace.
    """
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    if extract:
        found = re.findall(extract, text)
        if not found:
            return ""
        last = found[-1]
        text = next((g for g in last if g), "") if isinstance(last, tuple) else last
    return text.strip()


def exact_match(predictions: Sequence[str], references: Sequence[str], *, ignore: Sequence[str] = (),
                extract: str | None = None) -> np.ndarray:
    """Per example, whether the normalised prediction equals the normalised reference.

    Returns:
      bool ``(n,)``.

    Raises:
      ValueError: different numbers of predictions and references.
    """
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} references")
    norm = functools.partial(normalize_answer, ignore=ignore, extract=extract)
    return np.array([norm(p) == norm(r) for p, r in zip(predictions, references)], bool)


@functools.lru_cache(maxsize=8)
def _next_token_logprobs_fn(graphdef: Any) -> Callable:
    def fn(params, ids, mask):
        logits = nnx.merge(graphdef, params)(ids, mask)[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jax.jit(fn)


def continuation_logprobs(graphdef: Any, params: Params,
                          pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
                          batch_size: int = 32, length_multiple: int = 16,
                          max_length: int | None = None, sharding: Any = None) -> np.ndarray:
    """Log-likelihood of each continuation given its context.

    Each pair runs as one left-padded row ``context + continuation``; the sum is over the
    continuation's tokens of ``log softmax(logits at the previous position)[token]``. A row
    longer than ``max_length`` loses tokens from the start of its context.

    Args:
      graphdef, params: the decoder (``model(ids, mask) -> logits``).
      pairs: ``(context ids, continuation ids)``; the context holds the special tokens.
      pad_id: the padding id.
      batch_size, length_multiple, sharding: as :func:`greedy_continuations`.
      max_length: the longest row the model is given.

    Returns:
      float64 ``(n,)``.

    Raises:
      ValueError: no pairs, an empty context or continuation, or a continuation that does not
        fit in ``max_length`` with one context token.
    """
    if not pairs:
        raise ValueError("continuation_logprobs: no (context, continuation) pairs")
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"continuation_logprobs: pair {i} has an empty "
                             f"{'context' if not ctx else 'continuation'}")
        if max_length is not None and len(cont) >= max_length:
            raise ValueError(f"continuation_logprobs: pair {i}'s continuation has {len(cont)} tokens; "
                             f"max_length={max_length} leaves no room for its context")
    rows = [[*ctx, *cont] for ctx, cont in pairs]
    longest = max(len(r) for r in rows)
    length = _round_up(longest if max_length is None else min(longest, max_length), length_multiple)
    ids, mask = pad_left(rows, length, pad_id)
    fn = _next_token_logprobs_fn(graphdef)
    params = _replicated(params, sharding)
    out = np.zeros(len(pairs), np.float64)
    for batch in _batches(len(pairs), batch_size, sharding):
        x, m = ids[batch], mask[batch]
        if sharding is not None:
            x, m = jax.device_put(x, sharding), jax.device_put(m, sharding)
        logp = np.asarray(fn(params, x, m), np.float64)   # (B, length - 1): token j+1 given ..j
        for r, lp in zip(batch, logp):
            n = len(pairs[r][1])
            out[r] = lp[length - 1 - n:].sum()
    return out


def choice_accuracy(logprobs: Sequence[Sequence[float]], labels: Sequence[int],
                    choice_lengths: Sequence[Sequence[int]]) -> dict[str, float]:
    """``acc`` and ``acc_norm`` (fractions) of multiple-choice predictions.

    Args:
      logprobs: per example, the log-likelihood of each choice.
      labels: per example, the index of the correct choice.
      choice_lengths: per example, each choice's length in characters (``acc_norm`` divides
        the log-likelihood by it, as lm-evaluation-harness does).

    Raises:
      ValueError: counts that disagree or a label outside an example's choices.
    """
    if not len(logprobs) == len(labels) == len(choice_lengths):
        raise ValueError(f"choice_accuracy: {len(logprobs)} examples, {len(labels)} labels, "
                         f"{len(choice_lengths)} choice lengths")
    hits, hits_norm = [], []
    for i, (lp, y, lens) in enumerate(zip(logprobs, labels, choice_lengths)):
        lp = np.asarray(lp, np.float64)
        if not 0 <= int(y) < len(lp) or len(lens) != len(lp):
            raise ValueError(f"choice_accuracy: example {i} has {len(lp)} choices, label {y}, "
                             f"{len(lens)} lengths")
        hits.append(int(np.argmax(lp)) == int(y))
        hits_norm.append(int(np.argmax(lp / np.maximum(np.asarray(lens, np.float64), 1.0))) == int(y))
    return {"acc": float(np.mean(hits)), "acc_norm": float(np.mean(hits_norm))}

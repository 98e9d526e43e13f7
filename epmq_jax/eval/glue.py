"""GLUE metrics for text-to-text models: accuracy, Matthews correlation, Pearson and Spearman.

Metrics are plain NumPy functions of predictions and gold labels. :func:`glue_metrics` takes a
task's generated texts, parses them (:func:`epmq_jax.data.glue.parse_prediction`) and returns
every metric that applies; :func:`task_score` picks the one number per task that goes into a
table, under one of two conventions:

- ``"fusion_bench"`` (default; how FusionBench scores its FLAN-T5 GLUE experts, and so the
  convention of the paper's 8-task averages): exact-match accuracy for the 7 classification
  tasks, CoLA included, and Spearman's rho for STS-B;
- ``"glue"`` (the GLUE leaderboard's): Matthews correlation for CoLA, the mean of Pearson and
  Spearman for STS-B, accuracy elsewhere.

Answers are matched after light normalisation (case, surrounding quotes, a final period; see
:func:`epmq_jax.data.glue.parse_prediction`), where FusionBench compares exact strings; the two
agree on the label words a fine-tuned expert emits. Scores are fractions in [-1, 1] (accuracy in
[0, 1]); tables multiply by 100.
Correlations are defined as 0 when either side is constant (no ranking information), as
scikit-learn does for the Matthews coefficient, rather than NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from epmq_jax.data.glue import GlueTask, get_task, parse_prediction

STYLES = ("fusion_bench", "glue")


def _pair(pred: Any, gold: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.ndim != 1 or pred.shape != gold.shape:
        raise ValueError(f"{what}: predictions {pred.shape} and labels {gold.shape} must be "
                         "1-D of equal length")
    if pred.size == 0:
        raise ValueError(f"{what}: no examples")
    return pred, gold


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of positions where ``pred == gold``; both (n,)."""
    pred, gold = _pair(pred, gold, "accuracy")
    return float(np.mean(pred == gold))


def matthews_corrcoef(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation (Gorodkin's multi-class R_K; the usual phi for two classes).

    Every value seen in either array is a class (an unparsed prediction, -1, is a class of its
    own, as in scikit-learn). Returns 0 when the denominator vanishes.
    """
    pred, gold = _pair(pred, gold, "matthews_corrcoef")
    classes, idx = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    k, n = len(classes), len(gold)
    conf = np.zeros((k, k), np.float64)
    np.add.at(conf, (idx[:n], idx[n:]), 1.0)
    t, p = conf.sum(1), conf.sum(0)  # true and predicted counts per class
    c, s = np.trace(conf), float(n)
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denom == 0 else float((c * s - t @ p) / denom)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r of two (n,) samples; 0 if either is constant."""
    x, y = _pair(x, y, "pearson")
    x = x.astype(np.float64) - np.mean(x, dtype=np.float64)
    y = y.astype(np.float64) - np.mean(y, dtype=np.float64)
    denom = np.sqrt((x @ x) * (y @ y))
    return 0.0 if denom == 0 else float(np.clip((x @ y) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the tie-averaged ranks; 0 if either side is constant."""
    x, y = _pair(x, y, "spearman")
    return pearson(_average_ranks(x), _average_ranks(y))


def glue_metrics(task: GlueTask | str, texts: Sequence[str], labels: Sequence[int | float]
                 ) -> dict[str, float]:
    """All metrics for one task from generated texts.

    Args:
      task: the GLUE task or its name.
      texts: (n,) generated answers, special tokens removed.
      labels: (n,) gold class ids, or STS-B scores.

    Returns:
      ``accuracy`` (classification; ``matthews`` too for CoLA) or ``pearson`` and ``spearman``
      (STS-B, an unparseable answer counting as 0.0, as FusionBench's parser does), plus
      ``n`` and ``unparsed`` (answers that are no label word / contain no number).
    """
    task = get_task(task) if isinstance(task, str) else task
    parsed = [parse_prediction(task, t) for t in texts]
    if task.is_regression:
        unparsed = sum(p is None for p in parsed)
        pred = np.array([0.0 if p is None else p for p in parsed])
        gold = np.asarray(labels, np.float64)
        out = {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold)}
    else:
        pred = np.array(parsed, np.int64)
        gold = np.asarray(labels, np.int64)
        unparsed = int(np.sum(pred < 0))
        out = {"accuracy": accuracy(pred, gold)}
        if task.name == "cola":
            out["matthews"] = matthews_corrcoef(pred, gold)
    return {**out, "n": float(len(texts)), "unparsed": float(unparsed)}


def task_score(task: GlueTask | str, metrics: dict[str, float], style: str = "fusion_bench"
               ) -> float:
    """The single per-task number of a results table (see the module docstring for styles)."""
    task = get_task(task) if isinstance(task, str) else task
    if style not in STYLES:
        raise ValueError(f"task_score: style={style!r}, expected one of {STYLES}")
    if task.is_regression:
        if style == "fusion_bench":
            return metrics["spearman"]
        return 0.5 * (metrics["pearson"] + metrics["spearman"])
    if task.name == "cola" and style == "glue":
        return metrics["matthews"]
    return metrics["accuracy"]


def generate_answers(generate: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     decode: Callable[[Sequence[int]], str], input_ids: np.ndarray,
                     attention_mask: np.ndarray, *, batch_size: int = 32,
                     eos_id: int = 1, pad_id: int = 0) -> list[str]:
    """Runs a seq2seq ``generate`` over a tokenized split in batches and decodes the answers.

    Args:
      generate: ``(ids (b, S), mask (b, S)) -> tokens (b, L)``, e.g.
        ``functools.partial(model.generate, max_new_tokens=8)``; a leading decoder-start token
        and anything from the first ``eos_id`` on are dropped.
      decode: token ids -> text (e.g. a Hugging Face tokenizer's ``decode``).
      input_ids, attention_mask: int (n, S).
      batch_size: rows per call; the last batch is padded to this size so the compiled
        ``generate`` is reused.

    Returns:
      n decoded answers.
    """
    n = len(input_ids)
    answers: list[str] = []
    for start in range(0, n, batch_size):
        ids = input_ids[start:start + batch_size]
        mask = attention_mask[start:start + batch_size]
        short = batch_size - len(ids)
        if short:
            ids = np.concatenate([ids, np.full((short, ids.shape[1]), pad_id, ids.dtype)])
            mask = np.concatenate([mask, np.zeros((short, mask.shape[1]), mask.dtype)])
        tokens = np.asarray(generate(ids, mask))[: batch_size - short, 1:]
        for row in tokens:
            stop = np.flatnonzero(row == eos_id)
            row = row[: stop[0]] if len(stop) else row
            answers.append(decode([int(t) for t in row if t != pad_id]))
    return answers


def evaluate_glue(generate: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  tokenize: Callable[[str], Sequence[int]], decode: Callable[[Sequence[int]], str],
                  tasks: Sequence[str], data_dir: str, *, max_length: int = 256,
                  batch_size: int = 32, limit: int | None = None, style: str = "fusion_bench",
                  eos_id: int = 1, pad_id: int = 0) -> dict[str, dict[str, float]]:
    """Scores a text-to-text model on GLUE tasks' evaluation splits.

    Args:
      generate: ``(ids (b, S), mask (b, S)) -> tokens (b, 1 + new)``, e.g.
        ``functools.partial(model.generate, max_new_tokens=9)`` of a
        :class:`~epmq_jax.models.t5.T5ForConditionalGeneration`.
      tokenize: text -> ids with ``</s>`` appended. decode: ids -> text (special tokens dropped).
      tasks: GLUE task names. data_dir: tfds data directory holding ``glue/<task>``.
      max_length: encoder length (prompts are truncated to it).
      batch_size: rows per ``generate`` call.
      limit: score only the first ``limit`` examples of each split (quick checks).
      style: see :func:`task_score`.

    Returns:
      ``{task: glue_metrics(...) + {"score": task_score(...)}}``.
    """
    from epmq_jax.data import glue as glue_data

    out = {}
    for name in tasks:
        task = get_task(name)
        columns = glue_data.load_examples(task, None, data_dir,
                                          indices=None if limit is None else np.arange(limit))
        prompts = [glue_data.format_input(task, ex) for ex in glue_data.examples(columns)]
        ids, mask = glue_data.encode_texts(prompts, tokenize, max_length=max_length, pad_id=pad_id)
        answers = generate_answers(generate, decode, ids, mask, batch_size=batch_size,
                                   eos_id=eos_id, pad_id=pad_id)
        metrics = glue_metrics(task, answers, columns["label"])
        out[task.name] = {**metrics, "score": task_score(task, metrics, style)}
    return out

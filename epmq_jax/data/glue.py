"""GLUE as text-to-text for (FLAN-)T5: prompts, label words, parsing of generated answers.

The prompts and label words are FusionBench's (``tanganke/fusion_bench``,
``fusion_bench/tasks/flan_t5_text_generation/glue_prompt_templates.py``), transcribed word
for word, typos ("Answere") included: its FLAN-T5 GLUE experts
(``tanganke/flan-t5-base_glue-<task>``) were fine-tuned on exactly these strings, so a
different wording would evaluate them off-distribution.

Evaluation uses the ``validation`` split (``validation_matched`` for MNLI), as FusionBench
does, since GLUE's test labels are hidden; calibration samples come from ``train``.

A task example is a mapping with the task's text fields (``str`` or UTF-8 ``bytes``, as
tensorflow-datasets yields them) and ``label`` (int class id; float similarity in [0, 5] for
STS-B). :func:`format_example` turns it into ``(input_text, target_text)``;
:func:`parse_prediction` maps generated text back to a class id (or a float for STS-B).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Returned by :func:`parse_prediction` for text that is none of the task's label words.
UNPARSED = -1


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task in text-to-text form.

    Attributes:
      name: short name (``"cola"``, ...), also the suffix of FusionBench's expert repo ids.
      tfds_name: tensorflow-datasets name, e.g. ``"glue/cola"``.
      fields: the text features the template uses, in tfds/HF names.
      template: ``str.format`` template over ``fields``.
      label_words: target text of class ``i`` at index ``i``; None for STS-B (regression,
        the target is the score with one decimal, ``"3.8"``).
      eval_split: split used for evaluation. train_split: split calibration samples come from.
    """

    name: str
    tfds_name: str
    fields: tuple[str, ...]
    template: str
    label_words: tuple[str, ...] | None
    eval_split: str = "validation"
    train_split: str = "train"

    @property
    def is_regression(self) -> bool:
        return self.label_words is None


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "glue/cola", ("sentence",),
             "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". "
             "Answere 'acceptable' or 'unacceptable'.",
             ("unacceptable", "acceptable")),
    GlueTask("sst2", "glue/sst2", ("sentence",),
             "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
             ("negative", "positive")),
    GlueTask("mrpc", "glue/mrpc", ("sentence1", "sentence2"),
             "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same "
             "meaning? Answere with 'yes' or 'no'.",
             ("no", "yes")),
    GlueTask("qqp", "glue/qqp", ("question1", "question2"),
             "Do the questions '{question1}' and '{question2}' have the same intent? Answere "
             "with 'yes' or 'no'.",
             ("no", "yes")),
    GlueTask("mnli", "glue/mnli", ("premise", "hypothesis"),
             "Does the premise: '{premise}' logically imply, contradict, or is neutral to the "
             "hypothesis: '{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
             ("entailment", "neutral", "contradiction"), eval_split="validation_matched"),
    GlueTask("qnli", "glue/qnli", ("question", "sentence"),
             "Given the context: '{sentence}', does the question '{question}' have an answer "
             "based on the information provided? Answer with 'yes' or 'no'.",
             ("yes", "no")),
    GlueTask("rte", "glue/rte", ("sentence1", "sentence2"),
             "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
             ("yes", "no")),
    GlueTask("stsb", "glue/stsb", ("sentence1", "sentence2"),
             "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 "
             "(completely different) to 5 (completely similar), rate the similarity.",
             None),
)}

#: The 8 tasks in FusionBench's order.
GLUE_TASK_NAMES: tuple[str, ...] = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")


def get_task(name: str) -> GlueTask:
    """The :class:`GlueTask` called ``name`` (``"cola"`` or ``"glue/cola"``)."""
    key = name.removeprefix("glue/")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; expected one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item())
    if not isinstance(value, str):
        raise ValueError(f"expected a str or UTF-8 bytes text field, got {type(value).__name__}")
    return value


def format_input(task: GlueTask | str, example: Mapping[str, Any]) -> str:
    """The prompt for ``example`` (a mapping holding the task's ``fields``)."""
    task = get_task(task) if isinstance(task, str) else task
    missing = [f for f in task.fields if f not in example]
    if missing:
        raise ValueError(f"GLUE {task.name} example lacks fields {missing}; it has {sorted(example)}")
    return task.template.format(**{f: _text(example[f]) for f in task.fields})


def format_target(task: GlueTask | str, label: int | float) -> str:
    """The target text: the label word of class ``label``, or the STS-B score as ``"{:.1f}"``."""
    task = get_task(task) if isinstance(task, str) else task
    if task.is_regression:
        return f"{float(label):.1f}"
    label = int(label)
    if not 0 <= label < len(task.label_words):
        raise ValueError(f"GLUE {task.name}: label {label} outside [0, {len(task.label_words)}); "
                         "test splits carry label -1 and cannot be scored")
    return task.label_words[label]


def format_example(task: GlueTask | str, example: Mapping[str, Any]) -> tuple[str, str]:
    """``(input_text, target_text)`` for one example with a ``label``."""
    return format_input(task, example), format_target(task, np.asarray(example["label"]).item())


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


def parse_prediction(task: GlueTask | str, text: str) -> int | float | None:
    """Maps generated text to a prediction.

    Classification: the index of the label word that the text equals after stripping
    whitespace, surrounding quotes and a final period, case-insensitively (``"Yes."`` -> "yes");
    anything else is :data:`UNPARSED` (-1), which never equals a gold label. An exact match is
    required because label words can contain one another ("unacceptable" / "acceptable").
    STS-B: the first number in the text as a float, or None if there is none.
    """
    task = get_task(task) if isinstance(task, str) else task
    if task.is_regression:
        m = _NUMBER.search(text)
        return float(m.group()) if m else None
    word = text.strip().strip("'\"").rstrip(".").strip().lower()
    return task.label_words.index(word) if word in task.label_words else UNPARSED


def encode_texts(texts: Sequence[str], tokenize: Callable[[str], Sequence[int]], *,
                 max_length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes and right-pads a batch of texts.

    Args:
      texts: B strings.
      tokenize: text -> token ids, including any end-of-sequence id (a Hugging Face
        tokenizer's ``lambda s: tok(s).input_ids`` appends T5's ``</s>``).
      max_length: ids beyond it are cut off (FusionBench truncates too).
      pad_id: padding id (T5: 0).

    Returns:
      ``(input_ids, attention_mask)``, both int32 ``(B, max_length)``.
    """
    if max_length < 1:
        raise ValueError(f"encode_texts: max_length={max_length}, expected >= 1")
    ids = np.full((len(texts), max_length), pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for i, text in enumerate(texts):
        toks = list(tokenize(text))[:max_length]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
    return ids, mask


def seq2seq_batch(inputs: Sequence[str], targets: Sequence[str],
                  tokenize: Callable[[str], Sequence[int]], *, max_length: int,
                  max_target_length: int, decoder_start_id: int = 0, pad_id: int = 0
                  ) -> dict[str, np.ndarray]:
    """Teacher-forced encoder-decoder inputs, as the model saw them in fine-tuning.

    The decoder input is the target's tokens shifted right behind the start token
    (``[start] + labels[:-1]``, ``labels`` ending in ``</s>``), so each position's hidden state
    is the one that predicts the next answer token.

    Args:
      inputs, targets: B prompts and B answers (:func:`format_example`).
      tokenize: text -> ids, appending the end-of-sequence id (see :func:`encode_texts`).
      max_length: encoder length S. max_target_length: decoder length L.
      decoder_start_id, pad_id: T5 uses 0 for both.

    Returns:
      ``{"input_ids", "attention_mask"}`` int32 (B, S) and ``{"decoder_input_ids",
      "decoder_attention_mask"}`` int32 (B, L).
    """
    if len(inputs) != len(targets):
        raise ValueError(f"seq2seq_batch: {len(inputs)} inputs but {len(targets)} targets")
    ids, mask = encode_texts(inputs, tokenize, max_length=max_length, pad_id=pad_id)
    shifted = [[decoder_start_id, *list(tokenize(t))[:-1]] for t in targets]
    dec, dec_mask = encode_texts(shifted, lambda x: x, max_length=max_target_length, pad_id=pad_id)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": dec_mask}


def load_examples(task: GlueTask | str, split: str | None, data_dir: str | os.PathLike, *,
                  indices: Sequence[int] | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Reads a GLUE split prepared for tensorflow-datasets (array_record; no TF, no network).

    Args:
      task: task or name. split: tfds split (slicing allowed); None = ``task.eval_split``.
      data_dir: the tfds data directory holding ``glue/<task>/<version>``.
      indices: positions to read; default: the whole split.

    Returns:
      ``{field: str array (n,), "label": (n,)}`` for the task's text fields.

    Raises:
      epmq_jax.data.tfds_local.DatasetNotFoundError: not prepared under ``data_dir``.
    """
    from epmq_jax.data import tfds_local  # imports tensorflow_datasets

    task = get_task(task) if isinstance(task, str) else task
    split = task.eval_split if split is None else split
    return tfds_local.load_split(task.tfds_name, split, data_dir, indices=indices,
                                 keys=[*task.fields, "label"])


def examples(columns: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Columns ``{field: (n,)}`` -> n example dicts (for :func:`format_example`)."""
    n = len(columns["label"])
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def calibration_inputs(task: GlueTask | str, data_dir: str | os.PathLike, n: int,
                       tokenize: Callable[[str], Sequence[int]], *, seed: int = 0,
                       max_length: int = 256, max_target_length: int = 8
                       ) -> dict[str, np.ndarray]:
    """``n`` seeded train examples of ``task`` as teacher-forced model inputs (:func:`seq2seq_batch`).

    The sample is :func:`epmq_jax.data.calibration.calibration_indices` of the train split, so it
    depends only on (seed, task, split size, n).
    """
    from epmq_jax.data import tfds_local
    from epmq_jax.data.calibration import calibration_indices

    task = get_task(task) if isinstance(task, str) else task
    size = len(tfds_local.open_split(task.tfds_name, task.train_split, data_dir))
    idx = calibration_indices(size, n, seed=seed, task=f"glue/{task.name}")
    pairs = [format_example(task, ex) for ex in
             examples(load_examples(task, task.train_split, data_dir, indices=idx))]
    return seq2seq_batch([p for p, _ in pairs], [t for _, t in pairs], tokenize,
                         max_length=max_length, max_target_length=max_target_length)


def prepare_from_hf(task: GlueTask | str, data_dir: str | os.PathLike, *,
                    source: str | os.PathLike | None = None, revision: str | None = None,
                    streaming: bool = True, batch_size: int = 1024,
                    overwrite: bool = False) -> Path:
    """Streams a GLUE task from Hugging Face (``nyu-mll/glue``) into a local tfds dataset
    ``data_dir/glue/<task>``, the layout :func:`load_examples` reads (no TensorFlow).

    Keeps the task's text fields and ``label`` of the ``train`` split and of its evaluation
    split (GLUE's test labels are hidden, so ``test`` is not kept). Rows are read and written
    ``batch_size`` at a time with a progress bar; no split is held in memory.

    Args:
      task: task or name.
      data_dir: the data directory (the dataset goes to ``data_dir/glue/<task>/1.0.0``).
      source: another hub id or a local copy in the hub's layout (config ``task.name``), or a
        ``save_to_disk`` folder; default ``nyu-mll/glue``.
      revision: hub revision to pin. streaming: stream instead of caching each split first.
      batch_size: rows per batch. overwrite: replace an existing dataset once the new one is
        complete.

    Raises:
      epmq_jax.data.tfds_local.DatasetNotFoundError: Hugging Face is set offline
        (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) and ``source`` is a hub id, at once.
      FileExistsError: already prepared and ``overwrite`` is False (before anything is read).
      ValueError: a split or column missing in the source.
      ImportError: the ``datasets`` package is missing.
    """
    import tensorflow_datasets as tfds
    from tqdm.auto import tqdm

    from epmq_jax.data import hf_stream, tfds_local

    task = get_task(task) if isinstance(task, str) else task
    src = os.fspath(source) if source is not None else "nyu-mll/glue"
    hf_stream.check_reachable(src, f"GLUE {task.name}")
    if tfds_local.dataset_exists(task.name, Path(data_dir) / "glue") and not overwrite:
        raise FileExistsError(f"GLUE {task.name} is already prepared under {Path(data_dir)}/glue; "
                              f"pass overwrite=True to replace it.")
    splits = (task.train_split, task.eval_split)
    opened = {s: hf_stream.open_split(src, s, config=task.name, streaming=streaming,
                                      revision=revision) for s in splits}
    label = (tfds.features.Tensor(shape=(), dtype=np.float32) if task.is_regression else
             tfds.features.ClassLabel(num_classes=len(task.label_words)))
    features = {**{f: tfds.features.Text() for f in task.fields}, "label": label}
    columns = [*task.fields, "label"]
    with tfds_local.DatasetWriter(task.name, Path(data_dir) / "glue", features, splits,
                                  description=f"GLUE {task.name} from Hugging Face {src}",
                                  overwrite=overwrite) as writer:
        for split, (ds, total) in opened.items():
            with tqdm(total=total, desc=f"glue/{task.name} {split}", unit="ex") as bar:
                for batch in hf_stream.iter_batches(ds, columns, batch_size):
                    n = len(batch["label"])
                    writer.add(split, [{c: (float(batch[c][i]) if task.is_regression else
                                            int(batch[c][i])) if c == "label" else str(batch[c][i])
                                        for c in columns} for i in range(n)])
                    bar.update(n)
    return writer.out

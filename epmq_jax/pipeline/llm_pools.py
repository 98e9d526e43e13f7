"""Decoder LLMs as pools: Llama-family experts from Hugging Face, scored on text tasks.

Model pool ``hf_llm`` (options in ``model_pool``: ``base``, ``experts`` ``{task: path or repo
id}``, ``tokenizer`` (default: the base's), ``revision``, ``dtype``): a
:class:`~epmq_jax.models.llama.LlamaForCausalLM` base and one expert per task, each loaded when
the runner first asks for it (never for ``epmq eval``). The whole model is merged; the
decoder adapter's linear kernels are quantized (:func:`epmq_jax.calib.decoder_adapter`).
Calibration inputs are ``calib.n_per_task`` training examples per task, ``prompt + answer + eos``
tokenized (the correct choice for multiple-choice tasks), left-padded to a common length with
attention masks.

Task pool ``llm_tasks``: each task is a Hugging Face dataset (hub id, local hub-layout folder or
``save_to_disk`` folder) described by ``data.task_data.<task>`` (:class:`TaskData`):

- ``kind="generate"``: ``prompt`` / ``answer`` columns (``prompt`` may be a template over the
  columns); the greedy KV-cache continuation is scored by exact match
  (:func:`epmq_jax.eval.llm.exact_match`, with the task's ``ignore`` / ``extract`` regexes);
- ``kind="choice"``: ``prompt`` / ``choices`` / ``label`` columns; the choice with the highest
  log-likelihood (``acc``) or length-normalised log-likelihood (``acc_norm``) is the answer.

Prompts go through the tokenizer's chat template when ``data.chat_template`` is set and the
tokenizer has one (:class:`HFTextCodec`); ``eval.limit`` scores the first N examples of a split.
Tokenizers come from ``transformers`` (``AutoTokenizer``), imported only when one is needed.

What both this pool and the offline LLM benchmark's share (:class:`TextTaskPool`): examples as
:class:`TextExamples`, a text codec (``prompt_ids``, ``split_ids``, ``decode``, ``eos_id``,
``pad_id``), and scoring that batches the generation of all tasks scored with one model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from flax import nnx

from epmq_jax.pipeline.hf_pools import _HFModelPool
from epmq_jax.pipeline.pools import Context, ModelPool, Params

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------- text codecs


class TextCodec(Protocol):
    """What the LLM pools need of a tokenizer.

    Attributes:
      eos_id: the end-of-sequence id appended to calibration examples.
      pad_id: the id sequences are padded with.
    """

    eos_id: int
    pad_id: int

    def prompt_ids(self, prompt: str) -> list[int]:
        """The model's input for a prompt (special tokens, chat template applied)."""

    def split_ids(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` of a prompt followed by a continuation."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped."""


class HFTextCodec:
    """A ``transformers`` tokenizer as a :class:`TextCodec`.

    With ``chat_template`` (and a tokenizer that has one) a prompt is rendered as one user turn
    with the generation prompt (``apply_chat_template(..., add_generation_prompt=True)``) and
    tokenized without adding special tokens (the template holds them); otherwise it is tokenized
    as it is, with the tokenizer's special tokens (e.g. Llama's ``<|begin_of_text|>``).
    A continuation is split off as lm-evaluation-harness does: ``context + continuation`` is
    tokenized whole and the continuation is what follows the context's token count.

    Args:
      tokenizer: a ``transformers`` tokenizer.
      chat_template: use the tokenizer's chat template when it has one.
    """

    def __init__(self, tokenizer: Any, *, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.chat = bool(chat_template and getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)

    def render(self, prompt: str) -> str:
        """The prompt's text as the model reads it (the chat template applied, if used)."""
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._encode(self.render(prompt))

    def split_ids(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        context = self.render(prompt)
        n = len(self._encode(context))
        whole = self._encode(context + continuation)
        if len(whole) <= n:
            raise ValueError(f"continuation {continuation!r} adds no token to its prompt")
        return whole[:n], whole[n:]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def hf_codec(name: str, *, revision: str | None = None, chat_template: bool = False) -> HFTextCodec:
    """:class:`HFTextCodec` of ``transformers.AutoTokenizer.from_pretrained(name)``.

    Raises:
      ImportError: ``transformers`` is not installed (the message says how to install it).
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError("LLM tasks need a tokenizer from `transformers`: pip install 'epmq-jax[paper]' "
                          "(or pip install transformers tokenizers)") from e
    tok = transformers.AutoTokenizer.from_pretrained(name, revision=revision or None)
    return HFTextCodec(tok, chat_template=chat_template)


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class TextExamples:
    """One task's examples of one split.

    Attributes:
      kind: ``"generate"`` (``answers``) or ``"choice"`` (``choices`` and ``labels``).
      prompts: the prompt texts.
      answers: reference answers (generate), else None.
      choices: per example the candidate continuations (choice), else None.
      labels: per example the index of the correct choice (choice), else None.
    """

    kind: str
    prompts: list[str]
    answers: list[str] | None = None
    choices: list[list[str]] | None = None
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def targets(self) -> list[str]:
        """The text that follows each prompt in calibration: the answer or the correct choice."""
        if self.kind == "generate":
            return list(self.answers)
        return [c[y] for c, y in zip(self.choices, self.labels)]

    def take(self, idx: Sequence[int]) -> TextExamples:
        """The examples at ``idx``."""
        def pick(xs):
            return None if xs is None else [xs[int(i)] for i in idx]
        return TextExamples(self.kind, pick(self.prompts), pick(self.answers), pick(self.choices),
                            pick(self.labels))


def calibration_batch(codec: TextCodec, per_task: Sequence[TextExamples], *, max_length: int,
                      length_multiple: int = 8) -> list[dict[str, np.ndarray]]:
    """Calibration inputs: each example's ``prompt + target + eos``, left-padded to one length.

    All tasks share the length (the longest example, rounded up to ``length_multiple``, at most
    ``max_length``; longer examples lose their first tokens), so the driver compiles once.

    Returns:
      Per task ``{"input_ids": int32 (n, L), "attention_mask": int32 (n, L)}`` (0 on padding).
    """
    from epmq_jax.eval.llm import pad_left

    rows = []
    for ex in per_task:
        rows.append([[*c, *t, codec.eos_id] for c, t in
                     (codec.split_ids(p, y) for p, y in zip(ex.prompts, ex.targets()))])
    longest = max(len(r) for task in rows for r in task)
    length = min(-(-longest // length_multiple) * length_multiple, int(max_length))
    out = []
    for task in rows:
        ids, mask = pad_left(task, length, codec.pad_id)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# ----------------------------------------------------------------------------- scoring


class TextTaskPool:
    """Scores a decoder on text tasks: exact match of greedy answers, or choice log-likelihood.

    Subclasses set ``kind``, ``tasks``, ``select_split``, ``report_split``, ``note``, ``pool`` (the
    model pool: ``graphdef`` and ``codec``) and implement :meth:`examples` (and may override
    :meth:`task_options`).
    """

    kind = ""
    ctx: Context
    pool: Any
    tasks: list[str]

    def examples(self, task: str, split: str) -> TextExamples:
        """The task's examples of ``split`` (``eval.limit`` applied)."""
        raise NotImplementedError

    def task_options(self, task: str) -> dict[str, Any]:
        """``max_new_tokens``, ``ignore``, ``extract``, ``metric`` and ``choice_prefix`` of a task."""
        return {"max_new_tokens": int(self.ctx.cfg.eval.get("max_new_tokens", 32)), "ignore": (),
                "extract": None, "metric": "acc", "choice_prefix": " "}

    def _sharding(self):
        if self.ctx.mesh is None:
            return None
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        return NamedSharding(self.ctx.mesh, P(self.ctx.axis))

    def _batch_size(self) -> int:
        bs = int(self.ctx.cfg.eval.batch_size)
        if self.ctx.mesh is not None:
            k = self.ctx.mesh.shape[self.ctx.axis]
            bs = -(-bs // k) * k
        return bs

    @functools.cached_property
    def _prompt_cache(self) -> dict[tuple[str, str], list[list[int]]]:
        return {}

    def _prompt_ids(self, task: str, split: str, ex: TextExamples) -> list[list[int]]:
        key = (task, split)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = [self.pool.codec.prompt_ids(p) for p in ex.prompts]
        return self._prompt_cache[key]

    def evaluate(self, params: Params | Sequence[Params], split: str) -> dict[str, dict[str, float]]:
        """``{task: {"score": percent, ...}}`` (see :class:`~epmq_jax.pipeline.pools.TaskPool`).

        Generation tasks scored with the same tree and the same ``max_new_tokens`` are decoded
        together in one batched call.
        """
        from epmq_jax.eval import llm as ev

        per_task = isinstance(params, list | tuple)
        trees = list(params) if per_task else [params] * len(self.tasks)
        codec, cfg = self.pool.codec, self.ctx.cfg
        max_length = cfg.data.get("max_length") if "data" in cfg else None
        common = dict(batch_size=self._batch_size(), sharding=self._sharding(),
                      length_multiple=int(cfg.eval.get("length_multiple", 8)),
                      max_length=None if max_length is None else int(max_length))
        out: dict[str, dict[str, float]] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, task in enumerate(self.tasks):
            ex = self.examples(task, split)
            opts = self.task_options(task)
            if ex.kind == "generate":
                groups.setdefault((i if per_task else -1, opts["max_new_tokens"]), []).append(i)
                continue
            pairs, lengths = [], []
            for p, choices in zip(ex.prompts, ex.choices):
                for c in choices:
                    pairs.append(codec.split_ids(p, opts["choice_prefix"] + c))
                lengths.append([len(opts["choice_prefix"] + c) for c in choices])
            lp = ev.continuation_logprobs(self.pool.graphdef, trees[i], pairs, pad_id=codec.pad_id, **common)
            per_example, k = [], 0
            for choices in ex.choices:
                per_example.append(lp[k: k + len(choices)])
                k += len(choices)
            acc = ev.choice_accuracy(per_example, ex.labels, lengths)
            out[task] = {"score": 100.0 * acc[opts["metric"]], **acc, "n": float(len(ex))}
        for (_, max_new), idx in groups.items():
            prompts, spans = [], []
            for i in idx:
                ex = self.examples(self.tasks[i], split)
                ids = self._prompt_ids(self.tasks[i], split, ex)
                spans.append((i, len(prompts), len(prompts) + len(ids)))
                prompts.extend(ids)
            eos = {codec.eos_id, *self.pool.eos_ids}
            new = ev.greedy_continuations(self.pool.graphdef, trees[idx[0]], prompts, max_new_tokens=max_new,
                                          eos_ids=sorted(eos), pad_id=codec.pad_id, **common)
            for i, a, b in spans:
                task, opts = self.tasks[i], self.task_options(self.tasks[i])
                ex = self.examples(task, split)
                hits = ev.exact_match([codec.decode(t) for t in new[a:b]], ex.answers,
                                      ignore=opts["ignore"], extract=opts["extract"])
                out[task] = {"score": 100.0 * float(hits.mean()), "exact_match": float(hits.mean()),
                             "n": float(len(hits))}
        return {t: out[t] for t in self.tasks}

    def checkpoint_state(self) -> tuple[Params, dict[str, Any]]:
        """Nothing: the LM head is part of the model."""
        return {}, {}


# ----------------------------------------------------------------------------- Hugging Face tasks

_TASK_KEYS = {"source": "", "config": "", "revision": "", "kind": "generate", "prompt": "{prompt}",
              "answer": "answer", "choices": "choices", "label": "label", "where": None,
              "test_split": "test", "validation_split": "validation", "max_new_tokens": 256,
              "extract": "", "ignore": (), "choice_prefix": " ", "metric": "acc", "calib": None}
_CALIB_KEYS = ("source", "config", "revision", "split", "prompt", "answer", "choices", "label", "where")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskData:
    """Where a task's examples come from and how they are scored (``data.task_data.<task>``).

    Attributes:
      source: a hub dataset id, a local hub-layout folder or a ``save_to_disk`` folder.
      config, revision: the dataset config and hub revision (``""``: none / main).
      kind: ``"generate"`` (exact match) or ``"choice"`` (log-likelihood).
      prompt: a ``str.format`` template over the row's columns (``"{prompt}"``: a prompt column).
      answer: the reference column (generate).
      choices: a column holding the list of choices, or a list of columns (empty values dropped).
      label: the column with the correct choice (an index, or a letter A, B, ...), or an int.
      where: ``{column: value or list of values}`` rows must match, or None.
      test_split, validation_split: the dataset's splits behind the pool's ``test`` and
        ``validation`` (``""``: the task has none).
      max_new_tokens: generated tokens per prompt.
      extract, ignore: exact match's normalisation (:func:`epmq_jax.eval.llm.normalize_answer`).
      choice_prefix: put before each choice (lm-evaluation-harness' target delimiter, ``" "``).
      metric: ``"acc"`` or ``"acc_norm"`` (choice).
      calib: overrides for the calibration examples (``source``, ``config``, ``revision``,
        ``split`` (default ``"train"``), ``prompt``, ``answer``, ``choices``, ``label``, ``where``).
    """

    name: str
    source: str
    config: str = ""
    revision: str = ""
    kind: str = "generate"
    prompt: str = "{prompt}"
    answer: str = "answer"
    choices: Any = "choices"
    label: Any = "label"
    where: Mapping[str, Any] | None = None
    test_split: str = "test"
    validation_split: str = "validation"
    max_new_tokens: int = 256
    extract: str = ""
    ignore: tuple[str, ...] = ()
    choice_prefix: str = " "
    metric: str = "acc"
    calib: Mapping[str, Any] | None = None

    @classmethod
    def from_config(cls, name: str, node: Mapping[str, Any]) -> TaskData:
        """Reads ``data.task_data.<name>``.

        Raises:
          ValueError: an unknown key, no ``source``, or a bad ``kind`` / ``metric``.
        """
        where = f"data.task_data.{name}"
        d = dict(node.to_dict() if hasattr(node, "to_dict") else node)
        unknown = sorted(set(d) - set(_TASK_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(_TASK_KEYS)}")
        if not d.get("source"):
            raise ValueError(f"{where}.source is empty: give a hub dataset id or a local folder")
        if d.get("kind", "generate") not in ("generate", "choice"):
            raise ValueError(f"{where}.kind={d['kind']!r}: expected 'generate' or 'choice'")
        if d.get("metric", "acc") not in ("acc", "acc_norm"):
            raise ValueError(f"{where}.metric={d['metric']!r}: expected 'acc' or 'acc_norm'")
        calib = d.get("calib") or None
        if calib is not None:
            bad = sorted(set(calib) - set(_CALIB_KEYS))
            if bad:
                raise ValueError(f"{where}.calib: unknown keys {bad}; expected some of {list(_CALIB_KEYS)}")
        d["ignore"] = tuple(d.get("ignore") or ())
        if isinstance(d.get("choices"), list):
            d["choices"] = tuple(d["choices"])
        return cls(name=name, **d)

    def split_name(self, split: str) -> str:
        """The dataset split behind the pool's ``split`` (``test``, ``validation``, ``calib``).

        Raises:
          ValueError: the task has no such split.
        """
        name = {"test": self.test_split, "validation": self.validation_split,
                "calib": (self.calib or {}).get("split", "train")}.get(split, split)
        if not name:
            raise ValueError(f"data.task_data.{self.name} has no {split} split "
                             f"(data.task_data.{self.name}.{split}_split is empty)")
        return name


def _matches(row: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    for col, want in where.items():
        allowed = want if isinstance(want, list | tuple) else [want]
        if row.get(col) not in allowed:
            return False
    return True


def _label_index(value: Any, where: str) -> int:
    if isinstance(value, str):
        v = value.strip()
        if v.isdigit():
            return int(v)
        if len(v) == 1 and v.upper() in _LETTERS:
            return _LETTERS.index(v.upper())
        raise ValueError(f"{where}: label {value!r} is neither an index nor a letter")
    return int(value)


def read_task_examples(spec: TaskData, split: str, *, limit: int | None = None, sample: int | None = None,
                       seed: int = 0) -> TextExamples:
    """A task's examples from its Hugging Face dataset.

    Args:
      spec: the task (:class:`TaskData`).
      split: ``"test"``, ``"validation"`` or ``"calib"`` (calibration reads ``spec.calib``'s
        source and columns, falling back to the task's).
      limit: the first ``limit`` examples (after ``where``).
      sample: instead, ``sample`` examples drawn with ``seed``
        (:func:`epmq_jax.data.calibration.calibration_indices`).

    Raises:
      ValueError: a missing column, a bad label, no examples left.
    """
    from epmq_jax.data import hf_stream
    from epmq_jax.data.calibration import calibration_indices

    over = dict(spec.calib or {}) if split == "calib" else {}
    get = lambda k: over.get(k, getattr(spec, k))  # noqa: E731
    source = get("source")
    hf_stream.check_reachable(source, f"task {spec.name}")
    ds, _ = hf_stream.open_split(source, spec.split_name(split), config=get("config") or None,
                                 streaming=False, revision=get("revision") or None)
    rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
    if get("where"):
        rows = [r for r in rows if _matches(r, dict(get("where")))]
    if not rows:
        raise ValueError(f"task {spec.name}: no examples in {source} split {spec.split_name(split)!r}"
                         + (f" matching {dict(get('where'))}" if get("where") else ""))
    if sample is not None:
        rows = [rows[i] for i in calibration_indices(len(rows), min(int(sample), len(rows)), seed=seed,
                                                     task=spec.name)]
    elif limit is not None:
        rows = rows[: int(limit)]
    where = f"task {spec.name} ({source})"
    try:
        prompts = [get("prompt").format(**r) for r in rows]
    except KeyError as e:
        raise ValueError(f"{where}: the prompt template {get('prompt')!r} names column {e.args[0]!r}; "
                         f"the dataset has {sorted(rows[0])}") from None
    if spec.kind == "generate":
        col = get("answer")
        if col not in rows[0]:
            raise ValueError(f"{where}: no answer column {col!r}; the dataset has {sorted(rows[0])}")
        return TextExamples("generate", prompts, answers=[str(r[col]) for r in rows])
    cols, label = get("choices"), get("label")
    choices = []
    for r in rows:
        if isinstance(cols, str):
            if cols not in r:
                raise ValueError(f"{where}: no choices column {cols!r}; the dataset has {sorted(r)}")
            choices.append([str(c) for c in r[cols]])
        else:
            choices.append([str(r[c]) for c in cols if r.get(c) not in (None, "")])
    if isinstance(label, int):
        labels = [label] * len(rows)
    else:
        if label not in rows[0]:
            raise ValueError(f"{where}: no label column {label!r}; the dataset has {sorted(rows[0])}")
        labels = [_label_index(r[label], where) for r in rows]
    for i, (c, y) in enumerate(zip(choices, labels)):
        if not 0 <= y < len(c):
            raise ValueError(f"{where}: example {i} has label {y} for {len(c)} choices")
    return TextExamples("choice", prompts, choices=choices, labels=labels)


def task_specs(cfg) -> dict[str, TaskData]:
    """``{task: TaskData}`` of ``data.tasks`` from ``data.task_data``.

    Raises:
      ValueError: a task without its ``data.task_data`` section (or a bad one).
    """
    data = cfg.data
    missing = [t for t in data.tasks if t not in data.task_data]
    if missing:
        raise ValueError(f"data.tasks names {missing}, which data.task_data does not describe")
    return {t: TaskData.from_config(t, data.task_data[t]) for t in data.tasks}


class LLMModelPool(_HFModelPool):
    """A Llama-family base and its experts, from Hugging Face checkpoints (``model_pool.kind = "hf_llm"``)."""

    kind = "hf_llm"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.specs = task_specs(ctx.cfg)

    @functools.cached_property
    def _base_model(self) -> nnx.Module:
        from epmq_jax.models.llama import LlamaForCausalLM

        base = super()._base_model
        if not isinstance(base, LlamaForCausalLM):
            raise ValueError(f"model_pool.base {self.mcfg.base}: expected a Llama-family checkpoint "
                             f"(model_type llama, mistral, qwen2, qwen3), got {type(base).__name__}")
        return base

    def _expert_tower(self, task: str, model: nnx.Module) -> nnx.Module:
        from epmq_jax.models.llama import LlamaForCausalLM

        if not isinstance(model, LlamaForCausalLM) or model.config != self._base_model.config:
            raise ValueError(f"model_pool.experts[{task!r}] = {self.mcfg.experts[task]}: expected a "
                             f"LlamaForCausalLM with the base model's config")
        return model

    @functools.cached_property
    def codec(self) -> HFTextCodec:
        """The tokenizer (``model_pool.tokenizer``, else the base's) as a :class:`TextCodec`."""
        return hf_codec(self.mcfg.get("tokenizer") or self.mcfg.base, revision=self.mcfg.get("revision"),
                        chat_template=bool(self.cfg.data.get("chat_template", False)))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The model config's end-of-sequence ids (generation stops at any of them)."""
        return self._base_model.config.eos_ids

    def adapter(self) -> Any:
        from epmq_jax.calib import decoder_adapter

        return decoder_adapter(self._base_model)

    def calibration_inputs(self) -> list[dict[str, np.ndarray]]:
        c = self.cfg.calib
        examples = [read_task_examples(self.specs[t], "calib", sample=int(c.n_per_task), seed=int(c.seed))
                    for t in self.tasks]
        return calibration_batch(self.codec, examples, max_length=int(self.cfg.data.get("max_length", 2048)))


class LLMTaskPool(TextTaskPool):
    """Text tasks from Hugging Face datasets (``task_pool.kind = "llm_tasks"``)."""

    kind = "llm_tasks"

    def __init__(self, ctx: Context, model_pool: ModelPool, restored: Mapping[str, Any] | None = None):
        if not isinstance(model_pool, LLMModelPool):
            raise ValueError(f"task_pool.kind 'llm_tasks' needs model_pool.kind 'hf_llm', got "
                             f"{getattr(model_pool, 'kind', type(model_pool).__name__)!r}")
        del restored  # nothing beyond the model is needed to score
        self.ctx, self.pool = ctx, model_pool
        self.tasks = list(model_pool.tasks)
        self.specs = model_pool.specs
        self.select_split = ctx.cfg.data.get("select_split") or None
        self.report_split = ctx.cfg.data.get("report_split", "test")
        chat = "the tokenizer's chat template" if ctx.cfg.data.get("chat_template") else "plain prompts"
        self.note = (f"Scores (%) on each task's {self.report_split} split with {chat}: exact match of the "
                     "greedy answer for generation tasks, the choice with the highest log-likelihood for "
                     "multiple-choice tasks; merge coefficients "
                     + ("are chosen on the validation splits" if self.select_split else "are fixed by the config")
                     + "; E-PMQ's λ and switches are fixed by the config.")
        self._examples: dict[tuple[str, str], TextExamples] = {}

    def examples(self, task: str, split: str) -> TextExamples:
        key = (task, split)
        if key not in self._examples:
            self._examples[key] = read_task_examples(self.specs[task], split, limit=self.ctx.cfg.eval.get("limit"))
        return self._examples[key]

    def task_options(self, task: str) -> dict[str, Any]:
        s = self.specs[task]
        return {"max_new_tokens": int(s.max_new_tokens), "ignore": s.ignore, "extract": s.extract or None,
                "metric": s.metric, "choice_prefix": s.choice_prefix}

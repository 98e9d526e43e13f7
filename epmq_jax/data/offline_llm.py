"""Eight synthetic text skills for the offline LLM benchmark, a character tokenizer, local datasets.

Each skill maps a random input string to an answer string by a fixed rule (``SKILLS``); an
example is the prompt ``"<tag>:<input>="`` and the answer, e.g. ``"rev:hdkwa="`` -> ``"awkdh"``.
Four skills read letters (reverse, Caesar shift, every second letter, count a letter), four read
digits or brackets (add, sort, a product modulo 10, closing brackets), so experts fine-tuned on them pull a
shared model in conflicting directions over the same symbols.

Splits per skill (``train`` / ``validation`` / ``test``) hold distinct inputs (no input is in two
splits), drawn from a generator seeded by ``(seed, skill index)``: the data depend only on the
config. :func:`build_suite` writes each skill once as a local tensorflow-datasets dataset
(array_record, columns ``prompt`` and ``answer``) under ``data_dir/<key>/offline_llm_<skill>`` and
always reads it back from there, as the image suite does.

The model reads characters (:class:`CharTokenizer`): ``[bos] prompt`` is the prompt,
``answer [eos]`` the continuation to generate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_DATA_VERSION = 2  # bump when a skill's generator or rule changes, so cached data is rebuilt
SPLITS = ("train", "validation", "test")
_LETTERS = string.ascii_lowercase
_DIGITS = string.digits


# ----------------------------------------------------------------------------- tokenizer


class CharTokenizer:
    """One token per character; ids 0, 1, 2 are ``pad``, ``bos``, ``eos``.

    The alphabet is digits, lowercase letters and ``+*%:=()[]``: every character a skill writes.
    """

    PAD, BOS, EOS = 0, 1, 2
    ALPHABET = _DIGITS + _LETTERS + "+*%:=()[]"

    def __init__(self):
        self._ids = {c: i + 3 for i, c in enumerate(self.ALPHABET)}

    @property
    def vocab_size(self) -> int:
        """Number of ids (3 special tokens + the alphabet)."""
        return 3 + len(self.ALPHABET)

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def pad_id(self) -> int:
        return self.PAD

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no special tokens).

        Raises:
          ValueError: a character outside the alphabet.
        """
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: character {e.args[0]!r} of {text!r} is not in "
                             f"the alphabet {self.ALPHABET!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        return "".join(self.ALPHABET[i - 3] for i in ids if 3 <= i < self.vocab_size)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The model's input for a prompt: ``[bos] + encode(prompt)``."""
        return [self.BOS, *self.encode(prompt)]

    def split_ids(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, continuation ids)`` of a prompt followed by a continuation (no eos)."""
        return self.prompt_ids(prompt), self.encode(continuation)


# ----------------------------------------------------------------------------- skills


@dataclasses.dataclass(frozen=True)
class Skill:
    """A text skill.

    Attributes:
      tag: the prompt's prefix (``"rev"``).
      make_input: ``rng -> input string`` (random).
      answer: ``input string -> answer string`` (the rule).
      description: one line for the dataset's metadata.
    """

    tag: str
    make_input: Callable[[np.random.Generator], str]
    answer: Callable[[str], str]
    description: str

    def prompt(self, x: str) -> str:
        """``"<tag>:<input>="``."""
        return f"{self.tag}:{x}="


def _word(rng: np.random.Generator, alphabet: str, lo: int, hi: int) -> str:
    """A random string of ``lo..hi`` (inclusive) characters from ``alphabet``."""
    n = int(rng.integers(lo, hi + 1))
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))


def _number(rng: np.random.Generator, lo_digits: int, hi_digits: int) -> int:
    d = int(rng.integers(lo_digits, hi_digits + 1))
    return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10 ** d))


def _add_input(rng):
    return f"{_number(rng, 1, 3)}+{_number(rng, 1, 1)}"


def _add_answer(x):
    a, b = x.split("+")
    return str(int(a) + int(b))


def _count_input(rng):
    return f"{_LETTERS[int(rng.integers(0, 5))]}:{_word(rng, _LETTERS[:5], 5, 10)}"


def _count_answer(x):
    letter, word = x.split(":")
    return str(word.count(letter))


def _brackets_input(rng):
    """3-8 round or square brackets, properly nested, with at least one left open."""
    n = int(rng.integers(3, 9))
    out, stack = [], []
    for i in range(n):
        last = i == n - 1
        if stack and (len(stack) > 1 or not last) and rng.random() < 0.4:
            out.append(")" if stack.pop() == "(" else "]")
        else:
            c = "(["[int(rng.integers(0, 2))]
            stack.append(c)
            out.append(c)
    return "".join(out)


def _brackets_answer(x):
    stack = []
    for c in x:
        if c in "([":
            stack.append(c)
        else:
            stack.pop()
    return "".join(")" if c == "(" else "]" for c in reversed(stack))


def _mod_input(rng):
    return f"{_number(rng, 1, 3)}*{_number(rng, 1, 3)}%10"


def _mod_answer(x):
    a, b = x.split("%")[0].split("*")
    return str(int(a) * int(b) % 10)


def _caesar_answer(x):
    return "".join(_LETTERS[(_LETTERS.index(c) + 3) % 26] for c in x)


SKILLS: dict[str, Skill] = {
    "add": Skill("add", _add_input, _add_answer, "a number of 1-3 digits plus a digit"),
    "reverse": Skill("rev", lambda r: _word(r, _LETTERS, 3, 6), lambda x: x[::-1],
                     "a string of 3-6 letters reversed"),
    "sort": Skill("srt", lambda r: _word(r, _DIGITS, 4, 8), lambda x: "".join(sorted(x)),
                  "4-8 digits sorted ascending"),
    "count": Skill("cnt", _count_input, _count_answer,
                   "occurrences of a letter in 5-10 letters from a-e"),
    "brackets": Skill("bal", _brackets_input, _brackets_answer,
                      "the closing brackets that complete 3-8 nested round/square brackets"),
    "modulo": Skill("mod", _mod_input, _mod_answer,
                    "the product of two numbers of 1-3 digits modulo 10"),
    "caesar": Skill("sft", lambda r: _word(r, _LETTERS, 4, 8), _caesar_answer,
                    "4-8 letters shifted by 3 (Caesar cipher)"),
    "skip": Skill("skp", lambda r: _word(r, _LETTERS, 5, 10), lambda x: x[::2],
                  "every second letter of 5-10 letters (1st, 3rd, ...)"),
}


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class SkillData:
    """One skill's examples: ``splits[split] = {"prompt": str array (N,), "answer": str array (N,)}``."""

    name: str
    splits: Mapping[str, Mapping[str, np.ndarray]]

    def examples(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(prompts, answers)`` of a split."""
        d = self.splits[split]
        return d["prompt"], d["answer"]


def make_skill(name: str, *, n_train: int, n_val: int, n_test: int, seed: int) -> SkillData:
    """Generates one skill's three splits with distinct inputs (deterministic in ``seed``).

    Raises:
      ValueError: an unknown skill, a split size < 1, or more examples than the skill has
        distinct inputs (a generator that keeps repeating itself).
    """
    if name not in SKILLS:
        raise ValueError(f"unknown skill {name!r}; known skills: {sorted(SKILLS)}")
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"skill {name}: split sizes must be >= 1, got n_train={n_train}, "
                         f"n_val={n_val}, n_test={n_test}")
    skill = SKILLS[name]
    rng = np.random.default_rng([seed, list(SKILLS).index(name)])
    total = n_train + n_val + n_test
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < total:
        seen.setdefault(skill.make_input(rng))
        tries += 1
        if tries > 50 * total:
            raise ValueError(f"skill {name}: found only {len(seen)} distinct inputs for {total} "
                             "examples; ask for fewer")
    inputs = list(seen)
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val),
              "test": (n_train + n_val, total)}
    splits = {}
    for split, (a, b) in bounds.items():
        xs = inputs[a:b]
        splits[split] = {"prompt": np.array([skill.prompt(x) for x in xs]),
                         "answer": np.array([skill.answer(x) for x in xs])}
    return SkillData(name, splits)


def data_key(name: str, cfg: Any) -> str:
    """A short hash of everything a skill's data depend on (names its dataset directory)."""
    blob = json.dumps([_DATA_VERSION, name, int(cfg.n_train), int(cfg.n_val), int(cfg.n_test),
                       int(cfg.seed)])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load_or_write(name: str, cfg: Any, data_dir: str) -> SkillData:
    from epmq_jax.data import tfds_local

    where = os.path.join(data_dir, data_key(name, cfg))
    ds = f"offline_llm_{name}"
    if not tfds_local.dataset_exists(ds, where):
        data = make_skill(name, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed)
        tfds_local.write_local_dataset(ds, where, data.splits, description=SKILLS[name].description)
    splits = {}
    for split in SPLITS:
        d = tfds_local.load_split(ds, split, where, keys=["prompt", "answer"])
        splits[split] = {"prompt": np.asarray(d["prompt"]), "answer": np.asarray(d["answer"])}
    return SkillData(name, splits)


def build_suite(cfg: Any, data_dir: str | None = None) -> dict[str, SkillData]:
    """The skills a config's ``suite`` section asks for.

    Args:
      cfg: ``tasks`` (skill names), ``n_train``, ``n_val``, ``n_test``, ``seed``.
      data_dir: write each skill once as the local tfds dataset ``offline_llm_<skill>`` under
        ``data_dir/<data_key>/`` and read it back from there; None: generated in memory.

    Returns:
      ``{skill: SkillData}`` in ``cfg.tasks`` order.
    """
    names = list(cfg.tasks)
    if len(set(names)) != len(names):
        raise ValueError(f"suite.tasks has duplicates: {names}")
    unknown = [n for n in names if n not in SKILLS]
    if unknown:
        raise ValueError(f"suite.tasks: unknown skills {unknown}; known skills: {list(SKILLS)}")
    if data_dir is not None:
        return {n: _load_or_write(n, cfg, data_dir) for n in names}
    return {n: make_skill(n, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed)
            for n in names}

"""The offline LLM benchmark (configs/offline_llm.py): its data, and `epmq run` at the tiny size.

Data checks use independent reference functions (written here from the skills' definitions) and
compare generated splits for determinism and disjointness. The run is the CLI's, end to end; its
expert row is recomputed with a plain greedy loop (full forward passes, no KV cache), and a
packed checkpoint is reloaded with `epmq eval`.
"""

import json
import re
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from epmq_jax import cli, pipeline, report
from epmq_jax.config import load_with_overrides
from epmq_jax.data import offline_llm
from epmq_jax.quant import is_quantized

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "offline_llm.py") + ":tiny"


def _reference(tag: str, x: str) -> str:
    """Each skill's answer, computed independently of epmq_jax.data.offline_llm."""
    if tag == "add":
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)", x).groups())
        return str(a + b)
    if tag == "rev":
        return "".join(reversed(x))
    if tag == "srt":
        return "".join(str(d) for d in sorted(int(c) for c in x))
    if tag == "cnt":
        letter, word = re.fullmatch(r"([a-z]):([a-z]+)", x).groups()
        return str(Counter(word)[letter])
    if tag == "bal":
        pairs, stack = {"(": ")", "[": "]"}, []
        for c in x:
            if c in pairs:
                stack.append(pairs[c])
            else:
                assert stack and stack.pop() == c, f"{x} is not a nested prefix"
        assert stack, f"{x} has nothing left open"
        return "".join(reversed(stack))
    if tag == "mod":
        a, b = re.fullmatch(r"(\d+)\*(\d+)%10", x).groups()
        return str(int(a[-1]) * int(b[-1]) % 10)   # only the last digits matter
    if tag == "sft":
        return x.translate(str.maketrans("abcdefghijklmnopqrstuvwxyz", "defghijklmnopqrstuvwxyzabc"))
    if tag == "skp":
        return "".join(c for i, c in enumerate(x) if i % 2 == 0)
    raise AssertionError(f"no reference for {tag}")


def _cfg(**suite):
    cfg = load_with_overrides(CONFIG)
    with cfg.unlocked():
        cfg.suite.update(suite)
    return cfg


@pytest.mark.parametrize("skill", list(offline_llm.SKILLS))
def test_answers_match_an_independent_reference(skill):
    data = offline_llm.make_skill(skill, n_train=200, n_val=20, n_test=20, seed=3)
    tag = offline_llm.SKILLS[skill].tag
    for split in offline_llm.SPLITS:
        for prompt, answer in zip(*data.examples(split)):
            m = re.fullmatch(rf"{tag}:(.+)=", str(prompt))
            assert m, prompt
            assert str(answer) == _reference(tag, m.group(1)), (prompt, answer)


def test_data_are_deterministic_disjoint_and_read_back(tmp_path):
    cfg = _cfg(tasks=list(offline_llm.SKILLS), n_train=150, n_val=30, n_test=40).suite
    written = offline_llm.build_suite(cfg, data_dir=str(tmp_path))
    again = offline_llm.build_suite(cfg)       # generated again in memory
    for skill in cfg.tasks:
        sets = {}
        for split, n in (("train", 150), ("validation", 30), ("test", 40)):
            p1, a1 = written[skill].examples(split)
            p2, a2 = again[skill].examples(split)
            assert list(p1) == list(p2) and list(a1) == list(a2)
            assert len(set(p1)) == n
            sets[split] = set(p1)
        assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"]
                    or sets["validation"] & sets["test"])
    assert list(tmp_path.glob("*/offline_llm_add/1.0.0/dataset_info.json"))
    other = offline_llm.build_suite(_cfg(tasks=["add"], n_train=150, n_val=30, n_test=40, seed=1).suite)
    assert list(other["add"].examples("test")[0]) != list(again["add"].examples("test")[0])


def test_char_tokenizer():
    tok = offline_llm.CharTokenizer()
    text = "cnt:a:abca=[()]%9+2*3"
    assert tok.decode(tok.encode(text)) == text
    assert tok.prompt_ids("ab")[0] == tok.BOS and tok.decode([tok.BOS, *tok.encode("x"), tok.EOS]) == "x"
    assert max(tok.encode(tok.ALPHABET)) == tok.vocab_size - 1
    with pytest.raises(ValueError, match="'A' of 'Ab' is not in the alphabet"):
        tok.encode("Ab")
    with pytest.raises(ValueError, match="unknown skills"):
        offline_llm.build_suite(_cfg(tasks=["add", "juggle"]).suite)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.getbasetemp() / "offline_llm_tiny"
    assert cli.main(["run", "--config", CONFIG, "--workdir", str(workdir)]) == 0
    return workdir, report.read_json(workdir / "results.json")


def test_results_in_the_image_suites_schema(tiny_run):
    workdir, doc = tiny_run
    cfg = _cfg()
    tasks = list(cfg.suite.tasks)
    rows = doc["rows"]
    assert [(r["merge"], r["method"], r["bits"], r["block"]) for r in rows] == [
        (v.merge, v.method, v.bits, v.block) for v in pipeline.plan(cfg)]
    for r in rows:
        assert {"merge", "method", "bits", "avg", "per_task", "default"} <= set(r)
        assert list(r["per_task"]) == tasks
        assert r["avg"] == pytest.approx(np.mean(list(r["per_task"].values())))
        assert all(0 <= v <= 100 for v in r["per_task"].values())
    defaults = sorted((r["merge"], r["bits"]) for r in rows if r["default"])
    assert defaults == sorted((m, b) for m in cfg.merge.methods for b in cfg.quant.bits)
    assert doc["pools"] == {"model": "offline_llm", "task": "offline_llm"}
    assert {"train", "build_suite", "calibrate", "evaluate_validation", "evaluate_test", "total",
            "cpu_total"} <= set(doc["timings"])
    assert report.read_csv(workdir / "results.csv") == rows
    stats = json.loads((workdir / "solver_stats" / "ta_epmq_w4.json").read_text())
    assert {s["path"] for s in stats} >= {"model/layers/0/self_attn/q_proj/kernel",
                                          "model/layers/1/mlp/down_proj/kernel"}


def _greedy_without_cache(graphdef, params, prompts, steps, eos):
    """Greedy decoding by full forward passes (no KV cache): each step reruns the whole window
    (prompt + tokens so far, left-padded to a fixed width) and appends the argmax."""
    model = nnx.merge(graphdef, params)
    fwd = jax.jit(lambda ids, mask: model(ids, mask)[:, -1].argmax(-1))
    width = max(len(p) for p in prompts) + steps
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for _ in range(steps):
        nxt = np.asarray(fwd(ids, mask))
        for i, t in enumerate(nxt):
            done[i] |= t == eos
            if not done[i]:
                out[i].append(int(t))
        ids = np.concatenate([ids[:, 1:], nxt[:, None].astype(np.int32)], axis=1)
        mask = np.concatenate([mask[:, 1:], np.ones((len(prompts), 1), np.int32)], axis=1)
    return out


def test_expert_row_recomputed_without_the_kv_cache(tiny_run):
    workdir, doc = tiny_run
    cfg = _cfg()
    _, mp, _ = pipeline.start(cfg, workdir)      # models from the cache
    tok = offline_llm.CharTokenizer()
    row = next(r for r in doc["rows"] if r["merge"] == "expert")
    for task, params in zip(cfg.suite.tasks, mp.experts()):
        prompts, answers = mp.suite[task].examples("test")
        new = _greedy_without_cache(mp.graphdef, params, [tok.prompt_ids(p) for p in prompts],
                                    cfg.eval.max_new_tokens, tok.EOS)
        hits = [tok.decode(n) == a for n, a in zip(new, answers)]
        assert row["per_task"][task] == pytest.approx(100 * np.mean(hits))
    assert row["avg"] > 0   # the tiny experts answer some prompts right


def test_greedy_batches_rounded_to_the_mesh(tiny_run):
    """13 prompts, batch_size 64, rows split over the 8 test devices: one batch of 16 rows (13
    rounded up to the mesh), answers equal to the plain greedy loop without a KV cache."""
    from epmq_jax.eval import llm as ev

    workdir, _ = tiny_run
    cfg = _cfg()
    _, mp, _ = pipeline.start(cfg, workdir)
    tok = offline_llm.CharTokenizer()
    prompts = [tok.prompt_ids(p) for p in mp.suite[cfg.suite.tasks[0]].examples("test")[0][:13]]
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batches = ev._batches(len(prompts), 64, sharding)
    assert [len(b) for b in batches] == [16] and sorted(set(batches[0].tolist())) == list(range(13))
    params = mp.experts()[0]
    got = ev.greedy_continuations(mp.graphdef, params, prompts, max_new_tokens=6, eos_ids=[tok.EOS],
                                  pad_id=tok.PAD, batch_size=64, sharding=sharding)
    assert got == _greedy_without_cache(mp.graphdef, params, prompts, 6, tok.EOS)
    assert [len(b) for b in ev._batches(300, 800)] == [304]     # 300 rounded up to 8, not 800
    assert [len(b) for b in ev._batches(20, 8)] == [8, 8, 8]
    assert [len(b) for b in ev._batches(900, 800)] == [456, 456]   # split evenly, not 800 + 800
    assert [len(b) for b in ev._batches(7, 3)] == [3, 3, 3]       # never more rows than batch_size
    for n, size in ((900, 800), (801, 800), (2400, 800), (7, 3)):
        assert sorted(set(np.concatenate(ev._batches(n, size)).tolist())) == list(range(n))


def test_greedy_decoding_stops_after_the_longest_answer(tiny_run):
    """Each skill decodes its longest answer (any split, counted here from the data) + eos, at
    most eval.max_new_tokens; the expert row, recomputed above with all of max_new_tokens,
    shows exact match unchanged."""
    workdir, _ = tiny_run
    cfg = _cfg()
    _, mp, tp = pipeline.start(cfg, workdir)
    for task in cfg.suite.tasks:
        longest = max(len(str(a)) for split in offline_llm.SPLITS for a in mp.suite[task].examples(split)[1])
        assert tp.task_options(task)["max_new_tokens"] == min(longest + 1, cfg.eval.max_new_tokens)
    with cfg.unlocked():
        cfg.eval.length_multiple = 0
    from epmq_jax.pipeline import validate

    with pytest.raises(ValueError, match="eval.length_multiple=0"):
        validate.check_config(cfg)


def test_checkpoint_reloads_with_epmq_eval(tiny_run, capsys):
    _, doc = tiny_run
    ckpt = doc["checkpoints"]["ta_epmq_w4"]
    assert cli.main(["eval", "--checkpoint", ckpt]) == 0
    assert "reproduces the recorded row" in capsys.readouterr().out
    params = pipeline.load_checkpoint(ckpt)[-1]
    qws = [x for x in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(x)]
    assert len(qws) == 7 * _cfg().model.num_hidden_layers and all(q.bits == 4 for q in qws)


@pytest.mark.parametrize("size", ["full", "small", "tiny"])
def test_every_size_loads_and_validates(size):
    from epmq_jax.pipeline import validate

    cfg = load_with_overrides(str(ROOT / "configs" / "offline_llm.py") + f":{size}")
    validate.check_config(cfg)
    assert cfg.model_pool.kind == cfg.task_pool.kind == "offline_llm"


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match="size must be 'full', 'small' or 'tiny'"):
        load_with_overrides(str(ROOT / "configs" / "offline_llm.py") + ":huge")

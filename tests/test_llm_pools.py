"""The LLM pools (``hf_llm`` / ``llm_tasks``) against transformers' PyTorch Llama, offline.

A tiny random Llama and two perturbed experts are saved with ``save_pretrained``, beside a
character-level tokenizer (built with ``tokenizers``) that has a chat template; the tasks are
``datasets`` folders written with ``save_to_disk``. The checks compute by hand what the pools
must report: exact match of torch's greedy answers (``generate``), the choice log-likelihoods
from torch's logits, the chat template's token ids, the calibration rows and masks.
"""

import string
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

from epmq_jax import pipeline  # noqa: E402
from epmq_jax.config import load_config  # noqa: E402
from epmq_jax.data.calibration import calibration_indices  # noqa: E402
from epmq_jax.eval import llm as ev  # noqa: E402
from epmq_jax.pipeline import validate  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama31_8b_mergebench.py"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]   # ids 0..5
CHARS = string.ascii_lowercase + string.digits + " +=?:."
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NEW = 6   # max_new_tokens of the generation task


def _tokenizer(path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")   # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def _llama(path, seed, base=None):
    cfg = transformers.LlamaConfig(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base is not None:   # an expert: the base plus a small task vector
                p.copy_(dict(base.named_parameters())[name] + 0.1 * torch.randn_like(p))
            else:
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
        # the eos logit raised so that some greedy answers end before max_new_tokens
        model.lm_head.weight[2] += 0.5 * model.lm_head.weight.mean(0)
    model.save_pretrained(path)
    return model


def _words(rng, n, lo=2, hi=6):
    return ["".join(rng.choice(list("abcdefgh"), int(rng.integers(lo, hi + 1)))) for _ in range(n)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Base, two experts, the tokenizer and two tasks on disk; the torch models for reference."""
    root = tmp_path_factory.mktemp("llm_hub")
    tok = _tokenizer(root / "base")
    base = _llama(root / "base", 0)
    experts = {"spell": _llama(root / "spell", 1, base), "pick": _llama(root / "pick", 2, base)}
    rng = np.random.default_rng(0)
    gen = {}
    for split, n in (("train", 12), ("validation", 6), ("test", 8)):
        prompts = [f"spell {w}:" for w in _words(rng, n)]
        gen[split] = datasets.Dataset.from_dict({"prompt": prompts, "answer": _words(rng, n)})
    datasets.DatasetDict(gen).save_to_disk(str(root / "spell_data"))
    mc = {}
    for split, n in (("train", 10), ("validation", 5), ("test", 7)):
        mc[split] = datasets.Dataset.from_dict({
            "question": [f"which {w}?" for w in _words(rng, n)],
            "option_a": _words(rng, n), "option_b": _words(rng, n, 1, 3), "option_c": _words(rng, n, 3, 8),
            "answer": list(rng.choice(list("ABC"), n))})
    datasets.DatasetDict(mc).save_to_disk(str(root / "pick_data"))
    return root, tok, base, experts


def _cfg(root, *, chat=False, **eval_kw):
    cfg = load_config(CONFIG)
    with cfg.unlocked():   # (ConfigDict.update merges nested sections: assign the ones replaced)
        cfg.model_pool.update(dict(base=str(root / "base"), dtype=""))
        cfg.model_pool.experts = {"spell": str(root / "spell"), "pick": str(root / "pick")}
        cfg.data.update(dict(tasks=("spell", "pick"), chat_template=chat, max_length=64, select_split="validation"))
        cfg.data.task_data = {
            "spell": dict(source=str(root / "spell_data"), kind="generate", max_new_tokens=NEW),
            "pick": dict(source=str(root / "pick_data"), kind="choice", prompt="Q: {question}",
                         choices=["option_a", "option_b", "option_c"], label="answer")}
        cfg.merge.update(dict(methods=("ta",), scaling=0.5))
        cfg.quant.update(dict(bits=(4,), methods=("gptq", "epmq"), group_size=16))
        cfg.calib.update(dict(n_per_task=5, batch_size=8, lam_sweep=(), ablations=(), unrounded=False))
        cfg.eval.update(dict(batch_size=4, progress=False, **eval_kw))
        cfg.run.update(dict(mesh="", resume=False))
    return cfg


def _prompt_ids(tok, prompt, chat):
    if chat:
        return list(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)["input_ids"])
    return list(tok(prompt)["input_ids"])


def _torch_answer(model, tok, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False, eos_token_id=2, pad_token_id=0)[0, len(ids):]
    new = out.tolist()
    new = new[: new.index(2)] if 2 in new else new
    return tok.decode(new, skip_special_tokens=True)


def _torch_loglik(model, ctx, cont):
    ids = torch.tensor([[*ctx, *cont]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _rewrite(root, name, split, column, values):
    """Replaces one column of a saved split (the references the hand computation chooses)."""
    dd = datasets.load_from_disk(str(root / name))
    parts = {s: dd[s] for s in dd}
    parts[split] = parts[split].remove_columns(column).add_column(column, list(values))
    datasets.DatasetDict(parts).save_to_disk(str(root / f"{name}_{split}_{column}"))
    return str(root / f"{name}_{split}_{column}")


@pytest.mark.parametrize("chat", [False, True])
def test_exact_match_and_choice_accuracy_match_torch(hub, tmp_path, chat):
    """Generation: the references are torch's own greedy answers for half the prompts and a wrong
    word for the rest, so exact match must be the fraction computed here. Choice: the label is
    torch's argmax for even examples and another choice for odd ones."""
    root, tok, base, experts = hub
    spell = datasets.load_from_disk(str(root / "spell_data"))["test"]
    answers = [_torch_answer(experts["spell"], tok, _prompt_ids(tok, p, chat)) for p in spell["prompt"]]
    refs = [a if i % 2 == 0 else "zzzz" for i, a in enumerate(answers)]
    pick = datasets.load_from_disk(str(root / "pick_data"))["test"]
    logliks, labels = [], []
    for i, row in enumerate(pick):
        ctx = _prompt_ids(tok, f"Q: {row['question']}", chat)
        choices = [row["option_a"], row["option_b"], row["option_c"]]
        lp = [_torch_loglik(experts["pick"], ctx, list(tok(" " + c, add_special_tokens=False)["input_ids"]))
              for c in choices]
        logliks.append(lp)
        best = int(np.argmax(lp))
        labels.append("ABC"[best if i % 2 == 0 else (best + 1) % 3])
    cfg = _cfg(root, chat=chat)
    with cfg.unlocked():
        cfg.data.task_data.spell.source = _rewrite(root, "spell_data", "test", "answer", refs)
        cfg.data.task_data.pick.source = _rewrite(root, "pick_data", "test", "answer", labels)
    _, mp, tp = pipeline.start(cfg, tmp_path)
    res = tp.evaluate(mp.experts(), "test")   # each task with its own expert
    expected_em = np.mean([a.strip() == r.strip() for a, r in zip(answers, refs)])
    assert res["spell"]["score"] == pytest.approx(100 * expected_em)
    assert 0 < expected_em < 1 and res["spell"]["n"] == len(refs)
    assert res["pick"]["acc"] == pytest.approx(np.mean([i % 2 == 0 for i in range(len(labels))]))
    assert res["pick"]["score"] == pytest.approx(100 * res["pick"]["acc"])
    # the log-likelihoods themselves, through the evaluator, against torch's
    pairs = [(_prompt_ids(tok, f"Q: {r['question']}", chat),
              list(tok(" " + c, add_special_tokens=False)["input_ids"]))
             for r in pick for c in (r["option_a"], r["option_b"], r["option_c"])]
    ours = ev.continuation_logprobs(mp.graphdef, mp.experts()[1], pairs, pad_id=0, batch_size=4)
    np.testing.assert_allclose(ours, np.ravel(logliks), rtol=1e-5, atol=2e-4)


def test_shared_tree_scores_every_task_with_the_base(hub, tmp_path):
    """One tree for all tasks (a merge): the base's greedy answers, exact match against torch's."""
    root, tok, base, _ = hub
    cfg = _cfg(root, limit=5)
    _, mp, tp = pipeline.start(cfg, tmp_path)
    spell = datasets.load_from_disk(str(root / "spell_data"))["validation"]
    hits = [_torch_answer(base, tok, _prompt_ids(tok, p, False)).strip() == a.strip()
            for p, a in zip(spell["prompt"][:5], spell["answer"][:5])]
    res = tp.evaluate(mp.base(), "validation")
    assert res["spell"]["n"] == 5 and res["pick"]["n"] == 5    # eval.limit
    assert res["spell"]["score"] == pytest.approx(100 * np.mean(hits))


def test_chat_template_prompt_ids(hub, tmp_path):
    root, tok, _, _ = hub
    _, mp, _ = pipeline.start(_cfg(root, chat=True), tmp_path)
    prompt = "spell abc:"
    expected = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                       add_generation_prompt=True)["input_ids"]
    assert mp.codec.prompt_ids(prompt) == list(expected)
    assert mp.codec.prompt_ids(prompt)[:2] == [1, 4] and mp.codec.prompt_ids(prompt)[-1] == 5
    ctx, cont = mp.codec.split_ids(prompt, "cab")
    assert ctx == list(expected) and cont == list(tok("cab", add_special_tokens=False)["input_ids"])
    _, plain, _ = pipeline.start(_cfg(root, chat=False), tmp_path / "plain")
    assert plain.codec.prompt_ids(prompt) == [1, *tok(prompt, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("chat", [False, True])
def test_calibration_rows_and_masks(hub, tmp_path, chat):
    """Each row is prompt + target + eos of a sampled train example, left-padded, mask 1 on it exactly."""
    root, tok, _, _ = hub
    cfg = _cfg(root, chat=chat)
    _, mp, _ = pipeline.start(cfg, tmp_path)
    inputs = mp.calibration_inputs()
    train = {"spell": datasets.load_from_disk(str(root / "spell_data"))["train"],
             "pick": datasets.load_from_disk(str(root / "pick_data"))["train"]}
    assert inputs[0]["input_ids"].shape[1] == inputs[1]["input_ids"].shape[1]   # one length for all tasks
    for task, x in zip(("spell", "pick"), inputs):
        rows = train[task]
        idx = calibration_indices(len(rows), 5, seed=cfg.calib.seed, task=task)
        assert x["input_ids"].shape[0] == 5 and x["input_ids"].dtype == np.int32
        for r, i in enumerate(idx):
            row = rows[int(i)]
            if task == "spell":
                prompt, target = row["prompt"], row["answer"]
            else:
                prompt = f"Q: {row['question']}"
                target = row["option_" + row["answer"].lower()]
            want = [*_prompt_ids(tok, prompt, chat), *tok(target, add_special_tokens=False)["input_ids"], 2]
            mask = x["attention_mask"][r]
            n = len(want)
            assert mask.tolist() == [0] * (len(mask) - n) + [1] * n
            assert x["input_ids"][r, -n:].tolist() == want
            assert (x["input_ids"][r, :-n] == 0).all()


def test_run_merges_quantizes_and_reloads(hub, tmp_path):
    """`epmq run` over the hf_llm pool: rows in the suite's schema; the packed checkpoint reloads to its row."""
    root, _, _, _ = hub
    cfg = _cfg(root, limit=4)
    doc = pipeline.run(cfg, tmp_path, plots=False)
    assert [(r["merge"], r["method"], r["bits"]) for r in doc["rows"]] == [
        ("expert", "fp", None), ("ta", "fp", None), ("ta", "gptq", 4), ("ta", "epmq", 4)]
    for r in doc["rows"]:
        assert list(r["per_task"]) == ["spell", "pick"] and {"avg", "default"} <= set(r)
    assert doc["pools"] == {"model": "hf_llm", "task": "llm_tasks"}
    res = pipeline.eval_checkpoint(doc["checkpoints"]["ta_epmq_w4"])
    assert res["matches_recorded"]


def test_task_data_errors_name_the_key(hub, tmp_path):
    root, _, _, _ = hub
    cfg = _cfg(root)
    with cfg.unlocked():
        cfg.data.task_data.pick.colour = "red"
    with pytest.raises(ValueError, match=r"data.task_data.pick: unknown keys \['colour'\]"):
        pipeline.start(cfg, tmp_path)
    cfg = _cfg(root)
    with cfg.unlocked():
        cfg.data.task_data.spell.prompt = "{question}"
    _, _, tp = pipeline.start(cfg, tmp_path / "b")
    with pytest.raises(ValueError, match="names column 'question'"):
        tp.evaluate([{}, {}], "test")


def test_exact_match_normalisation():
    """lm-evaluation-harness' GSM8K flexible extract: commas and $ ignored, the last number kept."""
    ignore, extract = (r",", r"\$"), r"(-?\d+(?:\.\d+)?)"
    preds = ["so the answer is $1,234.", "x = 7 then 12", "none", " 5 "]
    refs = ["work... #### 1234", "#### 12", "#### 3", "5"]
    assert ev.exact_match(preds, refs, ignore=ignore, extract=extract).tolist() == [True, True, False, True]
    assert ev.normalize_answer("  abc \n") == "abc"
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        ev.exact_match(["a", "b"], ["a"])


def test_mergebench_config_loads_and_validates():
    cfg = load_config(CONFIG)
    validate.check_config(cfg)
    assert cfg.model_pool.kind == "hf_llm" and cfg.task_pool.kind == "llm_tasks"
    assert dict(cfg.model_pool.experts) == {d: f"MergeBench/Llama-3.1-8B_{d}" for d in
                                            ("instruction", "math", "coding", "safety", "multilingual")}
    from epmq_jax.pipeline.llm_pools import task_specs

    specs = task_specs(cfg)
    assert [s.kind for s in specs.values()] == ["choice", "generate", "generate", "choice", "choice"]
    doc = CONFIG.read_text()
    assert "NEEDS THE HUGGING FACE HUB" in doc and "AN ACCELERATOR" in doc and "Estimated runtime" in doc

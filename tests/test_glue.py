"""GLUE text-to-text: prompts, label-word parsing, and metrics against scipy / scikit-learn."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from epmq_jax.data import glue as data
from epmq_jax.eval import glue as metrics

# --- prompts and targets ---------------------------------------------------------------------


def test_prompts_are_fusion_bench_strings():
    cola = {"sentence": b"The book was read by me.", "label": 1, "idx": 7}
    assert data.format_example("cola", cola) == (
        "Indicate if the following sentence is grammatically correct or not: "
        "\"The book was read by me.\". Answere 'acceptable' or 'unacceptable'.", "acceptable")
    mnli = {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": np.int64(2)}
    assert data.format_example("glue/mnli", mnli) == (
        "Does the premise: 'A man sleeps.' logically imply, contradict, or is neutral to the "
        "hypothesis: 'A man is awake.'? Answere with 'entailment', 'contradiction', or 'neutral'.",
        "contradiction")
    qnli = {"question": "Who?", "sentence": "Bob did.", "label": 0}
    assert data.format_example("qnli", qnli) == (
        "Given the context: 'Bob did.', does the question 'Who?' have an answer based on the "
        "information provided? Answer with 'yes' or 'no'.", "yes")
    stsb = {"sentence1": "a", "sentence2": "b", "label": np.float32(3.76)}
    assert data.format_example("stsb", stsb) == (
        "Consider the sentences 'a' and 'b'. On a scale from 1 (completely different) to 5 "
        "(completely similar), rate the similarity.", "3.8")


@pytest.mark.parametrize("name,words", [
    ("cola", ["unacceptable", "acceptable"]), ("sst2", ["negative", "positive"]),
    ("mrpc", ["no", "yes"]), ("qqp", ["no", "yes"]), ("rte", ["yes", "no"]),
    ("qnli", ["yes", "no"]), ("mnli", ["entailment", "neutral", "contradiction"])])
def test_label_words_follow_glue_label_ids(name, words):
    # GLUE label ids (tfds and HF agree): cola 1 = acceptable, mnli 0/1/2 = entailment/neutral/
    # contradiction, rte/qnli 0 = entailment, mrpc/qqp 1 = equivalent/duplicate.
    assert [data.format_target(name, i) for i in range(len(words))] == words


def test_bad_examples_raise():
    with pytest.raises(ValueError, match="lacks fields"):
        data.format_input("mrpc", {"sentence1": "x"})
    with pytest.raises(ValueError, match="label -1"):
        data.format_target("rte", -1)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        data.get_task("wnli")


def test_all_eight_tasks_registered():
    assert sorted(data.GLUE_TASK_NAMES) == sorted(data.GLUE_TASKS)
    assert len(data.GLUE_TASKS) == 8
    assert data.get_task("mnli").eval_split == "validation_matched"
    assert all(t.tfds_name == f"glue/{t.name}" for t in data.GLUE_TASKS.values())


# --- parsing generated answers -----------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("acceptable", 1), ("unacceptable", 0), (" Acceptable. ", 1), ("'unacceptable'", 0),
    ("acceptable or not", data.UNPARSED), ("", data.UNPARSED), ("yes", data.UNPARSED)])
def test_parse_cola(text, want):
    assert data.parse_prediction("cola", text) == want


def test_parse_stsb_numbers():
    assert data.parse_prediction("stsb", "3.8") == 3.8
    assert data.parse_prediction("stsb", "about 2 or 3") == 2.0
    assert data.parse_prediction("stsb", ".5") == 0.5
    assert data.parse_prediction("stsb", "similar") is None


def test_encode_texts_pads_and_truncates():
    ids, mask = data.encode_texts(["ab", "abcdef"], lambda s: [ord(c) for c in s] + [1],
                                  max_length=4)
    np.testing.assert_array_equal(ids, [[97, 98, 1, 0], [97, 98, 99, 100]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 1, 1]])


# --- metrics -----------------------------------------------------------------------------------


def test_matthews_matches_sklearn_binary_and_multiclass():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    pred[:9] = data.UNPARSED
    assert metrics.matthews_corrcoef(pred, gold) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(gold, pred), abs=1e-12)
    gold3, pred3 = rng.integers(0, 3, 300), rng.integers(-1, 3, 300)
    assert metrics.matthews_corrcoef(pred3, gold3) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(gold3, pred3), abs=1e-12)


def test_matthews_textbook_values():
    gold = np.array([0, 0, 1, 1, 1])
    assert metrics.matthews_corrcoef(gold, gold) == 1.0
    assert metrics.matthews_corrcoef(1 - gold, gold) == -1.0
    assert metrics.matthews_corrcoef(np.ones(5, int), gold) == 0.0  # constant prediction
    pred = np.array([1, 0, 1, 1, 1])  # TP=3 TN=1 FP=1 FN=0: (TP*TN - FP*FN) / sqrt(...)
    assert metrics.matthews_corrcoef(pred, gold) == pytest.approx(
        (3 * 1 - 1 * 0) / np.sqrt((3 + 1) * (3 + 0) * (1 + 1) * (1 + 0)))


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    gold = np.round(rng.uniform(0, 5, 150), 1)
    pred = np.round(gold + rng.normal(0, 1.0, 150))  # integers: many ties
    assert metrics.pearson(pred, gold) == pytest.approx(scipy.stats.pearsonr(pred, gold)[0], abs=1e-12)
    assert metrics.spearman(pred, gold) == pytest.approx(scipy.stats.spearmanr(pred, gold)[0], abs=1e-12)
    assert metrics.spearman(np.exp(gold), gold) == pytest.approx(1.0)  # monotone -> rho = 1
    assert metrics.pearson(np.full(150, 3.0), gold) == 0.0


def test_accuracy_and_shape_errors():
    assert metrics.accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    with pytest.raises(ValueError, match=r"\(3,\) and labels \(2,\)"):
        metrics.accuracy([1, 0, 2], [1, 1])
    with pytest.raises(ValueError, match="no examples"):
        metrics.spearman([], [])


def test_glue_metrics_from_texts_and_task_scores():
    cola = metrics.glue_metrics("cola", ["acceptable", "Unacceptable.", "maybe", "acceptable"],
                                [1, 0, 0, 0])
    assert cola["accuracy"] == 0.5 and cola["unparsed"] == 1 and cola["n"] == 4
    assert cola["matthews"] == pytest.approx(
        sklearn.metrics.matthews_corrcoef([1, 0, 0, 0], [1, 0, -1, 1]))
    assert metrics.task_score("cola", cola) == cola["accuracy"]
    assert metrics.task_score("cola", cola, style="glue") == cola["matthews"]

    texts, gold = ["4.0", "1.2", "n/a", "3.1"], [3.8, 1.0, 2.5, 3.0]
    sts = metrics.glue_metrics("stsb", texts, gold)
    pred = [4.0, 1.2, 0.0, 3.1]  # unparsed -> 0.0, as FusionBench's parser
    assert sts["unparsed"] == 1
    assert sts["spearman"] == pytest.approx(scipy.stats.spearmanr(pred, gold)[0])
    assert metrics.task_score("stsb", sts, style="glue") == pytest.approx(
        (scipy.stats.pearsonr(pred, gold)[0] + scipy.stats.spearmanr(pred, gold)[0]) / 2)
    with pytest.raises(ValueError, match="style"):
        metrics.task_score("stsb", sts, style="leaderboard")


def test_generate_answers_batches_strips_start_eos_and_pad():
    ids = np.arange(5)[:, None] + np.zeros((1, 3), int) + 10  # row i holds token 10 + i
    calls = []

    def generate(x, m):
        calls.append(x.shape)
        first = x[:, :1]
        return np.concatenate([np.zeros_like(first), first, first + 100, np.ones_like(first),
                               first], axis=1)  # start, tok, tok+100, eos, junk

    out = metrics.generate_answers(generate, lambda t: ",".join(map(str, t)), ids,
                                   np.ones_like(ids), batch_size=2)
    assert out == [f"{10 + i},{110 + i}" for i in range(5)]
    assert calls == [(2, 3)] * 3  # the short last batch was padded to the batch size


# --- teacher-forced inputs and local tfds data -------------------------------------------------


def _char_tokenize(s):
    return [ord(c) % 50 + 2 for c in s] + [1]  # ids >= 2, then </s> = 1


def test_seq2seq_batch_shifts_targets_behind_the_start_token():
    batch = data.seq2seq_batch(["abc", "de"], ["yes", "no"], _char_tokenize, max_length=5,
                               max_target_length=4)
    yes, no = _char_tokenize("yes"), _char_tokenize("no")
    np.testing.assert_array_equal(batch["decoder_input_ids"], [[0, *yes[:3]], [0, *no[:2], 0]])
    np.testing.assert_array_equal(batch["decoder_attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])


def test_load_examples_and_calibration_inputs_from_local_tfds(tmp_path):
    from epmq_jax.data import tfds_local

    sentences = [f"sentence number {i}." for i in range(12)]
    labels = np.arange(12) % 2
    tfds_local.write_local_dataset(
        "cola", tmp_path / "glue",
        {"train": {"sentence": sentences, "label": labels},
         "validation": {"sentence": sentences[:3], "label": labels[:3]}},
        num_classes={"label": 2})
    val = data.load_examples("cola", None, tmp_path)
    assert list(val["sentence"]) == sentences[:3] and list(val["label"]) == [0, 1, 0]
    assert data.format_example("cola", data.examples(val)[1])[1] == "acceptable"

    batch = data.calibration_inputs("cola", tmp_path, 5, _char_tokenize, seed=3, max_length=200,
                                    max_target_length=16)
    assert batch["input_ids"].shape == (5, 200) and batch["decoder_input_ids"].shape == (5, 16)
    # rows are 5 distinct train examples, each with its own prompt and answer
    prompts = {tuple(r[m == 1]) for r, m in zip(batch["input_ids"], batch["attention_mask"])}
    every = {tuple(_char_tokenize(data.format_input("cola", {"sentence": s})))[:200]: lab
             for s, lab in zip(sentences, labels)}
    assert len(prompts) == 5 and prompts <= set(every)
    for row, dec in zip(batch["input_ids"], batch["decoder_input_ids"]):
        key = tuple(row[row != 0])
        answer = data.format_target("cola", every[key])
        want = [0, *_char_tokenize(answer)[:-1]]
        np.testing.assert_array_equal(dec[: len(want)], want)
    again = data.calibration_inputs("cola", tmp_path, 5, _char_tokenize, seed=3, max_length=200,
                                    max_target_length=16)
    np.testing.assert_array_equal(again["input_ids"], batch["input_ids"])  # seeded


def test_evaluate_glue_end_to_end_with_a_scripted_model(tmp_path):
    from epmq_jax.data import tfds_local

    tfds_local.write_local_dataset("sst2", tmp_path / "glue", {"validation": {
        "sentence": ["a good film", "a bad film", "good acting", "dull", "good grief"],
        "label": np.array([1, 0, 1, 0, 0])}}, num_classes={"label": 2})
    tfds_local.write_local_dataset("stsb", tmp_path / "glue", {"validation": {
        "sentence1": ["s1", "s2", "s3", "s4"], "sentence2": ["4.0", "1.5", "x", "2.0"],
        "label": np.array([3.8, 1.0, 2.5, 3.0], np.float32)}})

    tokenize = lambda s: [ord(c) + 2 for c in s] + [1]
    decode = lambda ids: "".join(chr(i - 2) for i in ids)

    def generate(ids, mask):  # answers from the prompt text: "good" -> positive; stsb: sentence2
        rows = []
        for row, m in zip(ids, mask):
            prompt = decode(row[m == 1][:-1])
            if prompt.startswith("Consider"):
                answer = prompt.split("and '")[1].split("'")[0]
            else:
                answer = "positive" if "good" in prompt else "negative."
            rows.append([0, *tokenize(answer)] + [0] * 12)
        width = max(map(len, rows))
        return np.array([r + [0] * (width - len(r)) for r in rows])

    res = metrics.evaluate_glue(generate, tokenize, decode, ["sst2", "stsb"], tmp_path,
                                max_length=200, batch_size=2)
    assert res["sst2"]["accuracy"] == 0.8 and res["sst2"]["score"] == 0.8 and res["sst2"]["n"] == 5
    pred = [4.0, 1.5, 0.0, 2.0]  # "x" is unparsed -> 0.0
    assert res["stsb"]["unparsed"] == 1
    assert res["stsb"]["score"] == pytest.approx(scipy.stats.spearmanr(pred, [3.8, 1.0, 2.5, 3.0])[0])
    limited = metrics.evaluate_glue(generate, tokenize, decode, ["sst2"], tmp_path,
                                    max_length=200, batch_size=2, limit=2)
    assert limited["sst2"]["n"] == 2 and limited["sst2"]["accuracy"] == 1.0

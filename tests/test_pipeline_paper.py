"""The paper configs end to end through the one runner, on tiny random stand-ins of their pools, offline.

For CLIP and for T5: a base checkpoint and two experts (the base with perturbed weights) saved
with transformers' ``save_pretrained``, a word-level tokenizer built with the ``tokenizers``
library, two tasks written as local tfds datasets. Every paper config file is run as a user
would (``epmq run --config configs/<paper>.py --config.model_pool.base=... ...``), then
``epmq merge``, ``epmq quantize`` and ``epmq eval`` on its results. Independent checks: the FP
expert row equals accuracies computed here with the PyTorch reference models (CLIP), the merge
equals the task-arithmetic formula on the torch weights, and a checkpoint reloads to its
recorded row.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from epmq_jax.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0..3


def _word_tokenizer(texts, path, *, bos: bool):
    """A word-level fast tokenizer over the words of ``texts`` (lower-cased), saved to ``path``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(s, vocab[s]) for s in ("<s>", "</s>")])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", bos_token="<s>")
    fast.save_pretrained(path)
    return len(vocab)


def _perturbed(model, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def _shrink(cfg, tasks, base, experts, data_dir, *, group):
    cfg.model_pool.base = str(base)
    cfg.model_pool.experts = {t: str(p) for t, p in zip(tasks, experts)}
    cfg.data.tasks = tuple(tasks)
    cfg.data.data_dir = str(data_dir)
    cfg.merge.methods = ("ta",)
    cfg.quant.update(dict(bits=(4,), methods=("gptq", "epmq"), group_size=group))
    cfg.calib.update(dict(n_per_task=8, batch_size=8, lam_sweep=(0.1,), ablations=(), unrounded=False))
    cfg.eval.update(dict(batch_size=8, progress=False))
    cfg.run.update(dict(mesh="", resume=False))


def _overrides(tasks, base, experts, data_dir, *, group, extra=()):
    """The command-line form of :func:`_shrink` (what a user types)."""
    return [f"--config.model_pool.base={base}", *(f"--config.model_pool.experts.{t}={p}"
                                                   for t, p in zip(tasks, experts)),
            f"--config.data.tasks={','.join(tasks)}", f"--config.data.data_dir={data_dir}",
            "--config.quant.bits=4", "--config.quant.methods=gptq,epmq", f"--config.quant.group_size={group}",
            "--config.calib.n_per_task=8", "--config.calib.batch_size=8", "--config.calib.lam_sweep=0.1",
            "--config.calib.ablations=", "--config.eval.batch_size=8", "--config.eval.progress=false",
            "--config.run.mesh=", *extra]


def _check_rows(doc, tasks):
    rows = {(r["merge"], r["method"], r["bits"]): r for r in doc["rows"]}
    for key in [("expert", "fp", None), ("ta", "fp", None), ("ta", "gptq", 4), ("ta", "epmq", 4)]:
        assert key in rows, f"no row {key}: {sorted(rows, key=str)}"
        r = rows[key]
        assert list(r["per_task"]) == list(tasks)
        assert all(0.0 <= a <= 100.0 for a in r["per_task"].values())
        assert r["merge_scaling"] == (None if key[0] == "expert" else 0.3)
    assert rows[("ta", "epmq", 4)]["default"] and rows[("ta", "epmq", 4)]["lam"] == 0.1
    return rows


# ----------------------------------------------------------------------------- CLIP


CLIP_TASKS = ("mnist", "eurosat")


def _clip_prompts():
    from epmq_jax.models.templates import TASKS

    return [tpl.format(c=c) for t in CLIP_TASKS for c in TASKS[t].classnames for tpl in TASKS[t].templates]


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
    from epmq_jax.data import tfds_local

    root = tmp_path_factory.mktemp("hf_clip")
    vocab = _word_tokenizer(_clip_prompts(), root / "base", bos=True)
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=20, pad_token_id=0,
                         eos_token_id=1, bos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=16, patch_size=8),
        projection_dim=16)
    base = transformers.CLIPModel(cfg).eval()
    base.save_pretrained(root / "base")
    experts = []
    for i, task in enumerate(CLIP_TASKS):  # FusionBench-style: vision tower only, no projection
        ev = transformers.CLIPVisionModel(cfg.vision_config)
        ev.load_state_dict(base.vision_model.state_dict())
        _perturbed(ev, seed=i + 1).eval().save_pretrained(root / task)
        experts.append(root / task)

    rng = np.random.default_rng(0)
    data = root / "data"
    for task in CLIP_TASKS:
        splits = {s: {"image": rng.integers(0, 256, (n, 20, 24, 3), dtype=np.uint8),
                      "label": rng.integers(0, 10, n)}
                  for s, n in (("train", 16), ("validation", 8), ("test", 12))}
        name = "mnist" if task == "mnist" else f"epmq_{task}"  # a tfds name and a local fallback
        if task == "mnist":
            splits.pop("validation")
        tfds_local.write_local_dataset(name, data, splits, num_classes={"label": 10})
    return root, base, experts, data


def _torch_accuracy(base, vision, tokenizer_dir, task, data, split="test"):
    """Zero-shot accuracy with transformers alone: processor, text tower, expert vision tower."""
    from epmq_jax.data import registry
    from epmq_jax.models.templates import TASKS

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    spec = TASKS[task]
    cols = []
    with torch.no_grad():
        for c in spec.classnames:
            enc = tok([t.format(c=c) for t in spec.templates], padding="max_length", max_length=20,
                      return_tensors="pt")
            e = base.get_text_features(**enc).pooler_output.double()
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            cols.append(m / m.norm())
        head = torch.stack(cols, 1)
        split = registry.load_task_split(task, split, data)
        pix = proc(images=list(split["image"]), return_tensors="pt")["pixel_values"]
        feats = base.visual_projection(vision(pixel_values=pix).pooler_output).double()
        pred = (feats @ head).argmax(-1).numpy()
    return 100.0 * np.mean(pred == split["label"])


def test_clip_run_writes_rows_matching_torch_and_checkpoints_reload(clip_setup, tmp_path, capsys):
    from epmq_jax import pipeline

    root, base, experts, data = clip_setup
    cfg = load_config(CONFIGS / "clip_vit_b32_ta8.py")
    cfg.data.image_size = 16
    _shrink(cfg, CLIP_TASKS, root / "base", experts, data, group=32)
    doc = pipeline.run(cfg, tmp_path / "run", plots=False, log=lambda _: None)
    rows = _check_rows(doc, CLIP_TASKS)

    # FP experts and FP merge against transformers' models and the TA formula on torch weights
    for task, path in zip(CLIP_TASKS, experts):
        vision = transformers.CLIPVisionModel.from_pretrained(path).eval()
        want = _torch_accuracy(base, vision, root / "base", task, data)
        assert rows[("expert", "fp", None)]["per_task"][task] == pytest.approx(want)
    merged = transformers.CLIPVisionModel(base.config.vision_config)
    sd = base.vision_model.state_dict()
    ex = [transformers.CLIPVisionModel.from_pretrained(p).state_dict() for p in experts]
    merged.load_state_dict({k: v + 0.3 * sum(e[k] - v for e in ex) for k, v in sd.items()})
    for task in CLIP_TASKS:
        want = _torch_accuracy(base, merged.eval(), root / "base", task, data)
        assert rows[("ta", "fp", None)]["per_task"][task] == pytest.approx(want)

    out = tmp_path / "run"
    for f in ("results.json", "results.md", "results.csv", "metrics.json", "solver_stats/ta_gptq_w4.json"):
        assert (out / f).is_file(), f
    assert set(doc["checkpoints"]) == {"ta_gptq_w4", "ta_epmq_w4"}
    # the packed checkpoint reloads with QuantizedWeight leaves and reproduces its row
    from epmq_jax.quant import is_quantized

    meta, _, _, _, params = pipeline.load_checkpoint(doc["checkpoints"]["ta_epmq_w4"])
    q = params["encoder"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert is_quantized(q) and q.bits == 4 and meta["row"] == rows[("ta", "epmq", 4)]
    assert not is_quantized(params["embeddings"]["patch_embedding"]["kernel"])
    result = pipeline.eval_checkpoint(doc["checkpoints"]["ta_epmq_w4"], log=lambda _: None)
    assert result["matches_recorded"]
    # `epmq eval --checkpoint` takes it too
    from epmq_jax import cli

    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", doc["checkpoints"]["ta_gptq_w4"]]) == 0
    out, err = capsys.readouterr()
    assert "reproduces the recorded row" in out and "GPTQ w4" in out and err == ""


def test_merge_coefficient_chosen_on_validation(clip_setup, tmp_path):
    from epmq_jax import pipeline
    from epmq_jax.pipeline import stages

    root, base, experts, data = clip_setup
    cfg = load_config(CONFIGS / "clip_vit_b32_ta8.py")
    cfg.data.image_size = 16
    _shrink(cfg, ("eurosat",), root / "base", experts[1:], data, group=32)
    cfg.merge.scaling = None
    cfg.merge.scalings = (0.5, 3.0)
    ctx, mp, tp = pipeline.start(cfg, tmp_path, log=lambda _: None)
    sd = base.vision_model.state_dict()
    ex = transformers.CLIPVisionModel.from_pretrained(experts[1]).state_dict()
    val = {}
    for s in cfg.merge.scalings:  # validation accuracy of each candidate with transformers
        merged = transformers.CLIPVisionModel(base.config.vision_config)
        merged.load_state_dict({k: v + s * (ex[k] - v) for k, v in sd.items()})
        val[s] = _torch_accuracy(base, merged.eval(), root / "base", "eurosat", data, "validation")
    want = max(val, key=lambda s: (val[s], -s))
    assert stages.merge_method(ctx, mp, tp, "ta", mp.calibration_inputs).scaling == want
    # the zero-shot heads as E-PMQ-full's `heads` piece reads them: unit columns, one per task
    [u] = tp.readout_heads()
    h = np.asarray(tp.heads["eurosat"], np.float64)
    assert u.shape == h.shape and u.shape[0] == base.config.projection_dim
    np.testing.assert_allclose(u, h / np.linalg.norm(h, axis=0), rtol=1e-5, atol=1e-6)


def test_quant_filter_must_match_the_adapter(clip_setup, tmp_path):
    from epmq_jax import pipeline

    root, _, experts, data = clip_setup
    cfg = load_config(CONFIGS / "clip_vit_b32_ta8.py")
    cfg.data.image_size = 16
    _shrink(cfg, CLIP_TASKS, root / "base", experts, data, group=32)
    cfg.quant.filter = r"mlp/fc1/kernel"
    with pytest.raises(ValueError, match="quant.filter"):
        pipeline.run(cfg, tmp_path / "run", plots=False, log=lambda _: None)


# ----------------------------------------------------------------------------- T5


T5_TASKS = ("sst2", "rte")


@pytest.fixture(scope="module")
def t5_setup(tmp_path_factory):
    from epmq_jax.data import glue, tfds_local

    root = tmp_path_factory.mktemp("hf_t5")
    sentences = [f"the film number {i} was {w}" for i, w in enumerate(["good", "bad", "fine", "dull"] * 4)]
    data = root / "data"
    texts = []
    for task in T5_TASKS:
        spec = glue.get_task(task)
        labels = np.arange(16) % 2
        cols = {f: [f"{s} {f}" for s in sentences] for f in spec.fields}
        tfds_local.write_local_dataset(task, data / "glue", {
            "train": {**cols, "label": labels},
            "validation": {**{f: v[:8] for f, v in cols.items()}, "label": labels[:8]}},
            num_classes={"label": 2})
        texts += [glue.format_input(spec, {f: cols[f][i] for f in spec.fields}) for i in range(16)]
        texts += list(spec.label_words)
    vocab = _word_tokenizer(texts, root / "base", bos=False)
    cfg = transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(cfg).eval()
    base.save_pretrained(root / "base")
    experts = []
    for i, task in enumerate(T5_TASKS):
        _perturbed(transformers.T5ForConditionalGeneration.from_pretrained(root / "base"), seed=i + 1
                   ).save_pretrained(root / task)
        experts.append(root / task)
    return root, experts, data


def test_t5_run_writes_rows_and_checkpoints_reload(t5_setup, tmp_path):
    from epmq_jax import pipeline
    from epmq_jax.pipeline import stages
    from epmq_jax.quant import is_quantized

    root, experts, data = t5_setup
    cfg = load_config(CONFIGS / "flan_t5_base_glue.py")
    _shrink(cfg, T5_TASKS, root / "base", experts, data, group=32)
    cfg.model_pool.tokenizer = str(root / "base")
    cfg.data.update(dict(max_length=48, max_target_length=4))
    cfg.eval.max_new_tokens = 3
    doc = pipeline.run(cfg, tmp_path / "run", plots=False, log=lambda _: None)
    rows = _check_rows(doc, T5_TASKS)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name, row in (("expert_fp", rows[("expert", "fp", None)]), ("ta_gptq_w4", rows[("ta", "gptq", 4)])):
        for task in T5_TASKS:
            assert metrics[name][task]["n"] == 8
            assert row["per_task"][task] == pytest.approx(100 * metrics[name][task]["accuracy"])
    stats = json.loads((tmp_path / "run" / "solver_stats" / "ta_epmq_w4.json").read_text())
    assert len(stats) == 7 + 11  # encoder block: q, k, v, o, wi_0, wi_1, wo; decoder + q, k, v, o
    params = pipeline.load_checkpoint(doc["checkpoints"]["ta_gptq_w4"])[-1]
    assert is_quantized(params["decoder"]["block"][0]["layer"][1]["EncDecAttention"]["k"]["kernel"])
    assert not is_quantized(params["shared"]["embedding"])
    assert pipeline.eval_checkpoint(doc["checkpoints"]["ta_gptq_w4"], log=lambda _: None)["matches_recorded"]
    cfg.merge.scaling = None  # GLUE's validation split is the evaluation split: no selection on it
    ctx, mp, tp = pipeline.start(cfg, tmp_path / "select", log=lambda _: None)
    with pytest.raises(ValueError, match="merge.scaling"):
        stages.merge_method(ctx, mp, tp, "ta", mp.calibration_inputs)


@pytest.mark.parametrize("config", ["clip_vit_b32_ta8", "clip_vit_b32_ties8", "clip_vit_b32_ta14",
                                    "clip_vit_l14_ta20", "flan_t5_base_glue"])
def test_every_subcommand_takes_every_paper_config(config, clip_setup, t5_setup, tmp_path, capsys):
    """`epmq run`, `merge`, `quantize` and `eval` on each paper config file, its pools pointed at the
    tiny stand-ins by command-line overrides (as a user would point them at local checkpoints)."""
    from epmq_jax import cli, report

    if config.startswith("clip"):
        root, _, experts, data = clip_setup
        tasks, extra = CLIP_TASKS, ["--config.data.image_size=16"]
    else:
        root, experts, data = t5_setup
        tasks = T5_TASKS
        extra = [f"--config.model_pool.tokenizer={root / 'base'}", "--config.data.max_length=48",
                 "--config.data.max_target_length=4", "--config.eval.max_new_tokens=3"]
    args = ["--config", str(CONFIGS / f"{config}.py"), "--workdir", str(tmp_path / "w"),
            *_overrides(tasks, root / "base", experts, data, group=32, extra=extra)]
    merge = "ties" if "ties" in config else "ta"
    assert cli.main(["run", "--no-plots", *args, "--config.merge.methods=" + merge]) == 0
    doc = report.read_json(tmp_path / "w" / "results.json")
    names = {(r["merge"], r["method"], r["bits"]) for r in doc["rows"]}
    assert {("expert", "fp", None), (merge, "fp", None), (merge, "gptq", 4), (merge, "epmq", 4)} <= names
    assert cli.main(["merge", *args, "--method", merge]) == 0
    out = tmp_path / "q"
    assert cli.main(["quantize", *args, "--merge", merge, "--method", "gptq", "--bits", "4",
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    assert "reproduces the recorded row" in capsys.readouterr().out
    gptq = next(r for r in doc["rows"] if r["merge"] == merge and r["method"] == "gptq")
    assert json.loads((out / "meta.json").read_text())["row"]["per_task"] == gptq["per_task"]

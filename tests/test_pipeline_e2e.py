"""End to end: `epmq run` at a tiny size, its outputs, E-PMQ vs GPTQ on the expert objective, and the reload."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from epmq_jax import cli, pipeline, report
from epmq_jax.config import load_with_overrides
from epmq_jax.quant import is_quantized

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "offline_8task.py") + ":tiny"


def tiny_cfg():
    return load_with_overrides(CONFIG)


def test_plan_has_every_row_of_the_table():
    cfg = tiny_cfg()
    with cfg.unlocked():
        cfg.merge.methods = ("ta", "ties", "regmean")
        cfg.quant.bits = (4, 3)
        cfg.quant.methods = ("rtn", "gptq", "awq", "epmq")
        cfg.quant.methods_by_merge = {"regmean": ("gptq", "epmq")}
        cfg.calib.lam = 0.1
        cfg.calib.lam_sweep = (0.0, 0.1, 1.0)
        cfg.calib.ablations = ("target=merged", "target=mix", "anchor=weight", "rounding=rtn")
        cfg.calib.sweep_merge, cfg.calib.sweep_bits = "ta", 4
        cfg.calib.full.merges = ("ta", "ties")
        cfg.calib.full.pieces = ("bias", "anchor")
        cfg.calib.full.piece_bits = (4,)
    plan = pipeline.plan(cfg)
    full = [v.name for v in plan if v.method.startswith("epmq_full")]
    names = [v.name for v in plan if not v.method.startswith("epmq_full")]
    assert names[0] == "expert_fp"
    for merge in ("ta", "ties"):
        assert f"{merge}_fp" in names and f"{merge}_epmq_unrounded" in names
        for bits in (4, 3):
            for m in ("rtn", "gptq", "awq", "epmq"):
                assert f"{merge}_{m}_w{bits}" in names
    regmean = [n for n in names if n.startswith("regmean_")]
    assert regmean == ["regmean_fp", "regmean_epmq_unrounded", "regmean_gptq_w4", "regmean_epmq_w4",
                       "regmean_gptq_w3", "regmean_epmq_w3"]
    assert [n for n in names if "_lam" in n] == ["ta_epmq_w4_lam0", "ta_epmq_w4_lam1"]  # default λ not twice
    assert names[-4:] == ["ta_epmq_w4_target-merged", "ta_epmq_w4_target-mix", "ta_epmq_w4_anchor-weight",
                          "ta_epmq_w4_rounding-rtn"]
    assert len(names) == len(set(names)) == 1 + 2 * (2 + 8) + (2 + 4) + 2 + 4
    # E-PMQ-full after them: per merge its default at every width and unrounded, then every
    # piece alone (and none) at piece_bits and unrounded
    assert full == [f"{m}_{name}" for m in ("ta", "ties") for name in (
        "epmq_full_w4", "epmq_full_w3", "epmq_full_unrounded",
        *(f"epmq_full_{w}_{p}" for p in ("none", "bias", "anchor") for w in ("w4", "unrounded")))]
    assert [v.default for v in plan if v.method.startswith("epmq_full")] == ([True] * 3 + [False] * 6) * 2
    assert [v.piece for v in plan if v.name.startswith("ties_epmq_full")] == ["all"] * 3 + [
        p for p in ("none", "bias", "anchor") for _ in range(2)]
    mix = [v for v in pipeline.plan(cfg) if v.tag == "target-mix"][0]
    assert mix.sw["alpha"] == cfg.calib.alpha and mix.sw["lam"] == 0.1
    assert [v for v in pipeline.plan(cfg) if v.tag == "anchor-weight"][0].sw["alpha"] is None


@pytest.mark.parametrize("text", ["target", "speed=1", "target=mix,"])
def test_bad_ablation_is_rejected(text):
    with pytest.raises(ValueError, match="calib.ablations item"):
        pipeline.parse_ablation(text)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny `epmq run` (through the CLI entry point), shared by the checks below: the narrow
    regime, then its companion config, the broad regime. ``COMPILES`` gets each config's number
    of XLA compilations."""
    from jax import monitoring

    from epmq_jax.pipeline import runner

    workdir = tmp_path_factory.getbasetemp() / "epmq_tiny_run"
    events = []
    monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_: events.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    real = runner._run_config

    def counted(ctx, *args, **kwargs):
        before = len(events)
        doc = real(ctx, *args, **kwargs)
        COMPILES[ctx.cfg.name] = len(events) - before
        return doc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "_run_config", counted)
        assert cli.main(["run", "--config", CONFIG, "--workdir", str(workdir)]) == 0
    return workdir, report.read_json(workdir / "results.json")


COMPILES: dict[str, int] = {}


def test_results_shape(tiny_run):
    workdir, doc = tiny_run
    cfg = tiny_cfg()
    tasks = list(cfg.suite.tasks)
    rows = doc["rows"]
    assert [(r["merge"], r["method"], r["bits"], r["block"]) for r in rows] == [
        (v.merge, v.method, v.bits, v.block) for v in pipeline.plan(cfg, has_multitask=True)]
    assert cfg.model_pool.multitask and rows[1]["merge"] == "multitask"  # beside the experts
    for r in rows:
        assert list(r["per_task"]) == tasks
        assert r["avg"] == pytest.approx(np.mean(list(r["per_task"].values())))
    defaults = [(r["merge"], r["bits"]) for r in rows if r["default"] and r["method"] == "epmq"]
    assert sorted(defaults) == sorted((m, b) for m in cfg.merge.methods for b in cfg.quant.bits)
    full = [(r["merge"], r["method"], r["bits"]) for r in rows if r["default"] and r["method"].startswith("epmq_full")]
    assert full == [x for m in cfg.calib.full.merges
                    for x in [*((m, "epmq_full", b) for b in cfg.quant.bits), (m, "epmq_full_unrounded", None)]]
    assert {r["settings"]["full_piece"] for r in rows if r["block"] == "full"} == {"none", *cfg.calib.full.pieces}
    assert {"python", "jax", "flax", "numpy"} <= set(doc["versions"])
    assert {"train", "merge", "calibrate", "evaluate_validation", "evaluate_test", "total",
            "cpu_total"} <= set(doc["timings"])
    assert report.read_csv(workdir / "results.csv") == rows
    assert "| variant |" in (workdir / "results.md").read_text()
    for png in ("lambda_sweep.png", "per_task.png", "accuracy_vs_bits.png"):
        assert (workdir / png).stat().st_size > 10_000
    stats = json.loads((workdir / "solver_stats" / "ta_epmq_w4.json").read_text())
    assert stats and {"path", "rel_dist", "damp", "obj_relaxed", "obj_rounded"} <= set(stats[0])


def test_the_broad_regime_runs_as_the_main_jobs_companion(tiny_run):
    """The main job's default config runs the broad regime after the narrow one (run.companions):
    into WORKDIR/offline_8task_broad/ with every file a run of its own writes, every row of its
    plan, and its rows in the main results.json / results.md; in the same process, so it
    compiles almost nothing the narrow regime did not."""
    workdir, doc = tiny_run
    broad_cfg = load_with_overrides(str(ROOT / "configs" / "offline_8task_broad.py") + ":tiny")
    sub = workdir / "offline_8task_broad"
    broad = report.read_json(sub / "results.json")
    assert doc["config"]["suite"]["regime"] == "narrow" and broad["config"]["suite"]["regime"] == "broad"
    assert broad["config"]["suite"]["pretrain_n"] == broad_cfg.suite.pretrain_n   # the tiny size
    assert [(r["merge"], r["method"], r["bits"], r["block"]) for r in broad["rows"]] == [
        (v.merge, v.method, v.bits, v.block) for v in pipeline.plan(broad_cfg, has_multitask=True)]
    for f in ("results.md", "results.csv", "metrics.json", "per_task.png", "solver_stats/ta_epmq_w4.json"):
        assert (sub / f).is_file(), f
    assert report.read_csv(sub / "results.csv") == broad["rows"]
    assert Path(broad["checkpoints"]["ta_epmq_w4"]).parent == sub / "checkpoints"
    # one training cache for the job: the broad models are cached beside the narrow ones
    assert broad["config"]["run"]["cache_dir"] == str((workdir / "cache").resolve())
    assert len(list((workdir / "cache").glob("pretrained-*"))) == 2
    # the main results.json: its own rows as before, the companion's under its name
    entry = doc["companions"]["offline_8task_broad"]
    assert entry["rows"] == broad["rows"] and entry["timings"] == broad["timings"]
    assert entry["config"].endswith("offline_8task_broad.py:tiny") and entry["results"] == str(
        Path("offline_8task_broad") / "results.json")
    assert doc["rows"] != broad["rows"] and doc["job_timings"]["total"] >= doc["timings"]["total"]
    md = (workdir / "results.md").read_text()
    assert md.index("## offline_8task: narrow") < md.index("## offline_8task_broad: broad")
    variant_lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith(("| variant", "| step"))
                     and "|---" not in ln and not ln.startswith(tuple(f"| {k} |" for k in doc["timings"]))]
    n_shown = sum(len(blk) for rows in (doc["rows"], broad["rows"]) for _, _, blk in report.table_blocks(rows))
    assert len(variant_lines) == n_shown
    # compiled functions reused: alone in a fresh process the tiny regime compiles ~360 programs;
    # after the narrow regime the broad one compiles only what differs (its pretraining heads)
    assert "offline_8task" in COMPILES and COMPILES["offline_8task_broad"] <= 30, COMPILES


def test_reloaded_checkpoint_reproduces_its_row_exactly(tiny_run, capsys):
    workdir, doc = tiny_run
    ckpt = Path(doc["checkpoints"]["ta_epmq_w4"])
    assert cli.main(["eval", "--checkpoint", str(ckpt)]) == 0
    assert "reproduces the recorded row" in capsys.readouterr().out
    result = pipeline.eval_checkpoint(ckpt)
    recorded = next(r for r in doc["rows"] if r["merge"] == "ta" and r["method"] == "epmq" and r["default"]
                    and r["bits"] == 4)
    assert result["row"]["per_task"] == recorded["per_task"]
    # the encoder really is packed: every calibrated kernel is a 4-bit QuantizedWeight
    params = pipeline.load_checkpoint(ckpt)[-1]
    qws = [x for x in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(x)]
    assert len(qws) == 6 * tiny_cfg().model.num_hidden_layers
    assert all(q.bits == 4 and q.packed.dtype == np.uint8 for q in qws)


def test_regmean_rows_record_their_settings(tiny_run):
    """RegMean is a merge like TA: its α was chosen on validation and every row says how it was made."""
    _, doc = tiny_run
    rows = [r for r in doc["rows"] if r["merge"] == "regmean"]
    assert [(r["method"], r["bits"]) for r in rows] == [("fp", None), ("epmq_unrounded", None), ("gptq", 4),
                                                         ("epmq", 4)]
    alphas = {r["settings"]["alpha"] for r in rows}
    validation = doc["merges"]["regmean"]["validation"]
    assert len(alphas) == 1 and set(validation) == {"0.5", "1.0"}
    chosen = max(validation.items(), key=lambda kv: (kv[1], -float(kv[0])))[0]
    assert rows[0]["settings"]["alpha"] == float(chosen)
    assert all(r["settings"]["gram_source"] == "expert" for r in rows)


def _capture(model_pool, params, images):
    """Every linear layer's input (float64 rows) in one forward pass of ``params``."""
    from epmq_jax.calib import capture_nnx

    _, caps = capture_nnx(model_pool.graphdef, params, lambda m, x: m.get_image_features(x), images)
    return {k: np.asarray(v, np.float64).reshape(-1, v.shape[-1]) for k, v in caps.items()}


def test_reported_epmq_objective_matches_a_float64_recomputation(tiny_run):
    """The solver statistics of block 0's q/k/v (whose inputs no earlier quantized layer touches)
    give L(Q) = Σ_t ω_t‖X_t Q − X̃_t W_t‖² + λ Σ_t ω_t‖X_t (Q − W_m)‖² of the saved 4-bit E-PMQ
    kernel; recomputed here in float64 from the models, the calibration images and the checkpoint."""
    workdir, doc = tiny_run
    cfg = tiny_cfg()
    _, mp, _ = pipeline.start(cfg, workdir)     # the trained models come from the cache
    row = next(r for r in doc["rows"] if r["merge"] == "ta" and r["method"] == "fp")
    merged = pipeline.merge_trees(cfg.merge, mp.base(), mp.experts(), "ta", row["merge_scaling"])
    q_tree = pipeline.dequantize_tree(pipeline.load_checkpoint(doc["checkpoints"]["ta_epmq_w4"])[-1])
    inputs = mp.calibration_inputs()
    xs = [_capture(mp, merged, x) for x in inputs]
    xts = [_capture(mp, e, x) for e, x in zip(mp.experts(), inputs)]
    stats = {s["path"]: s for s in json.loads((workdir / "solver_stats" / "ta_epmq_w4.json").read_text())}
    lam = cfg.calib.lam

    def kernel(tree, path):
        node = tree
        for k in path.split("/"):
            node = node[int(k) if k.isdigit() else k]
        return np.asarray(node, np.float64)

    for name in ("q_proj", "k_proj", "v_proj"):
        path = f"encoder/layers/0/self_attn/{name}/kernel"
        x = [c[path] for c in xs]
        omega = [1.0 / np.linalg.norm(xi.T @ xi) for xi in x]
        q, w_m = kernel(q_tree, path), kernel(merged, path)
        value = sum(o * (np.sum((xi @ q - c[path] @ kernel(e, path)) ** 2) + lam * np.sum((xi @ (q - w_m)) ** 2))
                    for o, xi, c, e in zip(omega, x, xts, mp.experts()))
        assert stats[path]["obj_rounded"] == pytest.approx(value, rel=2e-3), name


def test_default_full_row_reuses_only_the_selections_identical_calibration(tiny_run):
    """E-PMQ-full's selection calibrates the chosen setting at select_bits; the default row at those
    bits takes that calibration (the same driver config) and no other row does. Calibrated again
    from scratch, the row's model has the same kernels and scores the recorded row."""
    from epmq_jax.pipeline import stages
    from epmq_jax.pipeline.runner import Runner

    workdir, doc = tiny_run
    cfg = tiny_cfg()
    with cfg.unlocked():
        cfg.run.companions = ()
    ctx, mp, tp = pipeline.start(cfg, workdir)          # the trained models come from the cache
    runner = Runner(ctx, mp, tp)
    choice = runner.full_choice("ta")
    assert choice.settings() == doc["full_selection"]["ta"]["chosen"]
    full = {v.name: runner.resolve(v) for v in pipeline.plan(cfg) if v.method.startswith("epmq_full")}
    reusable = {n for n, v in full.items() if choice.reusable(stages.calib_config(cfg, v, choice)[0]) is not None}
    assert reusable == {f"ta_epmq_full_w{cfg.calib.full.select_bits}"}
    v = full["ta_epmq_full_w4"]
    merged = runner.merged("ta").params
    fresh, _, _ = stages.calibrate_variant(ctx, mp, v, merged, runner.calib_inputs(), full=choice,
                                           task_pool=tp)
    reused = choice.calibrated.params
    a, b = pipeline.dequantize_tree(fresh), pipeline.dequantize_tree(reused)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    row = next(r for r in doc["rows"] if r["method"] == "epmq_full" and r["bits"] == 4 and r["merge"] == "ta"
               and r["default"])
    got = {t: s["score"] for t, s in tp.evaluate(a, "test").items()}
    for t, acc in row["per_task"].items():      # the same model: at most one tie flips
        assert abs(got[t] - acc) <= 100.0 / cfg.suite.n_test + 1e-9, t


def test_merge_and_quantize_subcommands(tiny_run, tmp_path, capsys):
    """`epmq merge` / `epmq quantize` reuse the run's training cache and write checkpoints `epmq eval` reloads."""
    workdir, doc = tiny_run
    ta = next(r for r in doc["rows"] if r["merge"] == "ta" and r["method"] == "fp")
    assert cli.main(["merge", "--config", CONFIG, "--workdir", str(workdir), "--method", "ta",
                     "--scaling", str(ta["merge_scaling"])]) == 0
    assert "FP merge" in capsys.readouterr().out
    merged = pipeline.eval_checkpoint(workdir / "checkpoints" / "ta_fp")
    assert merged["row"]["per_task"] == ta["per_task"]   # same merge, same numbers as in the run
    out = tmp_path / "q"
    assert cli.main(["quantize", "--config", CONFIG, "--workdir", str(workdir), "--merge", "ta",
                     "--method", "epmq", "--bits", "4", "--out", str(out),
                     f"--config.merge.scaling={ta['merge_scaling']}"]) == 0
    again = pipeline.eval_checkpoint(out)
    assert again["matches_recorded"] and again["row"]["per_task"] == again["recorded"]["per_task"]
    epmq = next(r for r in doc["rows"] if r["merge"] == "ta" and r["method"] == "epmq" and r["default"])
    assert again["row"]["avg"] == pytest.approx(epmq["avg"], abs=2.0)  # the same recipe as in the run

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
        cfg.merge.methods = ("ta", "ties")
        cfg.quant.bits = (4, 3)
        cfg.quant.methods = ("rtn", "gptq", "awq", "epmq")
        cfg.calib.lam = 0.1
        cfg.calib.lam_sweep = (0.0, 0.1, 1.0)
        cfg.calib.ablations = ("target=merged", "target=mix", "anchor=weight", "rounding=rtn")
        cfg.calib.sweep_merge, cfg.calib.sweep_bits = "ta", 4
        cfg.calib.regmean = True
    names = [v.name for v in pipeline.plan(cfg)]
    assert names[:2] == ["expert_fp", "regmean_fp"]
    for merge in ("ta", "ties"):
        assert f"{merge}_fp" in names and f"{merge}_epmq_unrounded" in names
        for bits in (4, 3):
            for m in ("rtn", "gptq", "awq", "epmq"):
                assert f"{merge}_{m}_w{bits}" in names
    assert [n for n in names if "_lam" in n] == ["ta_epmq_w4_lam0", "ta_epmq_w4_lam1"]  # default λ not twice
    assert names[-4:] == ["ta_epmq_w4_target-merged", "ta_epmq_w4_target-mix", "ta_epmq_w4_anchor-weight",
                          "ta_epmq_w4_rounding-rtn"]
    assert len(names) == len(set(names)) == 2 + 2 * (2 + 8) + 2 + 4
    mix = [v for v in pipeline.plan(cfg) if v.tag == "target-mix"][0]
    assert mix.sw["alpha"] == cfg.calib.alpha and mix.sw["lam"] == 0.1
    assert [v for v in pipeline.plan(cfg) if v.tag == "anchor-weight"][0].sw["alpha"] is None


@pytest.mark.parametrize("text", ["target", "speed=1", "target=mix,"])
def test_bad_ablation_is_rejected(text):
    with pytest.raises(ValueError, match="calib.ablations item"):
        pipeline.parse_ablation(text)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny `epmq run` (through the CLI entry point), shared by the checks below."""
    workdir = tmp_path_factory.getbasetemp() / "epmq_tiny_run"
    assert cli.main(["run", "--config", CONFIG, "--workdir", str(workdir)]) == 0
    return workdir, report.read_json(workdir / "results.json")


def test_results_shape(tiny_run):
    workdir, doc = tiny_run
    cfg = tiny_cfg()
    tasks = list(cfg.suite.tasks)
    rows = doc["rows"]
    assert [(r["merge"], r["method"], r["bits"], r["block"]) for r in rows] == [
        (v.merge, v.method, v.bits, v.block) for v in pipeline.plan(cfg)]
    for r in rows:
        assert list(r["per_task"]) == tasks
        assert r["avg"] == pytest.approx(np.mean(list(r["per_task"].values())))
    defaults = [(r["merge"], r["bits"]) for r in rows if r["default"]]
    assert sorted(defaults) == sorted((m, b) for m in cfg.merge.methods for b in cfg.quant.bits)
    assert {"python", "jax", "flax", "numpy"} <= set(doc["versions"])
    assert {"train", "merge", "calibrate", "evaluate_validation", "evaluate_test", "total",
            "cpu_total"} <= set(doc["timings"])
    assert report.read_csv(workdir / "results.csv") == rows
    assert "| variant |" in (workdir / "results.md").read_text()
    for png in ("lambda_sweep.png", "per_task.png", "accuracy_vs_bits.png"):
        assert (workdir / png).stat().st_size > 10_000
    stats = json.loads((workdir / "solver_stats" / "ta_epmq_w4.json").read_text())
    assert stats and {"path", "rel_dist", "damp", "obj_relaxed", "obj_rounded"} <= set(stats[0])


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
    _, _, encoder, _ = pipeline.load_checkpoint(ckpt)
    qws = [x for x in jax.tree.leaves(encoder, is_leaf=is_quantized) if is_quantized(x)]
    assert qws and all(q.bits == 4 and q.packed.dtype == np.uint8 for q in qws)


def _ln1_inputs(job, params, x):
    """Block 0's q/k/v input (after layer_norm1), rows flattened: float64 (n*tokens, d)."""
    model = job.trained.model(params)
    h = model.encoder.layers[0].layer_norm1(model.embed(x))
    return np.asarray(h, np.float64).reshape(-1, h.shape[-1])


def test_epmq_expert_objective_not_worse_than_gptq(tiny_run):
    """Σ_t ω_t ‖X_t Q − X̃_t W_t‖² (float64, X̃_t from expert t, ω_t = 1/‖X_tᵀX_t‖_F) of block 0's
    q/k/v kernels -- the layers whose inputs X_t are the same in both runs -- is no larger for the
    E-PMQ kernels than for GPTQ's."""
    workdir, doc = tiny_run
    job = pipeline.prepare(tiny_cfg(), workdir)   # the trained models come from the cache
    row = next(r for r in doc["rows"] if r["merge"] == "ta" and r["method"] == "fp")
    merged = pipeline.merge_params(job, "ta", row["merge_scaling"])
    kernels = {}
    for method in ("gptq", "epmq"):
        _, _, enc, _ = pipeline.load_checkpoint(doc["checkpoints"][f"ta_{method}_w4"])
        kernels[method] = pipeline.dequantize_tree(enc)
    xs = [_ln1_inputs(job, merged, x) for x in job.calib_inputs]
    xts = [_ln1_inputs(job, e, x) for e, x in zip(job.experts, job.calib_inputs)]
    omega = [1.0 / np.linalg.norm(x.T @ x) for x in xs]
    def layer(tree, name):
        return np.asarray(tree["encoder"]["layers"][0]["self_attn"][name]["kernel"], np.float64)

    for name in ("q_proj", "k_proj", "v_proj"):
        targets = [xt @ layer(e, name) for xt, e in zip(xts, job.experts)]

        def objective(q, targets=targets):
            return sum(w * np.sum((x @ q - y) ** 2) for w, x, y in zip(omega, xs, targets))

        l_epmq, l_gptq = objective(layer(kernels["epmq"], name)), objective(layer(kernels["gptq"], name))
        assert l_epmq <= l_gptq, (name, l_epmq, l_gptq)


def test_solver_stats_are_consistent(tiny_run):
    """Per layer, W* = H⁻¹B minimises the objective: L(W*) <= L(W_m) and L(W*) <= L(Q) (up to damping)."""
    workdir, _ = tiny_run
    for name in ("ta_epmq_w4", "ta_epmq_unrounded", "regmean_fp"):
        stats = json.loads((workdir / "solver_stats" / f"{name}.json").read_text())
        assert len(stats) == 6 * tiny_cfg().model.num_hidden_layers  # q, k, v, out, fc1, fc2 per block
        for s in stats:
            tol = 1e-3 * abs(s["obj_merged"]) + 1e-9  # the solve is damped (δ = 0.01)
            assert s["obj_relaxed"] <= s["obj_merged"] + tol, (name, s)
            assert s["obj_relaxed"] <= s["obj_rounded"] + tol, (name, s)


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

"""epmq_layer / solve_layer against NumPy float64 closed forms and the method's limit cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from epmq_jax import quant
from epmq_jax.calib import Objective, accumulate, epmq_layer, solve_layer
from epmq_jax.quant import QuantSpec

SPEC = QuantSpec(bits=4, group_size=8)


def _problem(seed=0, T=3, n=120, d_in=16, d_out=6, correlated=True):
    r = np.random.default_rng(seed)
    mix = np.eye(d_in) + (0.6 / np.sqrt(d_in)) * r.normal(size=(d_in, d_in)) * correlated
    xs = [(r.normal(size=(n + 10 * t, d_in)) @ mix * (1 + t)).astype(np.float32) for t in range(T)]
    xts = [(x + 0.3 * r.normal(size=x.shape)).astype(np.float32) for x in xs]
    base = r.normal(size=(d_in, d_out))
    ws = [(base + 0.5 * r.normal(size=(d_in, d_out))).astype(np.float32) for _ in range(T)]
    wm = np.mean(ws, 0).astype(np.float32)
    return wm, ws, xs, xts


def _ref_wstar(wm, ws, xs, xts, lam, anchor, weighting, damp):
    """Float64 transcription of issue §2a / METHOD §4, damping centred on W_m."""
    f = lambda a: np.asarray(a, np.float64)
    wm = f(wm)
    hd = np.zeros((wm.shape[0],) * 2)
    bd = np.zeros_like(wm)
    for x, xt, w in zip(xs, xts, ws):
        x, xt, w = f(x), f(xt), f(w)
        g = x.T @ x
        om = {"uniform": 1.0, "tokens": 1.0 / len(x), "frobenius": 1.0 / np.linalg.norm(g, "fro")}[weighting]
        hd += om * g
        bd += om * x.T @ (xt @ w)
    if anchor == "weight":
        c = np.mean(np.diag(hd))
        h, b = hd + lam * c * np.eye(len(hd)), bd + lam * c * wm
    else:
        h, b = (1 + lam) * hd, bd + lam * hd @ wm
    mu = np.mean(np.diag(h))
    return np.linalg.solve(h + damp * mu * np.eye(len(h)), b + damp * mu * wm), h


@pytest.mark.parametrize("anchor, weighting, target, damp", [
    ("weight", "uniform", "merged", 0.0), ("weight", "tokens", "expert", 0.05),
    ("weight", "frobenius", "expert", 0.0), ("weight", "frobenius", "merged", 0.05),
    ("output", "uniform", "expert", 0.0), ("output", "tokens", "merged", 0.0),
    ("output", "frobenius", "expert", 0.05), ("output", "frobenius", "merged", 0.0),
])
def test_relaxed_solution_matches_float64_closed_form(anchor, weighting, target, damp):
    wm, ws, xs, xts = _problem()
    lam = 0.7
    got = epmq_layer(wm, ws, xs, SPEC, xs_target=None if target == "merged" else xts, lam=lam,
                     anchor=anchor, task_weights=weighting, rounding="none", damp=damp)
    want, _ = _ref_wstar(wm, ws, xs, xs if target == "merged" else xts, lam, anchor, weighting, damp)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_mix_target_uses_alpha_blend_of_inputs():
    wm, ws, xs, xts = _problem(seed=3)
    alpha = 0.25
    mixed = [alpha * xt + (1 - alpha) * x for x, xt in zip(xs, xts)]
    obj = Objective(kind="epmq", lam=0.3, target="mix", alpha=alpha, task_weights="tokens")
    from epmq_jax.calib.objectives import target_input
    tasks = [[(x, jnp.asarray(target_input(x, xt, obj)) @ w)] for x, xt, w in zip(xs, xts, ws)]
    m, _ = accumulate(tasks, "tokens")
    got, _ = solve_layer(obj, m, wm, SPEC, rounding="none", damp=0.0)
    want, _ = _ref_wstar(wm, ws, xs, mixed, 0.3, "output", "tokens", 0.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_weight_anchor_to_infinity_gives_merged_weights():
    wm, ws, xs, xts = _problem(seed=1)
    got = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=1e7, anchor="weight", rounding="none")
    assert np.linalg.norm(np.asarray(got) - wm) / np.linalg.norm(wm) < 1e-5
    far = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=0.0, anchor="weight", rounding="none")
    assert np.linalg.norm(np.asarray(far) - wm) / np.linalg.norm(wm) > 1e-2


def test_lambda_zero_is_regmean_closed_form():
    wm, ws, xs, _ = _problem(seed=2)
    got = epmq_layer(wm, ws, xs, SPEC, lam=0.0, task_weights="uniform", rounding="none", damp=0.0)
    grams = [x.astype(np.float64).T @ x.astype(np.float64) for x in xs]
    want = np.linalg.solve(sum(grams), sum(g @ w.astype(np.float64) for g, w in zip(grams, ws)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_dead_input_keeps_merged_row():
    wm, ws, xs, xts = _problem(seed=4)
    xs = [x.copy() for x in xs]
    for x in xs:
        x[:, 3] = 0.0
    got = np.asarray(epmq_layer(wm, ws, xs, SPEC, lam=0.0, rounding="none"))
    np.testing.assert_allclose(got[3], wm[3], rtol=1e-6)
    assert np.all(np.isfinite(got))


def test_rtn_rounding_is_rtn_of_relaxed_solution():
    wm, ws, xs, xts = _problem(seed=5)
    w_star = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, rounding="none")
    q = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, rounding="rtn")
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(quant.rtn(w_star, SPEC).dequantize()))


@pytest.mark.parametrize("bad, match", [
    (dict(lam=-1.0), "lam"),
    (dict(anchor="both"), "anchor"),
    (dict(task_weights="equal"), "task_weights"),
    (dict(rounding="floor"), "rounding"),
])
def test_bad_switches_raise(bad, match):
    wm, ws, xs, _ = _problem(T=2)
    with pytest.raises(ValueError, match=match):
        epmq_layer(wm, ws, xs, SPEC, **bad)


def test_shape_mismatch_names_the_task():
    wm, ws, xs, _ = _problem(T=2)
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        epmq_layer(wm, ws, [xs[0], xs[1][:, :5]], SPEC)
    with pytest.raises(ValueError, match=r"expert_kernels\[0\]"):
        epmq_layer(wm, [ws[0].T, ws[1]], xs, SPEC)


def _gram(xs, weighting="uniform"):
    grams = [x.astype(np.float64).T @ x.astype(np.float64) for x in xs]
    om = {"uniform": [1.0] * len(xs), "frobenius": [1 / np.linalg.norm(g) for g in grams]}[weighting]
    return sum(o * g for o, g in zip(om, grams)).astype(np.float32)


def _codes_agree(a, b, frac=0.995):
    a, b = np.asarray(a.dequantize()), np.asarray(b.dequantize())
    return np.mean(np.isclose(a, b, rtol=1e-5, atol=1e-6)) >= frac


def test_output_anchor_to_infinity_is_gptq_on_merged():
    wm, ws, xs, xts = _problem(seed=6)
    q = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=1e6, anchor="output",
                   task_weights="frobenius")
    ref = quant.gptq(wm, _gram(xs, "frobenius"), SPEC)
    assert _codes_agree(q, ref)
    # and a small anchor really moves away from GPTQ-on-merged
    q_small = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=0.1, anchor="output")
    assert not _codes_agree(q_small, ref, frac=0.9)


def test_single_expert_equal_to_merge_reproduces_gptq():
    wm, _, xs, _ = _problem(seed=7, T=1)
    for anchor in ("output", "weight"):
        q = epmq_layer(wm, [wm], xs, SPEC, xs_target=xs, lam=0.1, anchor=anchor)
        if anchor == "output":   # H = (1+λ)H_d: same GPTQ problem as H_d
            assert _codes_agree(q, quant.gptq(wm, _gram(xs), SPEC), frac=1.0)
        w_star = epmq_layer(wm, [wm], xs, SPEC, xs_target=xs, lam=0.1, anchor=anchor, rounding="none")
        np.testing.assert_allclose(np.asarray(w_star), wm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("anchor", ["weight", "output"])
def test_gptq_rounded_objective_not_above_rtn(anchor):
    wm, ws, xs, xts = _problem(seed=8, n=200)
    obj = Objective(kind="epmq", lam=0.1, anchor=anchor)
    tasks = [[(x, jnp.asarray(xt) @ w)] for x, xt, w in zip(xs, xts, ws)]
    m, _ = accumulate(tasks, obj.task_weights)
    _, st_g = solve_layer(obj, m, wm, SPEC, rounding="gptq")
    _, st_r = solve_layer(obj, m, wm, SPEC, rounding="rtn")
    _, st_n = solve_layer(obj, m, wm, SPEC, rounding="none")
    assert st_g["obj_relaxed"] == pytest.approx(st_r["obj_relaxed"])
    assert st_n["obj_rounded"] == pytest.approx(st_n["obj_relaxed"], rel=1e-4)
    assert st_n["obj_relaxed"] <= st_g["obj_rounded"] < st_r["obj_rounded"]
    assert st_g["obj_relaxed"] < st_g["obj_merged"]      # W* beats the merge on its own objective
    assert set(st_g) >= {"path", "rel_dist", "cond", "damp", "gptq_damp", "time_s"}

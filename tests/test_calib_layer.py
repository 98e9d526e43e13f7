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
    return sum(o * g for o, g in zip(om, grams))


def _deq(q):
    return np.asarray(q.dequantize(), np.float64)


def _out_err(q, w, h):
    """tr(ΔᵀHΔ) in float64, Δ = Q − W: the output error of a rounding."""
    d = _deq(q) - np.asarray(w, np.float64)
    return float(np.sum(d * (h @ d)))


def test_output_anchor_to_infinity_is_gptq_on_merged():
    wm, ws, xs, xts = _problem(seed=6)
    h = _gram(xs, "frobenius")
    q = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=1e6, anchor="output", task_weights="frobenius")
    ref = quant.gptq(wm, h.astype(np.float32), SPEC)
    rtn_err = _out_err(quant.rtn(wm, SPEC), wm, h)
    assert _out_err(q, wm, h) == pytest.approx(_out_err(ref, wm, h), rel=0.02)
    assert _out_err(ref, wm, h) < 0.9 * rtn_err              # GPTQ's gain is real, not a tie
    # and a small anchor really moves away from GPTQ-on-merged: closer to the experts' targets
    q_small = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=0.1, anchor="output")
    assert np.linalg.norm(_deq(q_small) - _deq(ref)) > 0.5 * np.linalg.norm(_deq(ref) - wm)


def test_weight_anchor_to_infinity_with_gptq_is_rtn_of_merged():
    wm, ws, xs, xts = _problem(seed=9)
    h = _gram(xs, "frobenius")
    q = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=1e7, anchor="weight", rounding="gptq")
    r = quant.rtn(wm, SPEC)
    w_err = lambda a: np.linalg.norm(_deq(a) - wm)
    assert w_err(q) == pytest.approx(w_err(r), rel=0.01)
    assert _out_err(q, wm, h) == pytest.approx(_out_err(r, wm, h), rel=0.02)
    # GPTQ on the data's own H would differ: the anchor, not the rounder, made it RTN
    assert _out_err(quant.gptq(wm, h.astype(np.float32), SPEC), wm, h) < 0.8 * _out_err(r, wm, h)


def test_output_anchor_sweep_is_an_interpolation():
    # W*(λ) = (W*(0) + λ W_m)/(1 + λ) exactly (no damping): the λ sweep interpolates toward W_m
    wm, ws, xs, xts = _problem(seed=10)
    w0 = np.asarray(epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=0.0, rounding="none", damp=0.0),
                    np.float64)
    want0, _ = _ref_wstar(wm, ws, xs, xts, 0.0, "output", "frobenius", 0.0)
    np.testing.assert_allclose(w0, want0, rtol=1e-4, atol=1e-4 * np.abs(want0).max())
    for lam in (0.3, 4.0):
        got = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=lam, rounding="none", damp=0.0)
        want = (want0 + lam * wm.astype(np.float64)) / (1 + lam)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("center", ["merged", "zero"])
def test_lambda_zero_damp_zero_is_the_unanchored_solve(center):
    wm, ws, xs, xts = _problem(seed=11)
    got = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=0.0, damp=0.0, damp_center=center,
                     task_weights="tokens", rounding="none")
    want, _ = _ref_wstar(wm, ws, xs, xts, 0.0, "output", "tokens", 0.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_damp_center_zero_is_the_plain_ridge():
    wm, ws, xs, xts = _problem(seed=12)
    delta = 0.5                                  # large, so the two centres differ visibly
    got, st = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=0.0, damp=delta, damp_center="zero",
                         task_weights="uniform", rounding="none", return_stats=True)
    hd = sum(x.astype(np.float64).T @ x.astype(np.float64) for x in xs)
    bd = sum(x.astype(np.float64).T @ (xt.astype(np.float64) @ w) for x, xt, w in zip(xs, xts, ws))
    mu = np.mean(np.diag(hd))
    want = np.linalg.solve(hd + delta * mu * np.eye(len(hd)), bd)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert st["damp"] == pytest.approx(delta) and st["damp_center"] == "zero"
    assert st["damp_requested"] == delta and st["damp_raised"] is False
    toward_merge = epmq_layer(wm, ws, xs, SPEC, xs_target=xts, lam=0.0, damp=delta,
                              task_weights="uniform", rounding="none")
    want_m = np.linalg.solve(hd + delta * mu * np.eye(len(hd)), bd + delta * mu * wm)
    np.testing.assert_allclose(np.asarray(toward_merge), want_m, rtol=1e-4, atol=1e-4 * np.abs(want_m).max())


def test_single_expert_equal_to_merge_reproduces_gptq():
    wm, _, xs, _ = _problem(seed=7, T=1)
    h = _gram(xs)
    for anchor in ("output", "weight"):
        w_star = epmq_layer(wm, [wm], xs, SPEC, xs_target=xs, lam=0.1, anchor=anchor, rounding="none")
        np.testing.assert_allclose(np.asarray(w_star), wm, rtol=1e-4, atol=1e-5)
    # output anchor: H = (1+λ)H_d, the same GPTQ problem as H_d (compared by quality, not bits)
    q = epmq_layer(wm, [wm], xs, SPEC, xs_target=xs, lam=0.1, anchor="output", task_weights="uniform")
    ref = quant.gptq(wm, h.astype(np.float32), SPEC)
    assert _out_err(q, wm, h) == pytest.approx(_out_err(ref, wm, h), rel=0.02)


def _objective64(wm, ws, xs, xts, lam, anchor, weighting):
    """(H, B, const) of the layer objective in float64, from the raw inputs."""
    f = lambda a: np.asarray(a, np.float64)
    hd, bd, yy = 0.0, 0.0, 0.0
    for x, xt, w in zip(xs, xts, ws):
        x, y = f(x), f(xt) @ f(w)
        g = x.T @ x
        om = {"uniform": 1.0, "tokens": 1.0 / len(x), "frobenius": 1.0 / np.linalg.norm(g)}[weighting]
        hd, bd, yy = hd + om * g, bd + om * x.T @ y, yy + om * np.sum(y * y)
    wm = f(wm)
    if anchor == "weight":
        c = np.mean(np.diag(hd))
        return hd + lam * c * np.eye(len(hd)), bd + lam * c * wm, yy + lam * c * np.sum(wm * wm)
    return (1 + lam) * hd, bd + lam * hd @ wm, yy + lam * np.sum(wm * (hd @ wm))


@pytest.mark.parametrize("anchor", ["weight", "output"])
def test_reported_objectives_match_float64_and_gptq_beats_rtn(anchor):
    wm, ws, xs, xts = _problem(seed=8, n=200)
    obj = Objective(kind="epmq", lam=0.1, anchor=anchor)
    tasks = [[(x, jnp.asarray(xt) @ w)] for x, xt, w in zip(xs, xts, ws)]
    m, _ = accumulate(tasks, obj.task_weights)
    h, b, c = _objective64(wm, ws, xs, xts, 0.1, anchor, obj.task_weights)
    value = lambda q: float(np.sum(q * (h @ q)) - 2 * np.sum(q * b) + c)
    runs = {r: solve_layer(obj, m, wm, SPEC, rounding=r, damp=0.0) for r in ("gptq", "rtn", "none")}
    tol = dict(rel=1e-3, abs=1e-4 * c)
    for r, (q, st) in runs.items():
        deq = np.asarray(q if r == "none" else q.dequantize(), np.float64)
        assert st["obj_merged"] == pytest.approx(value(wm.astype(np.float64)), **tol), r
        assert st["obj_relaxed"] == pytest.approx(value(np.linalg.solve(h, b)), **tol), r
        assert st["obj_rounded"] == pytest.approx(value(deq), **tol), r
    assert runs["gptq"][1]["obj_rounded"] < runs["rtn"][1]["obj_rounded"]
    assert set(runs["gptq"][1]) >= {"path", "rel_dist", "cond", "damp", "damp_center", "gptq_damp",
                                    "n_dead", "time_s"}


def test_bfloat16_kernels_come_back_in_bfloat16():
    wm, ws, xs, xts = _problem(seed=13)
    wb = jnp.asarray(wm, jnp.bfloat16)
    wsb = [jnp.asarray(w, jnp.bfloat16) for w in ws]
    f32 = epmq_layer(np.asarray(wb, np.float32), [np.asarray(w, np.float32) for w in wsb], xs, SPEC,
                     xs_target=xts, rounding="none")
    for rounding in ("gptq", "rtn", "none"):   # AWQ is block-level (tests/test_awq_llm.py)
        q = epmq_layer(wb, wsb, xs, SPEC, xs_target=xts, rounding=rounding)
        deq = q if rounding == "none" else q.dequantize()
        assert deq.dtype == jnp.bfloat16, rounding
        if rounding != "none":
            assert q.dtype == "bfloat16"
        # computed in float32: the relaxed result is float32's, rounded to bfloat16
        err = np.linalg.norm(np.asarray(deq, np.float64) - np.asarray(f32, np.float64))
        bound = {"none": 0.01, "gptq": 0.3, "rtn": 0.3}[rounding]
        assert err < bound * np.linalg.norm(np.asarray(f32)), rounding


def test_all_zero_inputs_keep_the_merged_rows():
    wm, ws, xs, xts = _problem(seed=14)
    zeros = [np.zeros_like(x) for x in xs]
    w_star, st = epmq_layer(wm, ws, zeros, SPEC, rounding="none", return_stats=True)
    np.testing.assert_array_equal(np.asarray(w_star), wm)
    assert st["n_dead"] == wm.shape[0]
    q, st = epmq_layer(wm, ws, zeros, SPEC, rounding="gptq", return_stats=True)
    r = quant.rtn(wm, SPEC)
    assert np.linalg.norm(_deq(q) - wm) == pytest.approx(np.linalg.norm(_deq(r) - wm), rel=1e-3)
    assert np.linalg.norm(_deq(q) - wm) < 0.2 * np.linalg.norm(wm)      # not zeros
    assert st["n_dead"] == wm.shape[0]


def test_indefinite_hessian_damped_more_than_tenfold_warns_and_is_recorded():
    from epmq_jax.calib import Moments

    r = np.random.default_rng(15)
    d_in, d_out = 8, 4
    h = np.eye(d_in) + 1.5 * (np.ones((d_in, d_in)) - np.eye(d_in))    # eigenvalues 11.5 and -0.5
    assert np.linalg.eigvalsh(h).min() < 0 < np.diag(h).min()
    wm = r.normal(size=(d_in, d_out)).astype(np.float32)
    m = Moments(jnp.asarray(h, jnp.float32), jnp.asarray(h @ wm + 0.1, jnp.float32), jnp.float32(1.0),
                jnp.float32(10.0), jnp.ones(d_in, jnp.float32))
    with pytest.warns(UserWarning, match="damping was raised"):
        _, st = solve_layer(Objective(kind="regmean"), m, wm, SPEC, rounding="rtn", damp=0.01)
    assert st["damp_raised"] is True and st["damp"] > 0.1


@pytest.mark.parametrize("case, match", [
    ("nan_expert", r"expert_kernels\[1\]"),
    ("nan_x", r"xs\[0\]"),
    ("inf_target", r"xs_target\[1\]"),
    ("nan_merged", "w_merged"),
    ("lam_inf", "lam must be a finite"),
    ("lam_nan", "lam must be a finite"),
    ("spec_none", "spec"),
    ("xs_not_list", "xs: expected a list"),
])
def test_bad_values_name_the_argument(case, match):
    wm, ws, xs, xts = _problem(T=2)
    kw = dict(xs_target=xts)
    if case == "nan_expert":
        ws = [ws[0], ws[1].copy()]
        ws[1][0, 0] = np.nan
    elif case == "nan_x":
        xs = [xs[0].copy(), xs[1]]
        xs[0][3, 2] = np.nan
    elif case == "inf_target":
        kw["xs_target"] = [xts[0], np.full_like(xts[1], np.inf)]
    elif case == "nan_merged":
        wm = wm.copy()
        wm[1, 1] = np.nan
    elif case == "lam_inf":
        kw["lam"] = float("inf")
    elif case == "lam_nan":
        kw["lam"] = float("nan")
    elif case == "xs_not_list":
        xs = xs[0]
    spec = None if case == "spec_none" else SPEC
    with pytest.raises(ValueError, match=match):
        epmq_layer(wm, ws, xs, spec, **kw)


def test_python_lists_work_and_spec_none_is_fine_unrounded():
    wm, ws, xs, _ = _problem(T=2, n=30, d_in=8, d_out=3)
    want = epmq_layer(wm, ws, xs, None, rounding="none")
    got = epmq_layer(wm.tolist(), [w.tolist() for w in ws], [x.tolist() for x in xs], None, rounding="none")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("objective", ["gptq", "epmq"])
def test_reported_rounded_objective_with_dead_input_and_damping_is_float64(objective):
    """GPTQ rounding reports L(Q) from its own rounding errors (no matmul): with a dead input
    (the solve's H fixes its diagonal, the report's H has 0 there) and a damping of 5%, it is
    still L(Q) of the returned kernel for the undamped objective, computed in float64."""
    wm, ws, xs, xts = _problem(seed=23, d_in=32, n=40)
    for x, xt in zip(xs, xts):
        x[:, 7] = 0.0
        xt[:, 7] = 0.0
    obj = Objective(kind=objective, lam=0.1)
    tasks = [[(x, jnp.asarray(xt) @ w)] for x, xt, w in zip(xs, xts, ws)]
    m, _ = accumulate(tasks, obj.task_weights)
    q, st = solve_layer(obj, m, wm, SPEC, rounding="gptq", damp=0.05)
    deq = np.asarray(q.dequantize(), np.float64)
    if objective == "gptq":
        h = sum(np.asarray(x, np.float64).T @ np.asarray(x, np.float64) for x in xs)
        want = float(np.sum((deq - wm) * (h @ (deq - wm))))
    else:
        h, b, c = _objective64(wm, ws, xs, xts, 0.1, "output", obj.task_weights)
        want = float(np.sum(deq * (h @ deq)) - 2 * np.sum(deq * b) + c)
    assert st["n_dead"] == 1 and st["damp"] in (None, pytest.approx(0.05))
    assert st["obj_rounded"] == pytest.approx(want, rel=1e-4)


def test_gptq_rounding_reuses_the_solves_factorisation():
    """E-PMQ + GPTQ factors H once when GPTQ's δ is the solve's (twice when it is not), and the
    rounded objective is the same either way (with a dead input, whose diagonal the two
    factorisations damp differently)."""
    import jax

    from epmq_jax.calib.solve import layer_step
    wm, ws, xs, xts = _problem(seed=21, d_in=32)
    for x in xs:
        x[:, 3] = 0.0
    obj = Objective(kind="epmq", lam=0.1)
    m, _ = accumulate([[(x, jnp.asarray(xt) @ w)] for x, xt, w in zip(xs, xts, ws)], "frobenius")

    def step(gptq_damp):
        return layer_step(obj, m, jnp.asarray(wm), SPEC, damp=0.01, gptq_damp=gptq_damp)[2]["obj_rounded"]

    def n_chol(gptq_damp):
        return str(jax.make_jaxpr(lambda: step(gptq_damp))()).count("cholesky")

    assert n_chol(None) == n_chol(0.01) > 0      # (a factorisation = a first try + the retry loop's)
    assert n_chol(0.02) == 2 * n_chol(None)
    # the same δ through the other path (a value equal to 0.01 in float32 but not in Python)
    np.testing.assert_allclose(float(step(None)), float(step(0.01 + 1e-12)), rtol=1e-4)
    assert int(layer_step(obj, m, jnp.asarray(wm), SPEC, damp=0.01)[2]["n_dead"]) == 1

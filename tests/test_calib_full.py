"""E-PMQ-full (epmq_jax.calib.full) against float64 NumPy references written independently here.

A toy pre-norm MLP block model (linen), calibrated with each piece and all together, is re-run
in float64 NumPy: the augmented kernel + bias solve, the per-channel norm fit, token weights,
residual targets and the extrapolated anchor, block by block; the unit solves (the affine step
with the bias absorbing the rounding error, the 2x2 norm fit) are checked on their own; every
piece off must give E-PMQ.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epmq_jax import quant
from epmq_jax.calib import CalibConfig, Objective, calibrate, capture_linen
from epmq_jax.calib.adapter import NormSpec
from epmq_jax.calib.full import FullConfig, affine_layer_step, norm_step, piece_config
from epmq_jax.calib.stats import Moments
from epmq_jax.quant import QuantSpec

D, F, TOK, D_IN, EPS = 8, 16, 4, 6, 1e-6
DAMP = 0.01   # the solves' damping in the sequential comparison
GROUPS = (("up/kernel",), ("down/kernel",))


class Block(nn.Module):
    """x + down(relu(up(ln(x)))), every Dense with a bias."""

    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="down")(nn.relu(nn.Dense(F, name="up")(nn.LayerNorm(epsilon=EPS, name="ln")(x))))


def _zhat(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS)


@dataclasses.dataclass(frozen=True)
class PlainAdapter:
    """A user's adapter without E-PMQ-full's extension."""

    n_blocks: int = 2

    def embed(self, params, x):
        return nn.Dense(D).apply({"params": params["embed"]}, x)

    def block_paths(self, params):
        return [(f"block{i}",) for i in range(self.n_blocks)]

    def block_kind(self, index):
        return 0

    def linear_groups(self, kind):
        return GROUPS

    def run_block(self, kind, block_params, carry):
        return capture_linen(Block(), block_params, carry)


@dataclasses.dataclass(frozen=True)
class ToyAdapter(PlainAdapter):
    """With E-PMQ-full's extension: the task reads token 0 (of the weighted blocks' rows)."""

    def full_norms(self, kind):
        return (NormSpec("ln", 0),)

    def run_block_full(self, kind, block_params, carry):
        out, caps = capture_linen(Block(), block_params, carry)
        return out, {**caps, "ln": _zhat(carry), "ln:input": carry}

    def readout(self, kind, path, carry):
        return jnp.broadcast_to((jnp.arange(carry.shape[1]) == 0).astype(jnp.float32), carry.shape[:2])

    def residuals(self, kind):
        return {"down/kernel": "ln"}

    def leaf_kinds(self):
        return None, None


def _init(key):
    ks = jax.random.split(key, 3)
    p = {"embed": nn.Dense(D).init(ks[0], jnp.ones((1, D_IN)))["params"]}
    for i in range(2):
        p[f"block{i}"] = Block().init(ks[i + 1], jnp.ones((1, TOK, D)))["params"]
    return p


def _perturb(tree, key, scale):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _problem(T=3, seed=0):
    key = jax.random.key(seed)
    base = _perturb(_init(key), jax.random.fold_in(key, 99), 0.3)
    merged = _perturb(base, jax.random.fold_in(key, 98), 0.1)
    experts = [_perturb(merged, jax.random.fold_in(key, 100 + t), 0.3) for t in range(T)]
    r = np.random.default_rng(seed)
    inputs = [r.normal(size=(n, TOK, D_IN)).astype(np.float32) for n in (10, 13, 7)[:T]]
    return base, merged, experts, inputs


# ----------------------------------------------------------------------------- float64 reference


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _z(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS)


def _ln(p, x):
    return _z(x) * p["scale"] + p["bias"]


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _block(p, x):
    return x + _dense(p["down"], np.maximum(_dense(p["up"], _ln(p["ln"], x)), 0))


def _rows(a):
    return a.reshape(-1, a.shape[-1])


def _omega(g):
    return 1.0 / np.linalg.norm(g)


def _solve_layer(xs, ys, ws, wa, lam, bias):
    """Output-anchored W̄* (kernel and, with ``bias``, the bias row) on row weights ``ws``, damped by
    δμ toward the anchor (μ = mean diagonal): after a LayerNorm the augmented H is singular (the
    normalised features sum to a constant), so only the damped solve is defined."""
    h, b = 0.0, 0.0
    for x, y, w in zip(xs, ys, ws):
        x = _rows(x)
        if bias:
            x = np.concatenate([x, np.ones((len(x), 1))], 1)
        g = (x * w[:, None]).T @ x
        om = _omega(g)
        h, b = h + om * g, b + om * (x * w[:, None]).T @ _rows(y)
    h, b = (1 + lam) * h, b + lam * h @ wa
    live = np.diag(h) != 0            # a ReLU unit silent on every row keeps the anchor's row
    mu = np.mean(np.diag(h)[live])
    h = h + np.diag(np.where(live, DAMP * mu, mu))
    b = np.where(live[:, None], b + DAMP * mu * wa, mu * wa)
    return np.linalg.solve(h, b)


def _fit_norm(zs, ys, ws, ga, ba, lam):
    """Per channel (γ, β) = argmin Σ_t ω_t Σ w (γz + β − y)² + λ Σ_t ω_t Σ w ((γ−γa)z + β−βa)²."""
    gam, bet = np.zeros_like(ga), np.zeros_like(ba)
    oms = [_omega((_rows(z) * w[:, None]).T @ _rows(z)) for z, w in zip(zs, ws)]
    for c in range(len(ga)):
        a, r = np.zeros((2, 2)), np.zeros(2)
        for z, y, w, om in zip(zs, ys, ws, oms):
            zc = np.stack([_rows(z)[:, c], np.ones(len(w))], 1)
            a += om * (zc * w[:, None]).T @ zc
            r += om * (zc * w[:, None]).T @ _rows(y)[:, c]
        h, b = (1 + lam) * a, r + lam * a @ np.array([ga[c], ba[c]])
        mu = np.trace(h) / 2
        theta = np.linalg.solve(h + DAMP * mu * np.eye(2), b + DAMP * mu * np.array([ga[c], ba[c]]))
        gam[c], bet[c] = theta
    return gam, bet


def _reference(base, merged, experts, inputs, lam, full: FullConfig):
    """The sequential E-PMQ-full re-run: returns ``({leaf path: value}, {path: read share})``."""
    base, merged, experts = _f64(base), _f64(merged), _f64(experts)
    anchor = jax.tree.map(lambda m, b: full.rho * m + (1 - full.rho) * b, merged, base)
    xq = [_dense(merged["embed"], x.astype(np.float64)) for x in inputs]
    xe = [_dense(e["embed"], x.astype(np.float64)) for e, x in zip(experts, inputs)]
    out, shares = {}, {}
    for k in range(2):
        name = f"block{k}"
        cur, wa = jax.tree.map(np.copy, merged[name]), anchor[name]
        eb = [e[name] for e in experts]
        weighted = full.tokens and k >= 2 - full.token_reach
        tok = np.where(np.arange(TOK) == 0, 1.0, full.token_rest if weighted else 1.0)
        ws = [np.broadcast_to(tok, x.shape[:2]).reshape(-1) for x in xq]
        read = [np.broadcast_to(np.arange(TOK) == 0, x.shape[:2]).reshape(-1) for x in xq]
        share = sum((w * r).sum() for w, r in zip(ws, read)) / sum(w.sum() for w in ws) if weighted else 1.0
        if full.norms:
            ys = [_ln(b["ln"], x) for b, x in zip(eb, xe)]
            cur["ln"]["scale"], cur["ln"]["bias"] = _fit_norm([_z(x) for x in xq], ys, ws, wa["ln"]["scale"],
                                                              wa["ln"]["bias"], lam)
            out[f"{name}/ln/scale"], out[f"{name}/ln/bias"] = cur["ln"]["scale"], cur["ln"]["bias"]
        shares[f"{name}/ln"] = share
        hq = [_ln(cur["ln"], x) for x in xq]
        he = [_ln(b["ln"], x) for b, x in zip(eb, xe)]
        for layer, xs, xts, res in (("up", hq, he, None), ("down", None, None, (xq, xe))):
            if layer == "down":
                xs = [np.maximum(_dense(cur["up"], h), 0) for h in hq]
                xts = [np.maximum(_dense(b["up"], h), 0) for b, h in zip(eb, he)]
            ys = [xt @ b[layer]["kernel"] + (b[layer]["bias"] if full.bias else 0) for xt, b in zip(xts, eb)]
            if res is not None and full.residual:
                ys = [y + e - q for y, q, e in zip(ys, *res)]
            w_a = wa[layer]["kernel"]
            if full.bias:
                w_a = np.concatenate([w_a, wa[layer]["bias"][None]], 0)
            sol = _solve_layer(xs, ys, ws, w_a, lam, full.bias)
            cur[layer]["kernel"] = sol[:-1] if full.bias else sol
            if full.bias:
                cur[layer]["bias"] = sol[-1]
                out[f"{name}/{layer}/bias"] = sol[-1]
            out[f"{name}/{layer}/kernel"] = cur[layer]["kernel"]
            shares[f"{name}/{layer}/kernel"] = share
        xq = [_block(cur, x) for x in xq]
        xe = [_block(b, x) for b, x in zip(eb, xe)]
    return out, shares


def _leaf(params, path):
    node = params
    for k in path.split("/"):
        node = node[k]
    return np.asarray(node.dequantize() if quant.is_quantized(node) else node)


FULL_CASES = {
    "all": FullConfig(bias=True, norms=True, token_reach=1, token_rest=0.25, rho=1.5, residual=True),
    "bias": piece_config("bias", FullConfig()),
    "norms": piece_config("norms", FullConfig()),
    "tokens": piece_config("tokens", FullConfig(token_reach=2, token_rest=0.0)),
    "residual": piece_config("residual", FullConfig()),
    "anchor": piece_config("anchor", FullConfig(rho=3.0)),
}


@pytest.mark.parametrize("case", list(FULL_CASES))
def test_unrounded_full_matches_float64_sequential_reference(case):
    """Kernels, biases and norm params of every block; the token weights recorded per layer are
    the ones the reference's statistics used (``token_rest``, ``read_share``)."""
    full, lam = FULL_CASES[case], 0.3
    base, merged, experts, inputs = _problem()
    cfg = CalibConfig(objective=Objective(kind="epmq", lam=lam), rounding="none", damp=DAMP, batch_size=4,
                      full=full)
    res = calibrate(ToyAdapter(), merged, inputs, cfg, experts=experts, base=base)
    want, shares = _reference(base, merged, experts, inputs, lam, full)
    for path, value in want.items():
        np.testing.assert_allclose(_leaf(res.params, path), value, rtol=2e-3, atol=2e-3 * np.abs(value).max(),
                                   err_msg=path)
    untouched = {p for p in ("ln/scale", "ln/bias", "up/bias", "down/bias")
                 if not any(w.endswith(p) for w in want)}
    for p in untouched:
        np.testing.assert_array_equal(_leaf(res.params, f"block1/{p}"), _leaf(merged, f"block1/{p}"))
    json.dumps(res.stats)
    for s in res.stats:
        k = int(s["path"][5])
        assert s["token_rest"] == (full.token_rest if full.tokens and k >= 2 - full.token_reach else 1.0)
        assert s["read_share"] == pytest.approx(shares[s["path"]], rel=1e-5), s["path"]
        assert s["kind"] == ("norm" if s["path"].endswith("ln") else "linear")


def test_every_piece_off_is_epmq():
    """The limit: E-PMQ-full with every piece off reaches E-PMQ's objective, layer by layer."""
    _, merged, experts, inputs = _problem(seed=1)
    for rounding in ("gptq", "none"):
        kw = dict(objective=Objective(kind="epmq", lam=0.1), rounding=rounding, spec=QuantSpec(bits=3, group_size=-1),
                  batch_size=4)
        epmq = calibrate(ToyAdapter(), merged, inputs, CalibConfig(**kw), experts=experts)
        off = calibrate(ToyAdapter(), merged, inputs, CalibConfig(**kw, full=piece_config("none", FullConfig())),
                        experts=experts)
        assert [s["path"] for s in off.stats] == [s["path"] for s in epmq.stats]
        for a, b in zip(off.stats, epmq.stats):
            for key in ("obj_merged", "obj_relaxed", "obj_rounded"):
                assert a[key] == pytest.approx(b[key], rel=1e-4), (rounding, a["path"], key)


# ----------------------------------------------------------------------------- the unit solves


def _moments(rng, n=200, d=6, d_out=5, shift=0.5):
    x = rng.normal(size=(n, d)) + shift
    xa = np.concatenate([x, np.ones((n, 1))], 1)
    y = x @ rng.normal(size=(d, d_out)) + rng.normal(size=d_out) + 0.1 * rng.normal(size=(n, d_out))
    return x, xa, y, Moments(jnp.asarray(xa.T @ xa, jnp.float32), jnp.asarray(xa.T @ y, jnp.float32),
                             jnp.asarray(np.sum(y * y), jnp.float32), jnp.float32(n), jnp.zeros(d + 1))


@pytest.mark.parametrize("anchor", ["output", "weight"])
def test_affine_solve_and_bias_closed_form_against_float64(anchor):
    """W̄* = H⁻¹B of the augmented system; after rounding, the bias is argmin_b L(Q, b) given the
    rounded kernel (it absorbs the mean rounding error); the kernel rows are rounded on the Schur
    complement (GPTQ's objective there is the float64 one's)."""
    rng = np.random.default_rng(0)
    x, xa, y, m = _moments(rng)
    wa, ba = rng.normal(size=(6, 5)), rng.normal(size=5)
    lam = 0.2
    obj = Objective(kind="epmq", lam=lam, anchor=anchor)
    h = xa.T @ xa
    wbar = np.concatenate([wa, ba[None]], 0)
    if anchor == "output":
        hs, bs = (1 + lam) * h, xa.T @ y + lam * h @ wbar
    else:
        c = np.mean(np.diag(h))
        hs, bs = h + lam * c * np.eye(7), xa.T @ y + lam * c * wbar
    w_star = np.linalg.solve(hs, bs)
    kw = dict(damp=0.0, gptq_damp=0.01)
    _, eff, b, stats = affine_layer_step(obj, m, jnp.asarray(wa, jnp.float32), jnp.asarray(ba, jnp.float32),
                                         None, rounding="none", **kw)
    np.testing.assert_allclose(eff, w_star[:-1], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b, w_star[-1], rtol=1e-3, atol=1e-4)
    spec = QuantSpec(bits=3, group_size=-1)
    q, eff, b, stats = affine_layer_step(obj, m, jnp.asarray(wa, jnp.float32), jnp.asarray(ba, jnp.float32),
                                         spec, rounding="gptq", **kw)
    qf = np.asarray(eff, np.float64)
    b_ref = (bs[-1] - hs[-1, :-1] @ qf) / hs[-1, -1]          # ∂L/∂b = 0 with Q fixed
    np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=1e-4 * np.abs(b_ref).max())
    np.testing.assert_allclose(b, w_star[-1] + hs[-1, :-1] @ (w_star[:-1] - qf) / hs[-1, -1], rtol=1e-4,
                               atol=1e-4 * np.abs(b_ref).max())
    value = lambda wb: np.sum(wb * (hs @ wb)) - 2 * np.sum(wb * bs)
    const = np.sum(y * y) + (lam * np.sum(wbar * (h @ wbar)) if anchor == "output" else lam * c * np.sum(wbar ** 2))
    got = value(np.concatenate([qf, np.asarray(b, np.float64)[None]], 0)) + const
    assert stats["obj_rounded"] == pytest.approx(got, rel=1e-3)
    s = hs[:-1, :-1] - np.outer(hs[:-1, -1], hs[:-1, -1]) / hs[-1, -1]
    ref_q = quant.gptq(jnp.asarray(w_star[:-1], jnp.float32), jnp.asarray(s, jnp.float32), spec, damp=0.01)
    err = lambda qq: np.sum((qq - w_star[:-1]) * (s @ (qq - w_star[:-1])))
    assert err(qf) == pytest.approx(err(np.asarray(ref_q.dequantize(), np.float64)), rel=1e-3)
    # rounding on the plain Gram instead of the Schur complement (the bias then fixed the same
    # way) is no better on the objective
    q_plain = np.asarray(quant.gptq(jnp.asarray(w_star[:-1], jnp.float32), jnp.asarray(hs[:-1, :-1], jnp.float32),
                                    spec, damp=0.01).dequantize(), np.float64)
    b_plain = (bs[-1] - hs[-1, :-1] @ q_plain) / hs[-1, -1]
    assert got <= value(np.concatenate([q_plain, b_plain[None]], 0)) + const + 1e-6 * abs(got)


def test_norm_fit_against_float64_two_by_two():
    """Per channel (γ, β) of the anchored, damped 2x2 least squares; 1x1 without a shift; a dead
    channel (ẑ = 0 on every row) keeps the anchor's γ."""
    rng = np.random.default_rng(1)
    n, d, lam, damp = 50, 5, 0.3, 0.05
    z = rng.normal(size=(n, d))
    z[:, 3] = 0.0
    y = z * rng.normal(size=d) + rng.normal(size=d) + 0.1 * rng.normal(size=(n, d))
    w = rng.uniform(0.5, 1.0, n)
    om = 0.7
    mom = {k: jnp.asarray(om * v, jnp.float32) for k, v in dict(
        zz=(w[:, None] * z * z).sum(0), z=(w[:, None] * z).sum(0), one=np.full(d, w.sum()),
        zy=(w[:, None] * z * y).sum(0), y=(w[:, None] * y).sum(0), yy=(w[:, None] * y * y).sum(0)).items()}
    ga, ba = rng.normal(size=d), rng.normal(size=d)
    obj = Objective(kind="epmq", lam=lam)
    gamma, beta, info = norm_step(obj, mom, jnp.asarray(ga, jnp.float32), jnp.asarray(ba, jnp.float32), damp=damp)
    gamma1, _, _ = norm_step(obj, mom, jnp.asarray(ga, jnp.float32), None, damp=damp)
    for c in range(d):
        zc = np.stack([z[:, c], np.ones(n)], 1)
        a = om * (zc * w[:, None]).T @ zc
        r = om * (zc * w[:, None]).T @ y[:, c]
        h, b = (1 + lam) * a, r + lam * a @ np.array([ga[c], ba[c]])
        if c == 3:   # dead: γ stays γ_a; β is the damped 1-d fit of the shift
            assert gamma[c] == pytest.approx(ga[c], rel=1e-6)
            mu = h[1, 1]       # the channel's only live diagonal entry
            assert beta[c] == pytest.approx((b[1] + damp * mu * ba[c]) / (h[1, 1] + damp * mu), rel=1e-4)
            continue
        mu = np.trace(h) / 2
        theta = np.linalg.solve(h + damp * mu * np.eye(2), b + damp * mu * np.array([ga[c], ba[c]]))
        np.testing.assert_allclose([gamma[c], beta[c]], theta, rtol=1e-4, atol=1e-5)
        h1, b1 = (1 + lam) * a[0, 0], r[0] + lam * a[0, 0] * ga[c]
        assert gamma1[c] == pytest.approx((b1 + damp * h1 * ga[c]) / (h1 + damp * h1), rel=1e-4)
    assert int(info["n_dead"]) == 1 and bool(info["ok"])
    assert float(info["obj_relaxed"]) <= float(info["obj_merged"])


# ----------------------------------------------------------------------------- bad input


def test_bad_settings_raise_before_work():
    base, merged, experts, inputs = _problem()
    kw = dict(rounding="none", batch_size=4)
    with pytest.raises(ValueError, match="token_rest"):
        FullConfig(token_rest=2.0)
    with pytest.raises(ValueError, match="rho"):
        FullConfig(rho=float("nan"))
    with pytest.raises(ValueError, match="full must be"):
        CalibConfig(full={"bias": True})
    with pytest.raises(ValueError, match="objective kind 'epmq'"):
        calibrate(ToyAdapter(), merged, inputs, CalibConfig(objective=Objective(kind="gptq"), full=FullConfig(), **kw))
    with pytest.raises(ValueError, match="pass base="):
        calibrate(ToyAdapter(), merged, inputs, CalibConfig(full=FullConfig(rho=2.0), **kw), experts=experts)
    bad_base = {**base, "embed": {"kernel": base["embed"]["kernel"][:2], "bias": base["embed"]["bias"]}}
    with pytest.raises(ValueError, match="base"):
        calibrate(ToyAdapter(), merged, inputs, CalibConfig(full=FullConfig(rho=2.0), **kw), experts=experts,
                  base=bad_base)
    with pytest.raises(ValueError, match="FullAdapter"):
        calibrate(PlainAdapter(), merged, inputs, CalibConfig(full=FullConfig(), **kw), experts=experts)
    # the bias piece alone needs nothing from the adapter
    calibrate(PlainAdapter(), merged, inputs, CalibConfig(full=piece_config("bias", FullConfig()), **kw), experts=experts)


# ----------------------------------------------------------------------------- the adapters


def test_capture_nnx_records_the_normalised_input_of_each_norm_kind():
    """ẑ (the norm with scale 1, bias 0) against the textbook formulas; scale·ẑ + bias is the
    norm's own output; the raw input is recorded beside it."""
    from flax import nnx

    from epmq_jax.calib import capture_nnx
    from epmq_jax.models import llama

    x = np.random.default_rng(0).normal(size=(3, 5, 6)).astype(np.float32) + 0.5
    x64 = x.astype(np.float64)
    layer = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    rms = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5)
    for norm, want in ((nnx.LayerNorm(6, epsilon=1e-5, rngs=nnx.Rngs(0)), layer),
                       (nnx.RMSNorm(6, epsilon=1e-5, rngs=nnx.Rngs(0)), rms), (llama.RMSNorm(6, 1e-5), rms)):
        graphdef, state = nnx.split(norm)
        params = jax.tree.map(lambda a: a + 0.3 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape),
                              nnx.to_pure_dict(state))
        out, caps = capture_nnx(graphdef, params, lambda m, v: m(v), jnp.asarray(x), norms=("",))
        np.testing.assert_allclose(caps[""], want, rtol=1e-4, atol=1e-5, err_msg=type(norm).__name__)
        affine = caps[""] * params["scale"] + params.get("bias", 0.0)
        np.testing.assert_allclose(affine, out, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(caps[":input"], x)
        np.testing.assert_allclose(nnx.merge(graphdef, params)(jnp.asarray(x)), out, rtol=1e-6)


def _vit():
    from flax import nnx

    from epmq_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8, projection_dim=16)
    model = CLIPVisionModelWithProjection(cfg, rngs=nnx.Rngs(0))
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    experts = [_perturb(base, jax.random.key(s), 0.05) for s in (1, 2)]
    merged = jax.tree.map(lambda a, b: (a + b) / 2, *experts)
    r = np.random.default_rng(0)
    return model, base, merged, experts, [r.normal(size=(n, 16, 16, 3)).astype(np.float32) for n in (12, 9)]


def test_vit_stem_and_head_are_float64_least_squares():
    """``leaves``: the patch embedding is the anchored least squares on flattened patches (the same
    pixels on every path), the projection the one on the pooled class token of the calibrated
    model, each toward the experts' outputs."""
    from flax import nnx

    from epmq_jax.calib import vit_adapter
    from epmq_jax.calib.adapter import vit_patches

    model, base, merged, experts, pixels = _vit()
    lam = 0.3
    cfg = CalibConfig(objective=Objective(kind="epmq", lam=lam), rounding="none", damp=DAMP, batch_size=8,
                      full=piece_config("leaves", FullConfig()))
    res = calibrate(vit_adapter(model), merged, pixels, cfg, experts=experts)
    assert [s["block"] for s in res.stats if s["block"] in ("stem", "head")] == ["stem", "head"]
    graphdef = nnx.split(model)[0]
    f64 = lambda a: np.asarray(a, np.float64)
    # the adapter's flattening is the convolution
    conv = merged["embeddings"]["patch_embedding"]["kernel"]
    np.testing.assert_allclose(
        vit_patches(jnp.asarray(pixels[0]), 8) @ conv.reshape(-1, conv.shape[-1]),
        nnx.merge(graphdef, merged).embeddings.patch_embedding(jnp.asarray(pixels[0])).reshape(12, 4, -1),
        rtol=1e-4, atol=1e-5)

    def anchored(xs, ys, wm):
        h, b = 0.0, 0.0
        for x, y in zip(xs, ys):
            g = x.T @ x
            h, b = h + g / np.linalg.norm(g), b + x.T @ y / np.linalg.norm(g)
        h, b = (1 + lam) * h, b + lam * h @ wm
        mu = np.mean(np.diag(h))
        return np.linalg.solve(h + DAMP * mu * np.eye(len(h)), b + DAMP * mu * wm)

    patches = [f64(vit_patches(jnp.asarray(p), 8)).reshape(-1, 8 * 8 * 3) for p in pixels]
    k2d = lambda p: f64(p["embeddings"]["patch_embedding"]["kernel"]).reshape(-1, 32)
    want = anchored(patches, [x @ k2d(e) for x, e in zip(patches, experts)], k2d(merged))
    np.testing.assert_allclose(k2d(res.params), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())

    def pooled(params, x):
        m = nnx.merge(graphdef, jax.tree.map(lambda a: a.dequantize() if quant.is_quantized(a) else a, params,
                                             is_leaf=quant.is_quantized))
        return f64(m.pool(m.encoder(m.embed(jnp.asarray(x)))))

    xs = [pooled(res.params, x) for x in pixels]
    ys = [pooled(e, x) @ f64(e["visual_projection"]["kernel"]) for e, x in zip(experts, pixels)]
    want = anchored(xs, ys, f64(merged["visual_projection"]["kernel"]))
    got = f64(res.params["visual_projection"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def _distance(feats, params, experts, tasks):
    return sum(np.linalg.norm(feats(params, x) - feats(e, x)) for e, x in zip(experts, tasks))


def test_vit_every_piece_with_rounding_moves_features_toward_the_experts():
    from flax import nnx

    from epmq_jax.calib import vit_adapter

    model, base, merged, experts, pixels = _vit()
    graphdef = nnx.split(model)[0]
    feats = lambda p, x: np.asarray(nnx.merge(graphdef, jax.tree.map(
        lambda a: a.dequantize() if quant.is_quantized(a) else a, p, is_leaf=quant.is_quantized))(jnp.asarray(x)))
    kw = dict(objective=Objective(kind="epmq", lam=0.1), spec=QuantSpec(bits=8, group_size=-1), batch_size=8)
    full = FullConfig(token_reach=1, token_rest=0.0, rho=1.5, leaves=True, residual=True)
    res = calibrate(vit_adapter(model), merged, pixels, CalibConfig(**kw, full=full), experts=experts, base=base)
    epmq = calibrate(vit_adapter(model), merged, pixels, CalibConfig(**kw), experts=experts)
    assert _distance(feats, res.params, experts, pixels) < _distance(feats, epmq.params, experts, pixels) \
        < _distance(feats, merged, experts, pixels)
    last = {s["path"]: s for s in res.stats if s["block"] == 1}
    assert last["encoder/layers/1/mlp/fc2/kernel"]["read_share"] == pytest.approx(1.0)   # rest 0: the class token
    assert last["encoder/layers/1/self_attn/q_proj/kernel"]["read_share"] == 1.0 and \
        last["encoder/layers/1/self_attn/q_proj/kernel"]["token_rest"] == 0.0
    assert last["encoder/layers/1/mlp/fc2/kernel"]["n_rows"] == 21.0                    # 12 + 9 class tokens
    assert last["encoder/layers/1/self_attn/q_proj/kernel"]["n_rows"] == 21.0 * 5       # every token
    assert isinstance(res.params["encoder"]["layers"][1]["mlp"]["fc2"]["kernel"], quant.QuantizedWeight)
    assert res.params["encoder"]["layers"][1]["mlp"]["fc2"]["bias"].dtype == jnp.float32


def test_t5_full_moves_logits_toward_the_experts():
    """Norms (RMSNorm scales), residual targets and the head (final norm, untied LM head) on a tiny T5."""
    from flax import nnx
    from test_calib_t5 import _logits, _rel_err, _task_inputs, _tiny_model

    from epmq_jax import merge
    from epmq_jax.calib import t5_adapter

    model = _tiny_model(0)
    graphdef, base = nnx.split(model)
    base = nnx.to_pure_dict(base)
    experts = [jax.tree.map(lambda b, e: b + 0.3 * e, base, nnx.to_pure_dict(nnx.split(_tiny_model(s))[1]))
               for s in (5, 6)]
    merged = merge.task_arithmetic(base, experts, scaling=0.5)
    tasks = [_task_inputs(1), _task_inputs(2)]
    kw = dict(objective=Objective(kind="epmq", lam=0.1), rounding="none", batch_size=32)
    full = FullConfig(token_reach=2, token_rest=0.0, leaves=True, residual=True)
    res = calibrate(t5_adapter(model), merged, tasks, CalibConfig(**kw, full=full), experts=experts)
    epmq = calibrate(t5_adapter(model), merged, tasks, CalibConfig(**kw), experts=experts)
    err = lambda p: sum(_rel_err(_logits(graphdef, p, x), _logits(graphdef, e, x)) for e, x in zip(experts, tasks))
    assert err(res.params) < err(epmq.params) < err(merged)
    paths = [s["path"] for s in res.stats]
    assert paths[-2:] == ["decoder/final_layer_norm", "lm_head/kernel"]
    assert "encoder/block/0/layer/1/layer_norm" in paths and "decoder/block/0/layer/2/layer_norm" in paths
    assert all(s["read_share"] == 1.0 for s in res.stats)       # T5 reads every token: no weighting
    assert "bias" not in res.params["lm_head"]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_decoder_full_reads_the_last_token(model_type):
    """The decoder adapter: norms, residual targets, the head, and ``readout="last"`` (qwen2's q/k/v
    biases take the bias solve)."""
    from flax import nnx

    from epmq_jax.calib import decoder_adapter
    from epmq_jax.models import llama

    cfg = llama.LlamaConfig(model_type=model_type, vocab_size=40, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            attention_bias=model_type == "qwen2")
    model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, base = nnx.split(model)
    base = _perturb(nnx.to_pure_dict(base), jax.random.key(0), 0.05)
    experts = [_perturb(base, jax.random.key(s), 0.05) for s in (1, 2)]
    merged = jax.tree.map(lambda a, b: (a + b) / 2, *experts)
    rng = np.random.default_rng(0)
    tasks = []
    for n in (6, 5):
        ids = rng.integers(0, 40, (n, 10))
        mask = (np.arange(10)[None] >= rng.integers(0, 5, (n, 1))).astype(np.int32)
        tasks.append({"input_ids": ids, "attention_mask": mask})

    def last_logits(p, x):
        m = nnx.merge(graphdef, jax.tree.map(lambda a: a.dequantize() if quant.is_quantized(a) else a, p,
                                             is_leaf=quant.is_quantized))
        return np.asarray(m(jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"])))[:, -1]

    kw = dict(objective=Objective(kind="epmq", lam=0.1), spec=QuantSpec(bits=8, group_size=-1), batch_size=8)
    full = FullConfig(token_reach=1, token_rest=0.0, leaves=True, residual=True)
    ad = decoder_adapter(model, readout="last")
    res = calibrate(ad, merged, tasks, CalibConfig(**kw, full=full), experts=experts)
    epmq = calibrate(ad, merged, tasks, CalibConfig(**kw), experts=experts)
    dist = lambda p: sum(np.linalg.norm(last_logits(p, x) - last_logits(e, x)) for e, x in zip(experts, tasks))
    assert dist(res.params) < dist(epmq.params) < dist(merged)
    by_path = {s["path"]: s for s in res.stats}
    assert by_path["model/layers/1/mlp/down_proj/kernel"]["n_rows"] == 11.0      # the last token of each row
    assert by_path["model/layers/1/self_attn/q_proj/kernel"]["n_rows"] > 11.0   # q/k/v: every real token
    assert by_path["model/layers/0/mlp/down_proj/kernel"]["token_rest"] == 1.0  # outside the reach
    assert by_path["model/layers/0/self_attn/q_proj/kernel"]["bias"] == (model_type == "qwen2")
    assert list(by_path)[-2:] == ["model/norm", "lm_head/kernel"]
    with pytest.raises(ValueError, match="readout"):
        decoder_adapter(model, readout="first")


# ----------------------------------------------------------------------------- heads: the readout-metric refit


def _heads_problem(T=3, d_in=5, d_out=4, seed=0):
    r = np.random.default_rng(seed)
    hs, bs = [], []
    for t in range(T):
        x = r.normal(size=(20 + 3 * t, d_in))
        y = r.normal(size=(len(x), d_out))
        hs.append(x.T @ x / (t + 1.0))
        bs.append(x.T @ y / (t + 1.0))
    heads = [r.normal(size=(d_out, c)) for c in (3, 2, 4)[:T]]
    return np.stack(hs), np.stack(bs), heads, r.normal(size=(d_in, d_out))


def _metric64(u):
    u = np.asarray(u, np.float64)
    c = np.eye(u.shape[1]) - 1.0 / u.shape[1]
    return u @ c @ u.T


def test_readout_metric_is_the_centred_logit_distance():
    """M = U (I − 11ᵀ/C) Uᵀ: vᵀMv is the squared change of the logits Uᵀv after removing their
    mean; an output change that shifts every logit alike costs nothing."""
    from epmq_jax.calib.full import readout_metrics

    u = np.random.default_rng(1).normal(size=(6, 4))
    (m,) = readout_metrics([u.astype(np.float32)])
    np.testing.assert_allclose(m, _metric64(u), rtol=1e-5, atol=1e-5)
    v = np.random.default_rng(2).normal(size=6)
    logits = u.T @ v
    np.testing.assert_allclose(v @ np.asarray(m, np.float64) @ v, np.sum((logits - logits.mean()) ** 2), rtol=1e-4)
    shift = u @ np.linalg.solve(u.T @ u, np.ones(4))          # Uᵀ shift = 1: every logit + 1
    assert abs(shift @ np.asarray(m, np.float64) @ shift) < 1e-4 * np.sum(shift ** 2)


@pytest.mark.parametrize("mu", [0.01, 1.0])
def test_metric_solve_against_float64_kronecker_system(mu):
    """The conjugate-gradient solve equals the float64 solution of the normal equations written
    as one Kronecker system: (Σ_t M_t ⊗ H_t + μ I ⊗ H̄_δ) vec P = vec(Σ_t B_t M_t + μ H̄_δ P̂)."""
    from epmq_jax.calib.full import metric_solve, readout_metrics

    hs, bs, heads, p_hat = _heads_problem()
    damp = 0.05
    ms = [_metric64(u) for u in heads]
    h_bar = hs.sum(0)
    h_d = h_bar + damp * np.mean(np.diag(h_bar)) * np.eye(len(h_bar))
    a = sum(np.kron(m, h) for m, h in zip(ms, hs)) + mu * np.kron(np.eye(len(ms[0])), h_d)
    rhs = sum(b @ m for b, m in zip(bs, ms)) + mu * h_d @ p_hat
    want = np.linalg.solve(a, rhs.reshape(-1, order="F")).reshape(p_hat.shape, order="F")
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got, info = metric_solve(f32(hs), f32(bs), jnp.stack(readout_metrics([f32(u) for u in heads])), f32(p_hat),
                             jnp.float32(mu), jnp.float32(damp))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    value = lambda p: np.sum(p * (a @ p.reshape(-1, order="F")).reshape(p.shape, order="F")) - 2 * np.sum(p * rhs)  # noqa: E731
    assert float(info["head_obj_drop"]) == pytest.approx(value(p_hat) - value(want), rel=1e-3)
    assert float(info["head_rel_resid"]) < 1e-4
    # a large pull keeps P̂
    far, _ = metric_solve(f32(hs), f32(bs), jnp.stack(readout_metrics([f32(u) for u in heads])), f32(p_hat),
                          jnp.float32(1e6), jnp.float32(damp))
    np.testing.assert_allclose(far, p_hat, atol=1e-4 * np.abs(p_hat).max())


def test_vit_heads_refit_is_the_float64_readout_metric_solution():
    """``heads``: the projection solves the tasks' readout-metric normal equations (float64
    Kronecker reference) on the pooled class tokens of the calibrated model, pulled toward the
    anchored least squares of ``leaves``; the refit lowers the tasks' (ω-weighted) centred logit error."""
    from flax import nnx

    from epmq_jax.calib import vit_adapter

    model, base, merged, experts, _ = _vit()
    # more pooled rows (88) than projection inputs (32): the refit is well determined, so float32
    # noise upstream (which differs between CPUs) cannot move the kernel beyond the tolerance
    pixels = [np.random.default_rng(5).normal(size=(n, 16, 16, 3)).astype(np.float32) for n in (48, 40)]
    lam, mu = 0.3, 0.05
    r = np.random.default_rng(3)
    heads = [r.normal(size=(16, c)).astype(np.float32) for c in (5, 3)]
    heads = [h / np.linalg.norm(h, axis=0) for h in heads]
    kw = dict(objective=Objective(kind="epmq", lam=lam), rounding="none", damp=DAMP, batch_size=8)
    full = dataclasses.replace(piece_config("heads", FullConfig()), head_lam=mu)
    res = calibrate(vit_adapter(model), merged, pixels, CalibConfig(**kw, full=full), experts=experts,
                    readout_heads=heads)
    plain = calibrate(vit_adapter(model), merged, pixels, CalibConfig(**kw, full=piece_config("leaves", FullConfig())),
                      experts=experts)
    graphdef = nnx.split(model)[0]
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731

    def pooled(params, x):
        m = nnx.merge(graphdef, params)
        return f64(m.pool(m.encoder(m.embed(jnp.asarray(x)))))

    xs = [pooled(res.params, x) for x in pixels]
    ys = [pooled(e, x) @ f64(e["visual_projection"]["kernel"]) for e, x in zip(experts, pixels)]
    wm = f64(merged["visual_projection"]["kernel"])
    hs = [x.T @ x / np.linalg.norm(x.T @ x) for x in xs]                     # ω_t H_t (Frobenius weights)
    bs = [x.T @ y / np.linalg.norm(x.T @ x) for x, y in zip(xs, ys)]
    h, b = (1 + lam) * sum(hs), sum(bs) + lam * sum(hs) @ wm                  # leaves: the anchored solve
    c = np.mean(np.diag(h))
    p_hat = np.linalg.solve(h + DAMP * c * np.eye(len(h)), b + DAMP * c * wm)
    np.testing.assert_allclose(f64(plain.params["visual_projection"]["kernel"]), p_hat, rtol=2e-3,
                               atol=2e-3 * np.abs(p_hat).max())
    ms = [_metric64(u) for u in heads]
    h_bar = sum(hs)
    h_d = h_bar + DAMP * np.mean(np.diag(h_bar)) * np.eye(len(h_bar))
    a = sum(np.kron(m, g) for m, g in zip(ms, hs)) + mu * np.kron(np.eye(16), h_d)
    rhs = sum(bb @ m for bb, m in zip(bs, ms)) + mu * h_d @ p_hat
    want = np.linalg.solve(a, rhs.reshape(-1, order="F")).reshape(p_hat.shape, order="F")
    got = f64(res.params["visual_projection"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    stat = [s for s in res.stats if s["path"] == "visual_projection/kernel"][0]
    assert stat["head_obj_drop"] > 0 and stat["head_rel_resid"] < 1e-4
    def logit_error(p):        # Σ_t ω_t ‖(X_t P − Y_t) M_t^½‖²: the refit's data term
        return sum(np.trace((x @ p - y) @ m @ (x @ p - y).T) / np.linalg.norm(x.T @ x)
                   for x, y, m in zip(xs, ys, ms))

    assert logit_error(got) < logit_error(p_hat)


def test_heads_refuses_before_work():
    from epmq_jax.calib import vit_adapter

    base, merged, experts, inputs = _problem()
    with pytest.raises(ValueError, match="needs full.leaves"):
        FullConfig(heads=True)
    with pytest.raises(ValueError, match="head_lam"):
        FullConfig(head_lam=0.0)
    kw = dict(rounding="none", batch_size=4)
    heads_on = FullConfig(leaves=True, heads=True)
    with pytest.raises(ValueError, match="no head pseudo block"):
        calibrate(ToyAdapter(), merged, inputs, CalibConfig(full=heads_on, **kw), experts=experts,
                  readout_heads=[np.ones((D, 2))] * 3)
    model, _, vmerged, vexperts, pixels = _vit()
    with pytest.raises(ValueError, match="needs readout_heads="):
        calibrate(vit_adapter(model), vmerged, pixels, CalibConfig(full=heads_on, **kw), experts=vexperts)
    with pytest.raises(ValueError, match=r"readout_heads\[1\] has shape \(8, 3\); expected \(16, n_classes"):
        calibrate(vit_adapter(model), vmerged, pixels, CalibConfig(full=heads_on, **kw), experts=vexperts,
                  readout_heads=[np.ones((16, 3)), np.ones((8, 3))])
    with pytest.raises(ValueError, match="1 heads for 2 tasks"):
        calibrate(vit_adapter(model), vmerged, pixels, CalibConfig(full=heads_on, **kw), experts=vexperts,
                  readout_heads=[np.ones((16, 3))])

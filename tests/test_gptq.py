"""GPTQ against an independent float64 NumPy transcription of the reference (IST-DASLab gptq.py).

The NumPy version below works in the reference's own layout (torch ``W (d_out, d_in)``,
quantizing columns), so it shares no code or layout with ``epmq_jax.quant.gptq``.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epmq_jax.parallel import make_mesh, shard_columns
from epmq_jax.quant import QuantSpec, damped_factor, gptq, rtn

# ---------------------------------------------------------------- NumPy reference (float64)


def _np_find_params(x, bits, sym):
    """Quantizer.find_params(x, weight=True) with perchannel=True; x is (rows, cols)."""
    maxq = 2**bits - 1
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = np.where(both0, -1.0, xmin)
    xmax = np.where(both0, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale[:, None], zero[:, None]


def _np_quant(x, scale, zero, maxq):
    q = np.clip(np.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def np_gptq(w_flax, H, bits, groupsize, sym, blocksize=128, percdamp=0.01, actorder=False,
            static_groups=False):
    """fasterquant() in float64, torch layout. Returns the dequantized kernel in Flax layout."""
    W = w_flax.T.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    cols = W.shape[1]
    maxq = 2**bits - 1
    scale, zero = _np_find_params(W, bits, sym)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [_np_find_params(W[:, i:i + groupsize], bits, sym)
                  for i in range(0, cols, groupsize)]
    if actorder:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = np.argsort(perm)
    Q = np.zeros_like(W)
    H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(H))
    L = np.linalg.cholesky(H)
    Hinv = np.linalg.cholesky(np.linalg.inv(L @ L.T)).T
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = _np_find_params(W[:, i1 + i:i1 + i + groupsize], bits, sym)
                else:
                    idx = perm[i1 + i] if actorder else i1 + i
                    scale, zero = groups[idx // groupsize]
            q = _np_quant(w[:, None], scale, zero, maxq)[:, 0]
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if actorder:
        Q = Q[:, invperm]
    return Q.T


# ---------------------------------------------------------------- data


def correlated_problem(seed, d_in, d_out, n=None, dead=()):
    """Kernel and Hessian H = XᵀX / n of strongly correlated inputs (distinct diagonal)."""
    rng = np.random.default_rng(seed)
    n = n or 4 * d_in
    mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    x = rng.normal(size=(n, d_in)) @ mix * rng.uniform(0.5, 2.0, size=d_in)
    x[:, list(dead)] = 0
    h = x.T @ x / n
    w = rng.normal(size=(d_in, d_out)) * 0.1
    return w.astype(np.float32), h.astype(np.float32)


def objective(dq, w, h):
    d = np.asarray(dq, np.float64) - w
    return float(np.sum(d * (h.astype(np.float64) @ d)))


CASES = [
    dict(bits=4, group_size=32, symmetric=False, act_order=False, static_groups=False, block=64),
    dict(bits=3, group_size=-1, symmetric=False, act_order=False, static_groups=False, block=64),
    dict(bits=4, group_size=32, symmetric=False, act_order=True, static_groups=False, block=64),
    dict(bits=4, group_size=32, symmetric=False, act_order=True, static_groups=True, block=64),
    dict(bits=2, group_size=64, symmetric=True, act_order=False, static_groups=True, block=64),
    dict(bits=8, group_size=96, symmetric=False, act_order=True, static_groups=False, block=64),
    # 12 blocks: the blocks split into 4 ranges with their own lazy-update sizes
    dict(bits=4, group_size=32, symmetric=False, act_order=True, static_groups=False, block=16),
    # a block size dividing neither d_in nor the group size: padding, tiles of 4 rows, up to
    # four groups starting inside one block, one of them reaching into the next block
    dict(bits=4, group_size=32, symmetric=False, act_order=False, static_groups=False, block=100),
]


@pytest.mark.filterwarnings("error")    # no damping retry on these Hessians: no warning
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_numpy_reference(case):
    """Run in float64 so that the comparison is exact up to rounding ties."""
    # d_in = 192 with block 64 -> three blocks; group 96 straddles a block boundary.
    w, h = correlated_problem(0, 192, 48, dead=(5,))
    spec = QuantSpec(bits=case["bits"], group_size=case["group_size"], symmetric=case["symmetric"])
    with jax.enable_x64(True):
        qw, info = gptq(w.astype(np.float64), h.astype(np.float64), spec, block_size=case["block"],
                        act_order=case["act_order"], static_groups=case["static_groups"],
                        return_info=True)
        dq = np.asarray(qw.dequantize())
    ref = np_gptq(w, h, spec.bits, spec.group_size, spec.symmetric, blocksize=case["block"],
                  actorder=case["act_order"], static_groups=case["static_groups"])
    # Scales are stored in float32, hence the relative tolerance. A symmetric grid puts the
    # group maximum exactly on a rounding tie (x / scale = maxq / 2), decided by the last bit,
    # and a flipped code changes the rest of its column: allow a few mismatches there.
    mismatch = np.mean(np.abs(dq - ref) > 1e-5 * np.abs(ref).max())
    assert mismatch <= (0.02 if spec.symmetric else 0.0), mismatch
    np.testing.assert_allclose(float(info.objective), objective(ref, w, h), rtol=1e-2)
    assert float(info.damp_used) == pytest.approx(0.01)
    assert int(info.n_dead) == 1
    assert np.all(dq[5] == 0) and np.all(ref[5] == 0)


@pytest.mark.parametrize("n_samples", [None, 48], ids=["full-rank", "rank-48-of-192"])
def test_float32_close_to_reference(n_samples):
    """In float32 too, also when H is singular and only the damping makes it factor."""
    w, h = correlated_problem(0, 192, 48, n=n_samples, dead=(5,))
    qw = gptq(w, h, QuantSpec(bits=4, group_size=32), block_size=64, act_order=True)
    ref = np_gptq(w, h, 4, 32, False, blocksize=64, actorder=True)
    dq = np.asarray(qw.dequantize())
    assert np.mean(np.abs(dq - ref) > 1e-4) < 0.005
    np.testing.assert_allclose(objective(dq, w, h), objective(ref, w, h), rtol=2e-3)


def test_gptq_beats_rtn_in_output_error_not_weight_error():
    w, h = correlated_problem(1, 128, 64)
    spec = QuantSpec(bits=3, group_size=-1)
    dq_g = np.asarray(gptq(w, h, spec).dequantize())
    dq_r = np.asarray(rtn(w, spec).dequantize())
    assert objective(dq_g, w, h) < 0.7 * objective(dq_r, w, h)
    assert np.sum((dq_g - w) ** 2) > np.sum((dq_r - w) ** 2)


def test_objective_is_undamped_trace():
    w, h = correlated_problem(2, 64, 16)
    qw, info = gptq(w, h, QuantSpec(bits=4, group_size=32), damp=0.1, return_info=True)
    np.testing.assert_allclose(float(info.objective), objective(qw.dequantize(), w, h), rtol=1e-4)


@pytest.mark.parametrize("case", [
    dict(n=None, dead=(), act_order=False, group_size=32, damp=0.01),
    dict(n=48, dead=(5, 70), act_order=True, group_size=32, damp=0.01),      # singular H + dead rows
    dict(n=None, dead=(3,), act_order=False, group_size=-1, damp=0.3),         # a large damping share
    dict(n=60, dead=(), act_order=False, group_size=64, damp=0.0),
], ids=["full-rank", "rank-48-dead-act-order", "damp-0.3", "rank-60-undamped"])
def test_objective_from_rounding_errors_is_the_float64_trace(case):
    """GPTQInfo.objective comes from GPTQ's own rounding errors (no matmul): it must be the
    undamped tr(ΔᵀHΔ) of the returned kernel, computed here in float64, to float32 accuracy."""
    w, h = correlated_problem(11, 192, 40, n=case["n"], dead=case["dead"])
    if case["damp"] == 0.0:
        h = h + 1e-3 * np.mean(np.diag(h)) * np.eye(192, dtype=np.float32)   # factorable undamped
    qw, info = gptq(w, h, QuantSpec(bits=3, group_size=case["group_size"]), damp=case["damp"],
                    act_order=case["act_order"], block_size=64, return_info=True)
    np.testing.assert_allclose(float(info.objective), objective(qw.dequantize(), w, h), rtol=1e-4)


def test_objective_with_the_callers_factor_is_the_undamped_trace():
    """With ``factor`` (a solve's R Rᵀ = H + δ·ridge, ridge 0 on some rows) the objective is
    still tr(ΔᵀHΔ) for the H passed, whatever the factor's own diagonal."""
    w, h = correlated_problem(12, 128, 24, n=64)
    ridge = np.where(np.arange(128) % 5 == 0, 0.0, np.mean(np.diag(h))).astype(np.float32)
    factor = damped_factor(jnp.asarray(h), jnp.float32(0.05), jnp.asarray(ridge))
    qw, info = gptq(w, h, QuantSpec(bits=4, group_size=32), damp=0.05, factor=factor,
                    return_info=True)
    np.testing.assert_allclose(float(info.objective), objective(qw.dequantize(), w, h), rtol=1e-4)


def test_non_positive_definite_hessian_raises_damping_and_warns():
    w, h = correlated_problem(3, 64, 16)
    h = h - 1.02 * np.linalg.eigvalsh(h.astype(np.float64)).max() * 0.05 * np.eye(64, dtype=np.float32)
    assert np.linalg.eigvalsh(h.astype(np.float64)).min() < 0
    with pytest.warns(UserWarning, match=r"hessian of shape \(64, 64\) did not factor with "
                                         r"damping 0.01 .* it took 1 \(more than 10x"):
        qw, info = gptq(w, h, QuantSpec(bits=4, group_size=32), damp=0.01, return_info=True)
    assert float(info.damp_used) == pytest.approx(1.0)
    assert bool(info.cholesky_ok)
    ref = np_gptq(w, h, 4, 32, False, percdamp=float(info.damp_used))
    dq = np.asarray(qw.dequantize())
    assert np.mean(np.abs(dq - ref) > 1e-4) < 0.005


def test_hopeless_hessian_raises():
    w = np.ones((64, 16), np.float32)
    h = -np.eye(64, dtype=np.float32) * 1e12
    h[0, 0] = 1e-30
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, h, QuantSpec(bits=4, group_size=32))


def test_damping_raised_tenfold_is_silent():
    """One retry (x10) is routine for a barely indefinite H; only more than 10x warns."""
    w, h = correlated_problem(3, 64, 16)
    lo, hi = np.linalg.eigvalsh(h.astype(np.float64))[[0, -1]]
    mean_diag = float(np.mean(np.diag(h)))
    # indefinite until a damping between 0.01 and 0.1 times mean(diag H) is added
    h = h - (lo + 0.03 * mean_diag) * np.eye(64, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = gptq(w, h, QuantSpec(bits=4, group_size=32), damp=0.01, return_info=True)
    assert float(info.damp_used) == pytest.approx(0.1)
    assert hi > 0


def test_all_dead_inputs_raise():
    w, _ = correlated_problem(4, 64, 16)
    with pytest.raises(ValueError, match=r"hessian: the diagonal .* is all zero: every input is dead"):
        gptq(w, np.zeros((64, 64), np.float32), QuantSpec(bits=4, group_size=32))


def test_sharded_equals_unsharded():
    assert jax.device_count() == 8
    w, h = correlated_problem(5, 64, 16)
    spec = QuantSpec(bits=4, group_size=32)
    mesh = make_mesh(("model",))
    ws = shard_columns(jnp.asarray(w), mesh)
    assert len(ws.sharding.device_set) == 8
    qs = gptq(ws, h, spec, act_order=True)
    qu = gptq(w, h, spec, act_order=True)
    np.testing.assert_array_equal(np.asarray(qs.packed), np.asarray(qu.packed))
    np.testing.assert_array_equal(np.asarray(qs.scales), np.asarray(qu.scales))
    assert qs.packed.sharding.spec[-1] == "model"


@pytest.mark.parametrize("bad,match", [
    (lambda w, h: (w[None], h), "2-D"),
    (lambda w, h: (w, h[:-1]), "hessian: expected shape"),
    (lambda w, h: (w.at[3, 2].set(jnp.nan), h), r"w: kernel of shape \(64, 8\) contains NaN or inf"),
    (lambda w, h: (w.at[0, 0].set(-jnp.inf), h), r"w: .* NaN or inf"),
    (lambda w, h: (w, h.at[0, 1].set(jnp.inf)), r"hessian: matrix of shape \(64, 64\) contains NaN or inf"),
    (lambda w, h: (w, h.at[5, 5].set(jnp.nan)), r"hessian: .* NaN or inf"),
    (lambda w, h: (w[:60], h[:60, :60]), "d_in=60 is not divisible by group_size=32"),
])
def test_bad_inputs(bad, match):
    w, h = correlated_problem(6, 64, 8)
    w, h = bad(jnp.asarray(w), jnp.asarray(h))
    with pytest.raises(ValueError, match=match):
        gptq(w, h, QuantSpec(bits=4, group_size=32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_kernel_is_rounded_in_float32_and_keeps_its_dtype(dtype):
    w, h = correlated_problem(8, 128, 32)
    wh = jnp.asarray(w, dtype)
    w32 = np.asarray(wh, np.float32)              # the same values, in float32
    spec = QuantSpec(bits=4, group_size=32)
    qh, info_h = gptq(wh, h, spec, return_info=True)
    q32, info_32 = gptq(w32, h, spec, return_info=True)
    dq = qh.dequantize()
    assert dq.dtype == dtype and qh.scales.dtype == jnp.float32
    assert info_h.objective.dtype == jnp.float32
    # rounded in float32: the objective of rounding the float32 copy
    np.testing.assert_allclose(float(info_h.objective), float(info_32.objective), rtol=1e-4)
    # the half-precision kernel adds only its own storage rounding to that objective
    np.testing.assert_allclose(objective(np.asarray(dq, np.float32), w32, h),
                               objective(q32.dequantize(), w32, h), rtol=0.02)
    # and GPTQ still does its job: well below RTN of the same kernel
    assert float(info_h.objective) < 0.7 * objective(rtn(wh, spec).dequantize(), w32, h)


def test_compiles_once_per_shape_and_runs_under_jit():
    w, h = correlated_problem(7, 64, 16)
    spec = QuantSpec(bits=4, group_size=32)
    from epmq_jax.quant._gptq import _gptq
    eager = gptq(w, h, spec).dequantize()
    before = _gptq._cache_size()
    gptq(w * 2, h, spec, damp=0.05)
    assert _gptq._cache_size() == before
    jitted = jax.jit(lambda w, h, d: gptq(w, h, spec, damp=d).dequantize())(w, h, 0.01)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))


def test_damped_factor_is_the_reversed_cholesky_of_the_damped_hessian():
    """R upper with R Rᵀ = H + δ·mean(diag H)·I, against NumPy float64."""
    from epmq_jax.quant import damped_factor
    _, h = correlated_problem(3, 96, 8)
    r, used, ok = damped_factor(jnp.asarray(h), jnp.float32(0.05))
    r = np.asarray(r, np.float64)
    want = h.astype(np.float64) + 0.05 * np.mean(np.diag(h)) * np.eye(96)
    assert bool(ok) and float(used) == pytest.approx(0.05)
    assert np.allclose(r, np.triu(r))
    np.testing.assert_allclose(r @ r.T, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.filterwarnings("error")
def test_given_factor_matches_numpy_reference_and_skips_the_factorisation():
    """GPTQ on a caller's factor: the reference's codes (float64), no Cholesky in the program."""
    from epmq_jax.quant import damped_factor
    w, h = correlated_problem(0, 192, 48)
    spec = QuantSpec(bits=4, group_size=32)
    with jax.enable_x64(True):
        h64 = jnp.asarray(h, jnp.float64)
        factor = damped_factor(h64, jnp.float64(0.01))
        qw = gptq(w.astype(np.float64), h64, spec, block_size=64, factor=factor)
        dq = np.asarray(qw.dequantize())
    ref = np_gptq(w, h, 4, 32, False, blocksize=64)
    assert np.mean(np.abs(dq - ref) > 1e-5 * np.abs(ref).max()) == 0.0
    prog = str(jax.make_jaxpr(lambda w, h, f: gptq(w, h, spec, factor=f).dequantize())(
        w, h, damped_factor(jnp.asarray(h), jnp.float32(0.01))))
    assert "cholesky" not in prog
    assert "cholesky" in str(jax.make_jaxpr(lambda w, h: gptq(w, h, spec).dequantize())(w, h))


def test_bad_factor_raises():
    from epmq_jax.quant import damped_factor
    w, h = correlated_problem(0, 64, 8)
    spec = QuantSpec(bits=4, group_size=32)
    f = damped_factor(jnp.asarray(h), jnp.float32(0.01))
    with pytest.raises(ValueError, match="factor: act_order"):
        gptq(w, h, spec, act_order=True, factor=f)
    with pytest.raises(ValueError, match=r"factor: expected .*R of shape \(32, 32\)"):
        gptq(w, h, spec, factor=damped_factor(jnp.asarray(h[:32, :32]), jnp.float32(0.01)))

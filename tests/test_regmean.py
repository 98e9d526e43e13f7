"""RegMean merge (epmq_jax.merge.regmean) against a NumPy float64 transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epmq_jax.merge import regmean


def _trees(seed=0, T=3, d_in=10, d_out=4):
    r = np.random.default_rng(seed)
    base = {"blk": {"fc": {"kernel": r.normal(size=(d_in, d_out)).astype(np.float32),
                           "bias": r.normal(size=(d_out,)).astype(np.float32)}},
            "head": {"kernel": r.normal(size=(d_out, 2)).astype(np.float32)}}
    experts = [{"blk": {"fc": {"kernel": base["blk"]["fc"]["kernel"] + r.normal(size=(d_in, d_out)).astype(np.float32),
                               "bias": base["blk"]["fc"]["bias"] + r.normal(size=(d_out,)).astype(np.float32)}},
                "head": {"kernel": r.normal(size=(d_out, 2)).astype(np.float32)}} for _ in range(T)]
    xs = [r.normal(size=(60, d_in)) @ (np.eye(d_in) + 0.2 * r.normal(size=(d_in, d_in))) for _ in range(T)]
    grams = [{"blk/fc/kernel": (x.T @ x).astype(np.float32)} for x in xs]
    return base, experts, grams


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_regmean_matches_float64_reference(alpha):
    base, experts, grams = _trees()
    out = regmean(base, experts, grams, filter=r"^blk/", reduce_non_diagonal=alpha)
    gs = [g["blk/fc/kernel"].astype(np.float64) for g in grams]
    gs = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
    ws = [e["blk"]["fc"]["kernel"].astype(np.float64) for e in experts]
    want = np.linalg.solve(sum(gs), sum(g @ w for g, w in zip(gs, ws)))
    np.testing.assert_allclose(out["blk"]["fc"]["kernel"], want, rtol=1e-4, atol=1e-4)
    # non-kernel merged leaves: simple average; unselected leaves: base
    np.testing.assert_allclose(out["blk"]["fc"]["bias"], np.mean([e["blk"]["fc"]["bias"] for e in experts], 0), rtol=1e-6)
    np.testing.assert_array_equal(out["head"]["kernel"], base["head"]["kernel"])


def test_alpha_zero_is_per_input_weighted_average():
    base, experts, grams = _trees(seed=1)
    out = regmean(base, experts, grams, reduce_non_diagonal=0.0)
    d = [np.diag(g["blk/fc/kernel"]).astype(np.float64)[:, None] for g in grams]
    ws = [e["blk"]["fc"]["kernel"] for e in experts]
    np.testing.assert_allclose(out["blk"]["fc"]["kernel"], sum(a * w for a, w in zip(d, ws)) / sum(d), rtol=1e-5)


def test_bad_grams_raise_with_path():
    base, experts, grams = _trees()
    with pytest.raises(ValueError, match="one mapping per expert"):
        regmean(base, experts, grams[:2])
    bad = [dict(g) for g in grams]
    bad[1]["blk/fc/kernel"] = bad[1]["blk/fc/kernel"][:5, :5]
    with pytest.raises(ValueError, match="blk/fc/kernel"):
        regmean(base, experts, bad)
    with pytest.raises(ValueError, match="nope/kernel"):
        regmean(base, experts, [{"nope/kernel": g["blk/fc/kernel"]} for g in grams])
    with pytest.raises(ValueError, match="blk/fc/kernel"):
        regmean(base, experts, grams, filter="^head")


@pytest.mark.parametrize("case", ["nan", "negative_definite"])
def test_non_finite_or_non_gram_matrix_raises_naming_the_leaf(case):
    base, experts, grams = _trees(seed=2)
    bad = [dict(g) for g in grams]
    g = bad[1]["blk/fc/kernel"].copy()
    if case == "nan":
        g[2, 3] = np.nan
    else:
        g = -g
    bad[1]["blk/fc/kernel"] = g
    with pytest.raises(ValueError, match=r"blk/fc/kernel.*grams\[1\]"):
        regmean(base, experts, bad)


def test_sum_no_damping_makes_definite_raises_and_large_damping_warns():
    base, experts, grams = _trees(seed=3, d_in=4)
    # each "Gram" has a non-negative diagonal but is indefinite (eigenvalues 5.5 and -0.5)
    indefinite = (np.eye(4) + 1.5 * (np.ones((4, 4)) - np.eye(4))).astype(np.float32)
    with pytest.warns(UserWarning, match="damping was raised"):
        out = regmean(base, experts, [{"blk/fc/kernel": indefinite} for _ in grams])
    assert np.all(np.isfinite(out["blk"]["fc"]["kernel"]))
    # zero diagonal, non-zero off-diagonal: damping relative to the diagonal cannot help
    hollow = (np.ones((4, 4)) - np.eye(4)).astype(np.float32)
    with pytest.raises(ValueError, match="blk/fc/kernel.*not positive definite"):
        regmean(base, experts, [{"blk/fc/kernel": hollow} for _ in grams])


@pytest.mark.parametrize("kwargs, match", [(dict(damp=float("nan")), "damp"), (dict(damp=-1.0), "damp"),
                                           (dict(reduce_non_diagonal=float("nan")), "reduce_non_diagonal")])
def test_bad_float_settings_raise(kwargs, match):
    base, experts, grams = _trees()
    with pytest.raises(ValueError, match=match):
        regmean(base, experts, grams, **kwargs)


def test_bfloat16_kernels_keep_their_dtype():
    base, experts, grams = _trees(seed=4)
    to_bf16 = lambda t: {k: to_bf16(v) if isinstance(v, dict) else jnp.asarray(v, jnp.bfloat16)
                         for k, v in t.items()}
    out = regmean(to_bf16(base), [to_bf16(e) for e in experts], grams)
    ref = regmean(base, [jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), e)
                         for e in experts], grams)
    assert out["blk"]["fc"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["blk"]["fc"]["kernel"], np.float32), ref["blk"]["fc"]["kernel"],
                               rtol=1e-2, atol=1e-2)

"""RegMean merge (epmq_jax.merge.regmean) against a NumPy float64 transcription."""

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

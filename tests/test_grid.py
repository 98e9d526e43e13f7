"""QuantSpec validation and grid fitting against a NumPy transcription of the GPTQ reference."""

import numpy as np
import pytest

from epmq_jax.quant import QuantSpec, fit_scale_zero, group_params, quantize_codes


def np_fit(x, bits, sym):
    """Reference find_params on a (group, d_out) block, reduced over rows, in x's dtype.

    float32 like the reference: an all-zero group has zero = round(maxq / 2), a tie that
    float32 and float64 break differently."""
    maxq = 2**bits - 1
    xmin, xmax = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(empty, -1, xmin), np.where(empty, 1, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale, zero


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(bits=4.0),
                                 dict(group_size=0), dict(group_size=-2)])
def test_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="QuantSpec"):
        QuantSpec(**bad)


def test_spec_is_frozen_keyword_only():
    spec = QuantSpec()
    assert (spec.bits, spec.group_size, spec.symmetric) == (4, 128, False)
    with pytest.raises(TypeError):
        QuantSpec(4, 128)  # noqa
    with pytest.raises(AttributeError):
        spec.bits = 3


def test_n_groups_and_divisibility_error():
    assert QuantSpec(group_size=-1).n_groups(100) == 1
    assert QuantSpec(group_size=32).n_groups(128) == 4
    with pytest.raises(ValueError, match=r"enc/fc1/kernel: d_in=100 is not divisible by group_size=32"):
        QuantSpec(group_size=32).n_groups(100, path="enc/fc1/kernel")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_fit_matches_reference(bits, sym):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(32, 24)).astype(np.float32)
    x[:, 0] = 0.0                 # all-zero column: range [-1, 1]
    x[:, 1] = np.abs(x[:, 1])     # no negative entry: symmetric keeps min = 0
    x[:, 2] = -np.abs(x[:, 2])    # no positive entry
    spec = QuantSpec(bits=bits, group_size=32, symmetric=sym)
    scale, zero = fit_scale_zero(x, spec)
    rs, rz = np_fit(x, bits, sym)
    np.testing.assert_allclose(scale, rs, rtol=1e-6)
    np.testing.assert_array_equal(zero, rz)
    codes = np.asarray(quantize_codes(x, scale, zero, spec.maxq))
    assert codes.min() >= 0 and codes.max() <= spec.maxq
    if not sym:  # every entry is inside the min-max range: error at most half a step
        err = np.abs(np.asarray(scale) * (codes - np.asarray(zero)) - x)
        assert np.all(err <= np.asarray(scale) / 2 * (1 + 1e-5))


def test_group_params_per_group():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(96, 5)).astype(np.float32)
    s, z = group_params(w, QuantSpec(bits=3, group_size=32))
    assert s.shape == z.shape == (3, 5)
    for k in range(3):
        rs, rz = np_fit(w[32 * k:32 * (k + 1)], 3, False)
        np.testing.assert_allclose(s[k], rs, rtol=1e-6)
        np.testing.assert_array_equal(z[k], rz)

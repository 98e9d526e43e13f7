"""RTN against a direct NumPy min-max rounding, and its error contract."""

import jax.numpy as jnp
import numpy as np
import pytest

from epmq_jax.quant import QuantSpec, rtn


def np_rtn(w, bits, g, sym=False):
    d_in = w.shape[0]
    g = d_in if g == -1 else g
    out = np.empty_like(w, dtype=np.float64)
    maxq = 2**bits - 1
    for k in range(0, d_in, g):
        x = w[k:k + g].astype(np.float64)
        lo, hi = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = np.where(lo < 0, -hi, lo)
        scale = (hi - lo) / maxq
        zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-lo / scale)
        q = np.clip(np.round(x / scale) + zero, 0, maxq)
        out[k:k + g] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits,g,sym", [(4, 32, False), (3, -1, False), (8, 16, False),
                                        (4, 64, True), (2, 32, False)])
def test_matches_numpy(bits, g, sym):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(64, 12)).astype(np.float32)
    qw = rtn(jnp.asarray(w), QuantSpec(bits=bits, group_size=g, symmetric=sym))
    dq = np.asarray(qw.dequantize())
    ref = np_rtn(w, bits, g, sym)
    # symmetric grids put the group maximum on an exact rounding tie: allow those entries
    mism = np.abs(dq - ref) > 1e-5
    assert mism.sum() <= (12 * (64 // g) if sym else 0)
    assert qw.shape == (64, 12) and qw.packed.shape == (8 * bits, 12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_keeps_dtype_rounds_in_float32_and_half_step_error(dtype):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), dtype)
    w32 = np.asarray(w, np.float32)                   # the same values, in float32
    qw = rtn(w, QuantSpec(bits=4, group_size=16))
    dq = qw.dequantize()
    assert dq.dtype == dtype and qw.scales.dtype == jnp.float32
    # rounded in float32: the NumPy float64 rounding of the same values, up to the storage
    # rounding of the result in the kernel's dtype and rounding ties (values of few mantissa
    # bits land on them), which move one entry by one step
    ref = np_rtn(w32, 4, 16)
    eps = float(jnp.finfo(dtype).eps)
    off = np.abs(np.asarray(dq, np.float32) - ref) > eps * np.abs(ref) + 1e-6
    assert off.mean() <= 0.01
    np.testing.assert_allclose(np.linalg.norm(np.asarray(dq, np.float32) - w32),
                               np.linalg.norm(ref - w32), rtol=0.01)
    step = np.repeat(np.asarray(qw.scales), 16, axis=0)
    err = np.abs(np.asarray(dq, np.float32) - w32)
    assert np.all(err <= step / 2 + float(jnp.finfo(dtype).eps) * np.abs(w32) + 1e-6)


@pytest.mark.parametrize("w,match", [
    (np.ones((48, 4), np.float32), "d_in=48 is not divisible by group_size=32"),
    (np.ones((32,), np.float32), "2-D"),
    (np.full((32, 4), np.nan, np.float32), r"w: kernel of shape \(32, 4\) contains NaN or inf"),
    (np.where(np.eye(32, 4) > 0, np.inf, 1.0).astype(np.float32), "w: .* NaN or inf"),
    (np.ones((32, 4), np.int32), "float"),
])
def test_bad_input(w, match):
    with pytest.raises(ValueError, match=match):
        rtn(jnp.asarray(w), QuantSpec(bits=4, group_size=32))

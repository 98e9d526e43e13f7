"""AWQ (epmq_jax.quant.awq): activation-aware scaling beats RTN on inputs with outlier channels."""

import numpy as np
import pytest

from epmq_jax.quant import QuantSpec, awq, awq_search, rtn

SPEC = QuantSpec(bits=3, group_size=16)


def _outlier_inputs(r, n, d_in, outliers):
    x = r.normal(size=(n, d_in))
    x[:, outliers] *= 25.0
    return x.astype(np.float32)


def _out_err(x, w, q):
    x64 = x.astype(np.float64)
    return float(np.sum((x64 @ w.astype(np.float64) - x64 @ np.asarray(q.dequantize(), np.float64)) ** 2))


@pytest.mark.parametrize("clip", [False, True])
def test_awq_output_error_below_rtn_with_outlier_channels(clip):
    r = np.random.default_rng(0)
    d_in, d_out = 32, 16
    outliers = [3, 17, 29]
    x = _outlier_inputs(r, 512, d_in, outliers)
    x_test = _outlier_inputs(r, 512, d_in, outliers)
    w = r.normal(size=(d_in, d_out)).astype(np.float32)
    q_awq, info = awq_search(w, x.T.astype(np.float64) @ x, np.abs(x).mean(0), SPEC, clip=clip,
                             return_info=True)
    q_rtn = rtn(w, SPEC)
    assert q_awq.input_scale is not None and q_awq.input_scale.shape == (d_in,)
    assert float(info["ratio"]) > 0                       # it chose real scaling
    # calibration data: r = 0 (plain RTN) is in the grid, so AWQ can only be better
    assert _out_err(x, w, q_awq) < 0.9 * _out_err(x, w, q_rtn)
    # and the gain holds on fresh data from the same distribution
    assert _out_err(x_test, w, q_awq) < 0.9 * _out_err(x_test, w, q_rtn)
    # the outlier channels got the largest scales
    s = np.asarray(q_awq.input_scale)
    assert set(np.argsort(s)[-3:]) == set(outliers)


def test_effective_kernel_is_dequantized_codes_over_scale():
    r = np.random.default_rng(1)
    x = _outlier_inputs(r, 256, 32, [5])
    w = r.normal(size=(32, 16)).astype(np.float32)
    q = awq(w, x, SPEC, clip=False)
    s = np.asarray(q.input_scale)
    codes = np.asarray(q.codes(), np.float64)
    g = np.asarray(q.g_idx)
    plain = np.asarray(q.scales)[g] * (codes - np.asarray(q.zeros)[g])
    np.testing.assert_allclose(np.asarray(q.dequantize()), plain / s[:, None], rtol=1e-5, atol=1e-6)
    # deployed form: (x / s) @ plain-dequantized codes == x @ effective kernel
    np.testing.assert_allclose((x / s) @ plain, x @ np.asarray(q.dequantize()), rtol=1e-4, atol=1e-3)


def test_clip_search_never_worse_on_calibration_data_than_no_clip():
    r = np.random.default_rng(2)
    x = r.standard_t(df=3, size=(512, 32)).astype(np.float32)
    w = r.standard_t(df=2, size=(32, 16)).astype(np.float32)   # heavy-tailed weights: clipping helps
    no_clip = awq(w, x, SPEC, clip=False)
    clipped = awq(w, x, SPEC, clip=True)
    assert _out_err(x, w, clipped) <= _out_err(x, w, no_clip) * 1.0001


def test_bad_statistics_shapes_raise():
    w = np.ones((16, 4), np.float32)
    with pytest.raises(ValueError, match="hessian"):
        awq_search(w, np.eye(8, dtype=np.float32), np.ones(16, np.float32), SPEC)
    with pytest.raises(ValueError, match="act_mean"):
        awq_search(w, np.eye(16, dtype=np.float32), np.ones(8, np.float32), SPEC)

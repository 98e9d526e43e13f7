"""AWQ's array-level pieces (epmq_jax.quant: awq_scales, clip_search, awq) against a NumPy
float64 transcription of llm-awq (tests/_llm_awq_numpy.py) and against RTN."""

import jax.numpy as jnp
import numpy as np
import pytest
from _llm_awq_numpy import auto_clip_layer, clip_errors, pseudo_quantize, search_module_scale

from epmq_jax.quant import QuantSpec, awq, awq_scales, clip_search, group_grams, rtn, sample_stride

SPEC = QuantSpec(bits=3, group_size=16)


def _outlier_inputs(r, n, d_in, outliers):
    x = r.normal(size=(n, d_in))
    x[:, outliers] *= 25.0
    return x.astype(np.float32)


def test_scales_are_normalised_and_ratio_zero_is_rtn():
    a = jnp.asarray([1e-6, 0.5, 2.0, 30.0], jnp.float32)
    np.testing.assert_allclose(awq_scales(a, 0.0), np.ones(4))
    for r in (0.25, 0.95):
        s = np.asarray(awq_scales(a, r), np.float64)
        want = np.maximum(np.asarray(a, np.float64) ** r, 1e-4)
        np.testing.assert_allclose(s, want / np.sqrt(want.max() * want.min()), rtol=1e-5)
        assert s.max() * s.min() == pytest.approx(1.0, rel=1e-5)


def test_clip_search_matches_llm_awq_auto_clip():
    """Non-negative weights: clipping only moves the top of each range, so the grid has no
    half-step tie (see _llm_awq_numpy) and the chosen bounds must agree entry by entry."""
    r = np.random.default_rng(0)
    x = r.standard_t(df=4, size=(1100, 64))          # 1100 rows: llm-awq samples every 2nd
    w = np.abs(r.standard_t(df=3, size=(48, 64)))    # torch layout (out, in)
    want = auto_clip_layer(w, x, SPEC.bits, SPEC.group_size)[..., 0]          # (out, groups)
    stride = sample_stride(x.shape[0], 512)
    sel = (np.arange(x.shape[0]) % stride == 0).astype(np.float32)
    grams = group_grams(jnp.asarray(x, jnp.float32), jnp.asarray(sel), SPEC)
    got, err = clip_search(jnp.asarray(w.T, jnp.float32), grams, sel.sum(), SPEC)
    got = np.asarray(got, np.float64).T
    assert stride == 2
    assert np.mean(np.isclose(got, want, rtol=1e-5)) > 0.99
    assert (want < np.abs(w).reshape(48, 4, 16).max(-1)).mean() > 0.3       # it really clips
    clip = lambda bound: pseudo_quantize(np.clip(w.reshape(48, 4, 16), -bound[..., None], bound[..., None])
                                         .reshape(w.shape), SPEC.bits, SPEC.group_size)
    ours, ref = clip_errors(w, clip(got), x, SPEC.group_size), clip_errors(w, clip(want), x, SPEC.group_size)
    assert ours.sum() == pytest.approx(ref.sum(), rel=1e-4)
    np.testing.assert_allclose(np.asarray(err, np.float64).T, ours, rtol=1e-3, atol=1e-6 * ours.max())


def test_single_layer_search_matches_llm_awq():
    """quant.awq's scale search is llm-awq's for a layer judged on its own output (o_proj, down_proj)."""
    r = np.random.default_rng(1)
    x = _outlier_inputs(r, 600, 32, [3, 17, 29]).astype(np.float64)
    w = r.normal(size=(24, 32))                                                # torch layout
    ratio, scales, hist = search_module_scale(lambda ws, xx: xx @ ws["w"].T, {"w": w}, x,
                                              SPEC.bits, SPEC.group_size)
    q, s, info = awq(jnp.asarray(w.T, jnp.float32), jnp.asarray(x, jnp.float32), SPEC, clip=False,
                     return_info=True)
    best = sorted(hist)
    assert best[1] > best[0] * 1.002                   # a well-posed search (no near-tie)
    assert float(info["ratio"]) == pytest.approx(ratio, abs=1e-6) and ratio > 0
    np.testing.assert_allclose(np.asarray(info["losses"]), hist, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(s), scales, rtol=1e-4)
    # unclipped: the codes are RTN of W·s
    want = pseudo_quantize(w * scales[None, :], SPEC.bits, SPEC.group_size)
    got = np.asarray(q.dequantize(), np.float64).T
    assert np.mean(np.isclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())) > 0.99


def _out_err(x, w, q, s):
    """‖x W − (x / s) dequant(q)‖² in float64: the deployed layer with 1/s folded upstream."""
    x64 = x.astype(np.float64)
    deq = np.asarray(q.dequantize(), np.float64)
    return float(np.sum((x64 @ w.astype(np.float64) - (x64 / np.asarray(s, np.float64)) @ deq) ** 2))


@pytest.mark.parametrize("clip", [False, True])
def test_awq_beats_rtn_with_outlier_channels(clip):
    r = np.random.default_rng(2)
    outliers = [3, 17, 29]
    x, x_test = _outlier_inputs(r, 512, 32, outliers), _outlier_inputs(r, 512, 32, outliers)
    w = r.normal(size=(32, 16)).astype(np.float32)
    q, s = awq(w, x, SPEC, clip=clip)
    q_rtn, ones = rtn(w, SPEC), np.ones(32, np.float32)
    assert q.input_scale is None
    assert _out_err(x, w, q, s) < 0.9 * _out_err(x, w, q_rtn, ones)
    assert _out_err(x_test, w, q, s) < 0.9 * _out_err(x_test, w, q_rtn, ones)
    assert set(np.argsort(np.asarray(s))[-3:]) == set(outliers)     # the outliers get the largest scales


def test_bad_inputs_raise():
    w = np.ones((16, 4), np.float32)
    with pytest.raises(ValueError, match="x: expected shape"):
        awq(w, np.ones((5, 8), np.float32), SPEC)
    with pytest.raises(ValueError, match="weight"):
        awq(w, np.ones((5, 16), np.float32), SPEC, weight=np.ones(3))
    with pytest.raises(ValueError, match="n_grid"):
        awq(w, np.ones((5, 16), np.float32), SPEC, n_grid=0)

"""Streaming layer statistics against NumPy float64 sums (epmq_jax.calib.stats)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from epmq_jax.calib import stats


def _tasks(seed=0, T=3, d_in=12, d_out=5):
    r = np.random.default_rng(seed)
    out = []
    for t in range(T):
        n = 40 + 13 * t
        x = (r.normal(size=(n, d_in)) * (1 + 2 * t)).astype(np.float32)
        y = r.normal(size=(n, d_out)).astype(np.float32)
        out.append((x, y))
    return out


def _ref(tasks, weighting):
    h = 0.0
    b = 0.0
    yy = 0.0
    for x, y in tasks:
        x, y = x.astype(np.float64), y.astype(np.float64)
        g = x.T @ x
        w = {"uniform": 1.0, "tokens": 1.0 / len(x), "frobenius": 1.0 / np.linalg.norm(g)}[weighting]
        h = h + w * g
        b = b + w * x.T @ y
        yy = yy + w * np.sum(y * y)
    return h, b, yy


@pytest.mark.parametrize("weighting", ["uniform", "tokens", "frobenius"])
def test_streamed_moments_match_float64_sums(weighting):
    tasks = _tasks()
    # every task split into uneven batches: the task weight must see the whole task
    batched = [[(x[:7], y[:7]), (x[7:30], y[7:30]), (x[30:], y[30:])] for x, y in tasks]
    m, omegas = stats.accumulate(batched, weighting)
    h, b, yy = _ref(tasks, weighting)
    np.testing.assert_allclose(m.h, h, rtol=2e-5, atol=1e-6 * np.abs(h).max())
    np.testing.assert_allclose(m.b, b, rtol=2e-5, atol=1e-6 * np.abs(b).max())
    np.testing.assert_allclose(m.yy, yy, rtol=2e-5)
    assert float(m.n) == sum(len(x) for x, _ in tasks)
    np.testing.assert_allclose(m.abs_sum, sum(np.abs(x).sum(0) for x, _ in tasks), rtol=1e-5)
    assert len(omegas) == len(tasks)


def test_row_weights_drop_padding_and_leading_axes_are_rows():
    r = np.random.default_rng(1)
    x = r.normal(size=(4, 6, 8)).astype(np.float32)   # (samples, tokens, d_in)
    y = r.normal(size=(4, 6, 3)).astype(np.float32)
    mask = (r.uniform(size=(4, 6)) > 0.3).astype(np.float32)
    m = stats.moments(x, y, mask)
    keep = mask.reshape(-1) > 0
    xr, yr = x.reshape(-1, 8)[keep].astype(np.float64), y.reshape(-1, 3)[keep].astype(np.float64)
    np.testing.assert_allclose(m.h, xr.T @ xr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.b, xr.T @ yr, rtol=1e-5, atol=1e-5)
    assert float(m.n) == keep.sum()


def test_zero_task_gets_zero_frobenius_weight_not_nan():
    x = np.zeros((5, 4), np.float32)
    w = stats.task_weight(stats.moments(x), "frobenius")
    assert float(w) == 0.0


def test_unknown_weighting_raises():
    with pytest.raises(ValueError, match="task_weights"):
        stats.accumulate([[(np.ones((2, 3), np.float32), None)]], "bogus")


def test_data_parallel_statistics_equal_single_device():
    devices = jax.devices()
    assert len(devices) == 8, "conftest forces 8 CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    r = np.random.default_rng(2)
    x = r.normal(size=(64, 10, 16)).astype(np.float32)
    y = r.normal(size=(64, 10, 7)).astype(np.float32)
    single = jax.jit(stats.moments)(x, y)
    shard = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, shard), jax.device_put(y, shard)
    multi = jax.jit(stats.moments)(xs, ys)
    for a, b in zip(single, multi):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-4)

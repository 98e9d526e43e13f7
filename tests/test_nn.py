"""Quantized inference: linen QuantDense, nnx QuantLinear, kernel replacement in param trees.

Reference for every output: the same layers computed by hand in NumPy float64 from
``kernel.dequantize()`` (x @ W + b), on small user-style models defined here.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epmq_jax.nn import (
    QuantDense,
    QuantLinear,
    dequantize_params,
    quantize_linears,
    quantize_params,
)
from epmq_jax.quant import QuantizedWeight, QuantSpec, gptq, is_quantized

SPEC = QuantSpec(bits=4, group_size=16)


class UserMLP(nn.Module):
    """A user's linen model, written with a swappable dense class."""
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        x = jax.nn.gelu(self.dense(64, name="fc1")(x))
        x = nn.LayerNorm(name="ln")(x)
        return self.dense(8, name="fc2")(x)


def np_mlp(params, x):
    p = params["params"]
    k1, k2 = (np.asarray(p[n]["kernel"].dequantize(), np.float64) for n in ("fc1", "fc2"))
    h = np.asarray(jax.nn.gelu(jnp.asarray(x @ k1 + np.asarray(p["fc1"]["bias"]))), np.float64)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-6) * np.asarray(p["ln"]["scale"]) + np.asarray(p["ln"]["bias"])
    return h @ k2 + np.asarray(p["fc2"]["bias"])


@pytest.fixture(scope="module")
def linen_setup():
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    params = UserMLP().init(jax.random.key(0), x)
    qparams = quantize_params(params, r"fc\d/kernel$", SPEC)
    return x, params, qparams


def test_linen_quantize_params_replaces_only_matching_kernels(linen_setup):
    _, params, qparams = linen_setup
    p = qparams["params"]
    assert is_quantized(p["fc1"]["kernel"]) and is_quantized(p["fc2"]["kernel"])
    assert not is_quantized(p["ln"]["scale"]) and p["fc1"]["bias"] is params["params"]["fc1"]["bias"]
    assert p["fc1"]["kernel"].shape == (32, 64)


def test_linen_user_model_runs_dequantized(linen_setup):
    x, _, qparams = linen_setup
    y = UserMLP().apply(dequantize_params(qparams), x)
    np.testing.assert_allclose(y, np_mlp(qparams, x.astype(np.float64)), rtol=1e-4, atol=1e-4)


def test_linen_quant_dense_runs_packed(linen_setup):
    x, _, qparams = linen_setup
    qmodel = UserMLP(dense=QuantDense)
    y = jax.jit(qmodel.apply)(qparams, x)
    np.testing.assert_allclose(y, np_mlp(qparams, x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    # init gives the same tree structure (packed placeholders), so shapes line up
    init = UserMLP(dense=functools.partial(QuantDense, spec=SPEC)).init(jax.random.key(1), x)
    assert jax.tree.structure(init) == jax.tree.structure(qparams)


def test_linen_quant_dense_rejects_float_kernel(linen_setup):
    x, params, _ = linen_setup
    with pytest.raises(ValueError, match="QuantizedWeight"):
        UserMLP(dense=QuantDense).apply(params, x)


class UserNNX(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([nnx.Linear(32, 32, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = jax.nn.relu(b(x))
        return self.head(x)


def np_nnx(kernels, biases, x):
    x = x.astype(np.float64)
    for k, b in zip(kernels[:-1], biases[:-1]):
        x = np.maximum(x @ k + b, 0)
    return x @ kernels[-1] + biases[-1]


def test_nnx_state_and_quant_linear():
    x = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
    model = UserNNX(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    qstate = quantize_params(state, r"blocks/\d+/kernel", SPEC)
    kernels = [np.asarray(qstate["blocks"][i]["kernel"].get_value().dequantize(), np.float64)
               for i in range(2)] + [np.asarray(model.head.kernel[...], np.float64)]
    biases = [np.asarray(b.bias[...]) for b in model.blocks] + [np.asarray(model.head.bias[...])]
    ref = np_nnx(kernels, biases, x)

    # 1) the user's unchanged model with dequantized kernels
    nnx.update(model, dequantize_params(qstate))
    np.testing.assert_allclose(model(x), ref, rtol=1e-4, atol=1e-5)

    # 2) packed inference: swap the Linears in place (RTN of the dequantized kernel is a
    #    fixed point, so the codes are the same)
    replaced = quantize_linears(model, r"blocks/\d+/kernel", SPEC)
    assert replaced == ["blocks/0", "blocks/1"]
    assert isinstance(model.blocks[0], QuantLinear) and isinstance(model.head, nnx.Linear)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), ref, rtol=1e-4, atol=1e-5)


def test_quant_linear_from_linear_with_gptq_quantizer():
    rng = np.random.default_rng(2)
    lin = nnx.Linear(32, 8, rngs=nnx.Rngs(0))
    xs = rng.normal(size=(128, 32)).astype(np.float32)
    h = xs.T @ xs
    seen = []

    def quantizer(path, w):
        seen.append(path)
        return gptq(w, h, SPEC)

    q = QuantLinear.from_linear(lin, quantizer, path="lin/kernel")
    assert seen == ["lin/kernel"]
    x = rng.normal(size=(4, 32)).astype(np.float32)
    k = np.asarray(q.kernel.get_value().dequantize(), np.float64)
    np.testing.assert_allclose(q(x), x @ k + np.asarray(lin.bias[...]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tree,rule,match", [
    ({"a": {"kernel": jnp.ones((30, 4))}}, "kernel", r"a/kernel: d_in=30 is not divisible by group_size=16"),
    ({"a": {"kernel": jnp.ones((3, 3, 16, 4))}}, "kernel", r"a/kernel: expected a 2-D kernel"),
    ({"a": {"kernel": jnp.full((16, 4), jnp.nan)}}, "kernel", r"a/kernel: .*NaN"),
])
def test_quantize_params_errors_name_the_path(tree, rule, match):
    with pytest.raises(ValueError, match=match):
        quantize_params(tree, rule, SPEC)


def test_custom_quantizer_error_names_path():
    def bad(path, w):
        raise ValueError("no Hessian for this layer")
    with pytest.raises(ValueError, match="enc/kernel: no Hessian"):
        quantize_params({"enc": {"kernel": jnp.ones((16, 4))}}, "kernel", bad)


def test_already_quantized_leaves_are_kept():
    qw = quantize_params({"k": jnp.ones((16, 2))}, None, SPEC)["k"]
    assert isinstance(qw, QuantizedWeight)
    again = quantize_params({"k": qw}, None, SPEC)["k"]
    assert again is qw

"""RegMean over a whole model (calib.regmean_merge) against an independent float64 RegMean.

Each expert's Gram matrices are taken here from that expert's own full forward pass (every
linear layer's input recorded in one pass, not block by block), summed in float64 over the
real samples only; the merge is then solved in NumPy: W = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t with
G̃_t = α G_t + (1 − α) diag(G_t); every other leaf is the experts' average.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from epmq_jax import calib
from epmq_jax._tree import leaves_with_paths
from epmq_jax.models import CLIPVisionConfig, CLIPVisionModelWithProjection

CFG = CLIPVisionConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2, projection_dim=8)


def _setup():
    model = CLIPVisionModelWithProjection(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    base = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    experts = [jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype), base)
               for _ in range(3)]
    inputs = [rng.standard_normal((n, 16, 16, 1)).astype(np.float32) for n in (5, 7, 3)]
    return model, graphdef, base, experts, inputs


def _grams(graphdef, params, x):
    _, caps = calib.capture_nnx(graphdef, params, lambda m, v: m.get_image_features(v), x)
    return {k: (lambda r: r.T @ r)(np.asarray(v, np.float64).reshape(-1, v.shape[-1])) for k, v in caps.items()}


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[int(k) if k.isdigit() else k]
    return np.asarray(tree, np.float64)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_regmean_merge_matches_float64_reference(alpha):
    model, graphdef, base, experts, inputs = _setup()
    # batch_size 4 pads the last batch of every task: padding rows must not count
    merges, stats = calib.regmean_merge(calib.vit_adapter(model), base, experts, inputs, [alpha], batch_size=4)
    got = merges[alpha]
    grams = [_grams(graphdef, e, x) for e, x in zip(experts, inputs)]
    kernels = {s["path"] for s in stats}
    assert len(kernels) == 6 * CFG.num_hidden_layers
    for path, leaf in leaves_with_paths(got):
        ws = [_get(e, path) for e in experts]
        if path in kernels:
            gt = [alpha * g[path] + (1 - alpha) * np.diag(np.diag(g[path])) for g in grams]
            want = np.linalg.solve(sum(gt), sum(g @ w for g, w in zip(gt, ws)))
            assert np.abs(np.asarray(leaf) - want).max() <= 2e-3 * np.abs(want).max(), path
        else:   # biases, norms, embeddings, projection: the experts' average
            np.testing.assert_allclose(np.asarray(leaf), np.mean(ws, axis=0), rtol=1e-5, atol=1e-6)
    # a different merge than the plain average: the test is not vacuous
    q = "encoder/layers/1/mlp/fc2/kernel"
    assert np.abs(_get(got, q) - np.mean([_get(e, q) for e in experts], 0)).max() > 1e-3


def test_regmean_merge_solves_every_alpha_from_one_pass():
    model, _, base, experts, inputs = _setup()
    adapter = calib.vit_adapter(model)
    both, _ = calib.regmean_merge(adapter, base, experts, inputs, [0.3, 0.9], batch_size=8)
    for a in (0.3, 0.9):
        one, _ = calib.regmean_merge(adapter, base, experts, inputs, [a], batch_size=8)
        for (p, x), (_, y) in zip(leaves_with_paths(both[a]), leaves_with_paths(one[a])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=p)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(alphas=[1.5]), "alphas must be"),
    (dict(alphas=[]), "alphas must be"),
    (dict(filter="visual_projection"), "merge filter excludes"),
])
def test_regmean_merge_rejects_bad_arguments(kwargs, needle):
    model, _, base, experts, inputs = _setup()
    kw = {"alphas": [0.5], **kwargs}
    with pytest.raises(ValueError, match=needle):
        calib.regmean_merge(calib.vit_adapter(model), base, experts, inputs, **kw)


def test_regmean_merge_refuses_non_finite_activations():
    model, _, base, experts, inputs = _setup()
    inputs[1][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="not positive definite|non-finite"):
        calib.regmean_merge(calib.vit_adapter(model), base, experts, inputs, [0.5])

"""Tests for epmq_jax.merge against a float64 NumPy transcription of the reference semantics.

The reference functions below transcribe the TIES-Merging reference code (topk_values_mask,
resolve_sign with the "majority" zero rule, disjoint_merge) and Task Arithmetic, on flattened
float64 vectors. Test inputs are dyadic rationals, so float32 task vectors are exact and the
trim decisions (including ties in magnitude) are identical in both.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epmq_jax import merge
from epmq_jax._tree import leaves_with_paths
from epmq_jax.merge._dare import drop_and_rescale
from epmq_jax.merge._ties import _abs_bits, _kth_smallest_bits

# ----------------------------------------------------------------------------- references


def ref_topk_mask(m: np.ndarray, density: float) -> np.ndarray:
    """Reference topk_values_mask on a (T, d) matrix: keep |m| >= k-th smallest, k = d - int(d K)."""
    t, d = m.shape
    if density >= 1.0:
        return m.copy()
    k = d - int(d * density)
    kth = np.sort(np.abs(m), axis=1)[:, k - 1:k]
    return m * (np.abs(m) >= kth)


def ref_resolve_sign(m: np.ndarray) -> np.ndarray:
    s = np.sign(m.sum(axis=0))
    s[s == 0] = np.sign(s.sum())
    return s


def ref_disjoint_merge(m: np.ndarray, merge_func: str, s: np.ndarray) -> np.ndarray:
    keep = np.where(s[None] > 0, m > 0, m < 0)
    sel = m * keep
    if merge_func == "mean":
        return sel.sum(0) / np.maximum((sel != 0).sum(0), 1)
    if merge_func == "sum":
        return sel.sum(0)
    return np.abs(sel).max(0) * s


def ref_ties_vector(tv: np.ndarray, density: float, merge_func: str) -> np.ndarray:
    """Reference TIES on a (T, d) matrix of flattened task vectors -> merged (d,) vector."""
    trimmed = ref_topk_mask(tv, density)
    return ref_disjoint_merge(trimmed, merge_func, ref_resolve_sign(trimmed))


def np_leaves(tree) -> dict[str, np.ndarray]:
    return {p: np.asarray(x, np.float64) for p, x in leaves_with_paths(tree)}


def ref_ties_tree(base, experts, *, scaling, density, trim, merge_func, selected):
    """Reference TIES over trees: global = one flattened vector of the selected leaves."""
    b = np_leaves(base)
    es = [np_leaves(e) for e in experts]
    paths = [p for p in b if selected(p)]
    out = dict(b)
    if trim == "global":
        tv = np.stack([np.concatenate([e[p].ravel() - b[p].ravel() for p in paths]) for e in es])
        merged = ref_ties_vector(tv, density, merge_func)
        off = 0
        for p in paths:
            n = b[p].size
            out[p] = b[p] + scaling * merged[off:off + n].reshape(b[p].shape)
            off += n
    else:
        for p in paths:
            tv = np.stack([e[p].ravel() - b[p].ravel() for e in es])
            out[p] = b[p] + scaling * ref_ties_vector(tv, density, merge_func).reshape(b[p].shape)
    return out


def assert_tree_close(tree, ref: dict[str, np.ndarray], rtol=1e-6, atol=1e-6):
    got = np_leaves(tree)
    assert list(got) == list(ref)
    for p in ref:
        np.testing.assert_allclose(got[p], ref[p], rtol=rtol, atol=atol, err_msg=p)


# ----------------------------------------------------------------------------- inputs


def dyadic(rng, shape, scale_bits: int, span: int) -> np.ndarray:
    return (rng.integers(-span, span + 1, size=shape) / 2.0 ** scale_bits).astype(np.float32)


def make_trees(seed=0, n_experts=3, span=2 ** 14):
    """A linen-style param dict with an int leaf and a head; dyadic values (exact in f32)."""
    rng = np.random.default_rng(seed)
    shapes = {"enc/l0/kernel": (8, 6), "enc/l0/bias": (6,), "enc/l1/kernel": (6, 5),
              "head/kernel": (5, 3)}

    def tree(vals):
        return {"params": {"enc": {"l0": {"kernel": vals["enc/l0/kernel"], "bias": vals["enc/l0/bias"]},
                                   "l1": {"kernel": vals["enc/l1/kernel"]}},
                           "head": {"kernel": vals["head/kernel"]}},
                "step": jnp.array(7, jnp.int32)}

    base = {k: dyadic(rng, s, 8, 2 ** 10) for k, s in shapes.items()}
    experts = [{k: base[k] + dyadic(rng, s, 10, span) for k, s in shapes.items()}
               for _ in range(n_experts)]
    return (jax.tree.map(jnp.asarray, tree(base)),
            [jax.tree.map(jnp.asarray, tree(e)) for e in experts])


def is_float_path(p: str) -> bool:
    return p != "step"


# ----------------------------------------------------------------------------- task arithmetic


@pytest.mark.parametrize("scaling", [0.3, [0.5, -1.0, 0.25]])
def test_task_arithmetic_matches_reference(scaling):
    base, experts = make_trees()
    got = merge.task_arithmetic(base, experts, scaling=scaling)
    b, es = np_leaves(base), [np_leaves(e) for e in experts]
    lam = scaling if isinstance(scaling, list) else [scaling] * 3
    ref = {p: (b[p] + sum(l * (e[p] - b[p]) for l, e in zip(lam, es)) if is_float_path(p)
               else b[p]) for p in b}
    assert_tree_close(got, ref)
    assert got["step"].dtype == jnp.int32


def test_task_vector_is_difference():
    base, experts = make_trees()
    tv = merge.task_vector(base, experts[1])
    b, e = np_leaves(base), np_leaves(experts[1])
    assert_tree_close(tv, {p: e[p] - b[p] if is_float_path(p) else b[p] for p in b}, atol=0)


def test_filter_takes_unmatched_leaves_from_base():
    base, experts = make_trees()
    got = merge.task_arithmetic(base, experts, scaling=1.0, filter=r"^params/enc/.*kernel$")
    b, es = np_leaves(base), [np_leaves(e) for e in experts]
    for p, x in np_leaves(got).items():
        if re.search(r"^params/enc/.*kernel$", p):
            np.testing.assert_allclose(x, b[p] + sum(e[p] - b[p] for e in es), rtol=1e-6)
        else:
            np.testing.assert_array_equal(x, b[p])
    # A compiled pattern and a predicate select the same leaves.
    same = merge.task_arithmetic(base, experts, scaling=1.0,
                                 filter=lambda p: p.startswith("params/enc") and p.endswith("kernel"))
    chex_equal(got, same)


def chex_equal(a, b):
    for (pa, xa), (pb, xb) in zip(leaves_with_paths(a), leaves_with_paths(b)):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb), err_msg=pa)


def test_average_matches_mean_and_copies_unmerged_from_first_expert():
    _, experts = make_trees()
    experts[0]["step"] = jnp.array(11, jnp.int32)
    got = merge.average(experts, filter="enc")
    es = [np_leaves(e) for e in experts]
    ref = {p: np.mean([e[p] for e in es], axis=0) if "enc" in p else es[0][p] for p in es[0]}
    assert_tree_close(got, ref)
    assert int(got["step"]) == 11
    single = merge.average(experts[:1])
    chex_equal(single, experts[0])


def test_bfloat16_leaves_keep_dtype():
    base, experts = make_trees()
    cast = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, t)
    got = merge.task_arithmetic(cast(base), [cast(e) for e in experts])
    assert got["params"]["enc"]["l0"]["kernel"].dtype == jnp.bfloat16
    ref = merge.task_arithmetic(jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, cast(base)),
                                [jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, cast(e)) for e in experts])
    np.testing.assert_allclose(np.asarray(got["params"]["enc"]["l0"]["kernel"], np.float32),
                               np.asarray(ref["params"]["enc"]["l0"]["kernel"]), rtol=1e-2)


# ----------------------------------------------------------------------------- TIES


_TIES_CASES = (
    # every merge_func with both trims at the default density, distinct-ish magnitudes
    [(t, f, 0.2, 2 ** 14) for t in ("global", "per_tensor") for f in ("mean", "sum", "max")]
    # span=8: task-vector entries take 17 values, so magnitudes tie at the threshold and many
    # entries sum to exactly zero (the majority-sign rule is exercised)
    + [(t, f, 0.5, 8) for t in ("global", "per_tensor") for f in ("mean", "max")]
    + [("global", "sum", 1.0, 8), ("per_tensor", "mean", 1.0, 8)]
)


@pytest.mark.parametrize("trim,merge_func,density,span", _TIES_CASES)
def test_ties_matches_reference(trim, merge_func, density, span):
    base, experts = make_trees(seed=1, span=span)
    got = merge.ties_merging(base, experts, scaling=0.7, density=density, trim=trim,
                             merge_func=merge_func)
    ref = ref_ties_tree(base, experts, scaling=0.7, density=density, trim=trim,
                        merge_func=merge_func, selected=is_float_path)
    assert_tree_close(got, ref)


def test_ties_with_filter_trims_over_merged_leaves_only():
    base, experts = make_trees(seed=2)
    sel = lambda p: "enc" in p
    got = merge.ties_merging(base, experts, density=0.3, filter="enc")
    ref = ref_ties_tree(base, experts, scaling=0.3, density=0.3, trim="global",
                        merge_func="mean", selected=sel)
    assert_tree_close(got, ref)


def test_ties_zero_sum_entries_take_majority_sign_hand_computed():
    # Two experts, no trim. Entries 0..2 elect +,+,-; entry 3 sums to zero -> majority sign of
    # the elected signs (+1 + 1 - 1 = +1) -> +, so only the positive value (2.0) is kept.
    base = {"w": jnp.zeros(4)}
    e1 = {"w": jnp.array([1.0, 3.0, -2.0, 2.0])}
    e2 = {"w": jnp.array([1.0, -1.0, -4.0, -2.0])}
    got = merge.ties_merging(base, [e1, e2], scaling=1.0, density=1.0, merge_func="mean")
    np.testing.assert_allclose(got["w"], [1.0, 3.0, -3.0, 2.0])
    # Flip the majority: now entries elect -,-,+ and the zero-sum entry takes -.
    neg = lambda t: {"w": -t["w"]}
    got = merge.ties_merging(base, [neg(e1), neg(e2)], scaling=1.0, density=1.0, merge_func="max")
    np.testing.assert_allclose(got["w"], [-1.0, -3.0, 4.0, -2.0])


def test_ties_majority_scope_follows_trim():
    # Leaf "a" votes strongly positive, leaf "b" weakly negative and has a zero-sum entry.
    base = {"a": jnp.zeros(5), "b": jnp.zeros(3)}
    e1 = {"a": jnp.ones(5), "b": jnp.array([-1.0, -1.0, 1.0])}
    e2 = {"a": jnp.ones(5), "b": jnp.array([-1.0, -1.0, -1.0])}
    kw = dict(scaling=1.0, density=1.0, merge_func="sum")
    g = merge.ties_merging(base, [e1, e2], trim="global", **kw)
    p = merge.ties_merging(base, [e1, e2], trim="per_tensor", **kw)
    np.testing.assert_allclose(g["b"], [-2.0, -2.0, 1.0])   # global majority: +
    np.testing.assert_allclose(p["b"], [-2.0, -2.0, -1.0])  # leaf majority: -


def test_kth_smallest_bits_is_exact():
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((2,) + s).astype(np.float32) for s in [(7, 5), (13,), (1,)]]
    xs[0][:, 0, :3] = 0.0
    xs[1][:, :2] = -0.0
    xs[1][:, 5] = xs[0][:, 1, 1]  # a duplicate magnitude
    bits = [_abs_bits(jnp.asarray(x)) for x in xs]
    n = sum(x[0].size for x in xs)
    ks = [1, 2, 3, 17, 30, n]
    # The same three leaves repeated once per rank sought, each copy its own group.
    got = _kth_smallest_bits(bits * len(ks), [g for g in range(len(ks)) for _ in xs], ks)
    got = jax.lax.bitcast_convert_type(got, jnp.float32)
    for t in range(2):
        flat = np.sort(np.abs(np.concatenate([x[t].ravel() for x in xs])))
        np.testing.assert_array_equal(got[t], flat[np.array(ks) - 1])
    # Per group: leaves 0 and 2 in group 1, leaf 1 in group 0.
    got = jax.lax.bitcast_convert_type(_kth_smallest_bits(bits, [1, 0, 1], [4, 9]), jnp.float32)
    for t in range(2):
        g1 = np.sort(np.abs(np.concatenate([xs[0][t].ravel(), xs[2][t].ravel()])))
        assert got[t, 0] == np.sort(np.abs(xs[1][t]))[3] and got[t, 1] == g1[8]


# ----------------------------------------------------------------------------- DARE


def test_dare_drop_fraction_rescale_and_determinism():
    n = 200_000
    base = {"w": jnp.zeros((n,)), "h": jnp.ones(3)}
    expert = {"w": jnp.full((n,), 2.0), "h": jnp.ones(3) * 5}
    key = jax.random.key(0)
    got = np.asarray(merge.dare(base, [expert], key=key, drop=0.9, scaling=1.0, filter="w")["w"])
    dropped = np.mean(got == 0.0)
    assert abs(dropped - 0.9) < 4 * np.sqrt(0.9 * 0.1 / n)
    np.testing.assert_allclose(got[got != 0], 2.0 / 0.1, rtol=1e-6)
    assert abs(got.mean() - 2.0) < 4 * 2.0 * np.sqrt(0.9 / 0.1 / n)  # E = τ, 4 sigma
    no_rescale = np.asarray(merge.dare(base, [expert], key=key, drop=0.9, rescale=False,
                                       scaling=1.0, filter="w")["w"])
    np.testing.assert_array_equal(no_rescale != 0, got != 0)
    np.testing.assert_allclose(no_rescale[no_rescale != 0], 2.0)
    again = merge.dare(base, [expert], key=key, drop=0.9, scaling=1.0, filter="w")
    np.testing.assert_array_equal(np.asarray(again["w"]), got)
    other = merge.dare(base, [expert], key=jax.random.key(1), drop=0.9, scaling=1.0, filter="w")
    assert np.mean(np.asarray(other["w"]) != got) > 0.1
    np.testing.assert_array_equal(np.asarray(other["h"]), 1.0)  # unmatched leaf from base


def test_dare_without_drop_equals_its_merge():
    base, experts = make_trees(seed=4)
    key = jax.random.key(3)
    chex_equal(merge.dare(base, experts, key=key, drop=0.0, scaling=0.4),
               merge.task_arithmetic(base, experts, scaling=0.4))
    chex_equal(merge.dare(base, experts, key=key, drop=0.0, merge="ties", scaling=0.4,
                          density=0.3, trim="per_tensor", merge_func="max"),
               merge.ties_merging(base, experts, scaling=0.4, density=0.3, trim="per_tensor",
                                  merge_func="max"))


def test_dare_ties_is_reference_ties_on_dropped_vectors():
    base, experts = make_trees(seed=5)
    key = jax.random.key(7)
    got = merge.dare(base, experts, key=key, drop=0.5, merge="ties", density=0.4, scaling=1.0)
    b = np_leaves(base)
    paths = [p for p in b if is_float_path(p)]
    tvs = [[jnp.asarray(np_leaves(e)[p] - b[p], jnp.float32) for p in paths] for e in experts]
    dropped = [np.concatenate([np.asarray(x, np.float64).ravel() for x in tv])
               for tv in drop_and_rescale(key, tvs, 0.5, True)]
    # The drop pattern itself: expert t keeps bernoulli(fold_in(key, t)) over its entries.
    keep0 = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, dropped[0].shape))
    flat0 = np.concatenate([np.asarray(x, np.float64).ravel() for x in tvs[0]])
    np.testing.assert_allclose(dropped[0], np.where(keep0, flat0 / 0.5, 0.0), rtol=1e-6)
    merged = ref_ties_vector(np.stack(dropped), 0.4, "mean")
    off, ref = 0, dict(b)
    for p in paths:
        ref[p] = b[p] + merged[off:off + b[p].size].reshape(b[p].shape)
        off += b[p].size
    assert_tree_close(got, ref)


# ----------------------------------------------------------------------------- jit, nnx


def test_jit_matches_eager():
    base, experts = make_trees(seed=6)
    for fn in [functools.partial(merge.ties_merging, density=0.3, trim="global"),
               functools.partial(merge.task_arithmetic, scaling=0.5, filter="kernel"),
               merge.average]:
        args = (experts,) if fn is merge.average else (base, experts)
        chex_close(jax.jit(fn)(*args), fn(*args))
    dare = functools.partial(merge.dare, drop=0.7, merge="ties", density=0.5)
    key = jax.random.key(0)
    chex_close(jax.jit(lambda b, e, k: dare(b, e, key=k))(base, experts, key),
               dare(base, experts, key=key))


def chex_close(a, b):
    for (pa, xa), (pb, xb) in zip(leaves_with_paths(a), leaves_with_paths(b)):
        assert pa == pb
        np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), rtol=1e-6, atol=1e-7,
                                   err_msg=pa)


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 2, rngs=rngs)


def test_nnx_state_input():
    states = [nnx.state(_MLP(nnx.Rngs(i))) for i in range(3)]
    base, experts = states[0], states[1:]
    got = merge.ties_merging(base, experts, density=0.5, filter="kernel")
    assert isinstance(got, nnx.State)
    ref = ref_ties_tree(base, experts, scaling=0.3, density=0.5, trim="global",
                        merge_func="mean", selected=lambda p: "kernel" in p)
    assert_tree_close(got, ref, rtol=1e-5, atol=1e-6)
    ta = merge.task_arithmetic(base, experts)
    model = _MLP(nnx.Rngs(0))
    nnx.update(model, ta)
    b, es = np_leaves(base), [np_leaves(e) for e in experts]
    np.testing.assert_allclose(np.asarray(model.fc1.kernel[...]),
                               b["fc1/kernel"] + 0.3 * sum(e["fc1/kernel"] - b["fc1/kernel"] for e in es),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs


ALL_MERGES = {
    "task_arithmetic": lambda b, es: merge.task_arithmetic(b, es),
    "ties": lambda b, es: merge.ties_merging(b, es),
    "dare": lambda b, es: merge.dare(b, es, key=jax.random.key(0)),
    "average": lambda b, es: merge.average([b, *es]),
    "task_vector": lambda b, es: merge.task_vector(b, es[0]),
}


def _with(tree, path, value):
    tree = jax.tree.map(lambda x: x, tree)
    d = tree
    keys = path.split("/")
    for k in keys[:-1]:
        d = d[k]
    if value is None:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value
    return tree


@pytest.mark.parametrize("name", list(ALL_MERGES))
@pytest.mark.parametrize("case", ["shape", "dtype", "missing", "extra", "nan", "inf_base"])
def test_bad_inputs_name_the_leaf(name, case):
    base, experts = make_trees()
    k = "params/enc/l1/kernel"
    if case == "shape":
        experts[0] = _with(experts[0], k, jnp.zeros((5, 6)))
        expect = [k, "(5, 6)", "(6, 5)"]
    elif case == "dtype":
        experts[0] = _with(experts[0], k, jnp.zeros((6, 5), jnp.bfloat16))
        expect = [k, "bfloat16", "float32"]
    elif case == "missing":
        experts[0] = _with(experts[0], k, None)
        expect = [k, "no leaf"]
    elif case == "extra":
        experts[0] = _with(experts[0], "params/enc/l1/bias", jnp.zeros(5))
        expect = ["params/enc/l1/bias", "extra"]
    elif case == "nan":
        experts[0] = _with(experts[0], k, experts[0]["params"]["enc"]["l1"]["kernel"].at[2, 1].set(jnp.nan))
        expect = [k, "NaN"]
    else:
        base = _with(base, "params/head/kernel", base["params"]["head"]["kernel"].at[0, 0].set(jnp.inf))
        expect = ["params/head/kernel", "inf"]
    with pytest.raises(ValueError) as err:
        ALL_MERGES[name](base, experts)
    for s in expect:
        assert s in str(err.value), (s, str(err.value))


def test_nnx_state_structure_mismatch():
    base = nnx.state(_MLP(nnx.Rngs(0)))
    other = nnx.state(nnx.Linear(4, 6, rngs=nnx.Rngs(1)))
    with pytest.raises(ValueError, match="fc1/bias"):
        merge.task_arithmetic(base, [other])


@pytest.mark.parametrize("call", [
    lambda b: merge.task_arithmetic(b, []),
    lambda b: merge.ties_merging(b, []),
    lambda b: merge.dare(b, [], key=jax.random.key(0)),
    lambda b: merge.average([]),
])
def test_no_experts(call):
    base, _ = make_trees()
    with pytest.raises(ValueError, match="No experts"):
        call(base)


@pytest.mark.parametrize("kwargs,match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(trim="layer"), "trim"), (dict(merge_func="median"), "merge_func"),
])
def test_bad_ties_settings(kwargs, match):
    base, experts = make_trees()
    with pytest.raises(ValueError, match=match):
        merge.ties_merging(base, experts, **kwargs)


def test_bad_dare_and_scaling_settings():
    base, experts = make_trees()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="drop"):
        merge.dare(base, experts, key=key, drop=1.0)
    with pytest.raises(ValueError, match="merge must be"):
        merge.dare(base, experts, key=key, merge="avg")
    with pytest.raises(ValueError, match="no extra settings"):
        merge.dare(base, experts, key=key, density=0.5)
    with pytest.raises(ValueError, match="Unknown TIES"):
        merge.dare(base, experts, key=key, merge="ties", dens=0.5)
    with pytest.raises(ValueError, match="one per expert"):
        merge.task_arithmetic(base, experts, scaling=[0.1, 0.2])


def test_validate_false_skips_value_checks():
    base, experts = make_trees()
    experts[0] = _with(experts[0], "params/head/kernel",
                       experts[0]["params"]["head"]["kernel"].at[0, 0].set(jnp.nan))
    out = merge.task_arithmetic(base, experts, validate=False)
    assert np.isnan(np.asarray(out["params"]["head"]["kernel"])[0, 0])


@pytest.mark.parametrize("call, match", [
    (lambda b, es: merge.task_arithmetic(b, es, scaling=float("nan")), "scaling"),
    (lambda b, es: merge.task_arithmetic(b, es, scaling=float("inf")), "scaling"),
    (lambda b, es: merge.task_arithmetic(b, es, scaling=[0.3, float("nan"), 0.3]), "scaling"),
    (lambda b, es: merge.ties_merging(b, es, scaling=float("nan")), "scaling"),
    (lambda b, es: merge.ties_merging(b, es, density=float("nan")), "density"),
    (lambda b, es: merge.dare(b, es, key=jax.random.key(0), drop=float("nan")), "drop"),
    (lambda b, es: merge.dare(b, es, key=jax.random.key(0), scaling=float("nan")), "scaling"),
    (lambda b, es: merge.dare(b, es, key=jax.random.key(0), merge="ties", scaling=float("inf")),
     "scaling"),
])
def test_non_finite_float_arguments_raise(call, match):
    base, experts = make_trees()
    with pytest.raises(ValueError, match=match):
        call(base, experts)


@pytest.mark.parametrize("call", [
    lambda b, es, f: merge.task_arithmetic(b, es, filter=f),
    lambda b, es, f: merge.ties_merging(b, es, filter=f),
    lambda b, es, f: merge.dare(b, es, key=jax.random.key(0), filter=f),
    lambda b, es, f: merge.dare(b, es, key=jax.random.key(0), merge="ties", filter=f),
    lambda b, es, f: merge.average([b, *es], filter=f),
])
def test_filter_matching_no_leaf_raises_naming_it(call):
    base, experts = make_trees()
    with pytest.raises(ValueError, match="nomatch"):
        call(base, experts, "nomatch")

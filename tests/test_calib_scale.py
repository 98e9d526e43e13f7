"""Calibration at LLM size on a tiny Llama: experts streamed from disk, activations spilled to
host memory, parameters and statistics sharded over 8 emulated devices.

References: the transformers checkpoint's own tensors (what a streamed block must hold), the
tensor names read (what streaming may touch), the in-memory run (streaming and spilling only
change where the same arrays live, so the same compiled programs must give the same bits), the
stated size formula of the activations, and the single-device run (sharding changes the order
of sums: equal quality, float32 agreement without rounding).
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_models_llama import torch_model

from epmq_jax._tree import leaves_with_paths
from epmq_jax.calib import (
    CalibConfig,
    Objective,
    _placement,
    calibrate,
    decoder_adapter,
    driver,
    regmean_merge,
)
from epmq_jax.models import from_pretrained, hf, llama, streamed
from epmq_jax.parallel import make_mesh
from epmq_jax.quant import QuantSpec, is_quantized

SPEC = QuantSpec(bits=4, group_size=16)
EPMQ = CalibConfig(objective=Objective(kind="epmq", lam=0.1), spec=SPEC, batch_size=4)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny merged Llama and two experts on disk; the merge loaded; the experts' torch models."""
    d = tmp_path_factory.mktemp("scale")
    torch_model(d / "base", "llama", seed=0)
    refs = [torch_model(d / f"e{t}", "llama", seed=t + 1) for t in range(2)]
    model = from_pretrained(d / "base")
    return d, model, nnx.to_pure_dict(nnx.state(model, nnx.Param)), refs


def tasks(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in (6, 5):
        mask = (np.arange(10)[None, :] >= rng.integers(0, 4, (n, 1))).astype(np.int32)
        out.append({"input_ids": rng.integers(0, 96, (n, 10)), "attention_mask": mask})
    return out


@pytest.fixture
def reads(monkeypatch):
    """The checkpoint tensor names read (per directory), from now on."""
    seen: dict[str, list[str]] = {}
    real = hf.CheckpointTensors.__getitem__

    def spy(self, name):
        seen.setdefault(self.directory.name, []).append(name)
        return real(self, name)

    monkeypatch.setattr(hf.CheckpointTensors, "__getitem__", spy)
    return seen


def in_memory(d):
    return [nnx.to_pure_dict(nnx.state(from_pretrained(d / f"e{t}"), nnx.Param)) for t in range(2)]


def flat(tree):
    out = {}
    for path, leaf in leaves_with_paths(tree, is_leaf=is_quantized):
        if is_quantized(leaf):
            out.update({f"{path}/{f}": np.asarray(getattr(leaf, f)) for f in ("packed", "scales", "zeros")})
        else:
            out[path] = np.asarray(leaf)
    return out


def assert_same(a, b):
    fa, fb = flat(a.params), flat(b.params)
    assert fa.keys() == fb.keys()
    for p in fa:
        np.testing.assert_array_equal(fa[p], fb[p], err_msg=p)
    assert a.stats == [{**s, "block_time_s": r["block_time_s"]} for s, r in zip(b.stats, a.stats)]


# ----------------------------------------------------------------------------- streamed experts


def test_streamed_tree_reads_only_the_block_asked_for(llamas, reads):
    d, _, params, refs = llamas
    tree = llama.experts_from_pretrained([d / "e1"], like=params)[0]
    view = tree["model"]["layers"][1]
    assert len(view) == 4 and sorted(view) == ["input_layernorm", "mlp", "post_attention_layernorm",
                                               "self_attn"]
    abstract = streamed.abstract(tree)
    assert abstract["model"]["layers"][1]["mlp"]["down_proj"]["kernel"].shape == (64, 32)
    assert reads == {}                                     # views, shapes: nothing read
    block = streamed.materialize(view)
    assert sorted(reads["e1"]) == sorted(n for n in refs[1].state_dict() if n.startswith("model.layers.1."))
    torch_params = refs[1].state_dict()
    for path, value in leaves_with_paths(block):
        name = "model.layers.1." + path.replace("/", ".").replace("kernel", "weight").replace("scale", "weight")
        want = torch_params[name].numpy()
        assert isinstance(value, np.ndarray) and value.flags.c_contiguous and value.dtype == np.float32
        np.testing.assert_array_equal(value, want.T if path.endswith("kernel") else want, err_msg=path)


def test_mismatched_checkpoint_is_refused_from_its_headers(llamas, tmp_path, reads):
    d, _, params, _ = llamas
    torch_model(tmp_path / "wide", "llama", intermediate_size=48)
    with pytest.raises(hf.CheckpointMismatchError, match=r"model\.layers\.0\.mlp\.up_proj\.weight -> "
                       r"model/layers/0/mlp/up_proj/kernel: checkpoint \(32, 48\), model \(32, 64\)"):
        llama.experts_from_pretrained([tmp_path / "wide"], like=params)
    assert reads == {}
    from safetensors.numpy import load_file, save_file

    src = load_file(str(d / "e0" / "model.safetensors"))
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text((d / "e0" / "config.json").read_text())
    save_file({k: v for k, v in src.items() if k != "model.norm.weight"},
              str(tmp_path / "short" / "model.safetensors"))
    with pytest.raises(hf.CheckpointMismatchError, match="missing model params.*model/norm/scale"):
        llama.experts_from_pretrained([tmp_path / "short"], like=params)


def test_calibration_with_streamed_experts_equals_in_memory(llamas, reads):
    """Same arrays, same programs: the same bits. Each expert tensor the calibration needs is read
    once (block k when block k is reached, the embedding once); the final norm and lm_head never."""
    d, model, params, refs = llamas
    lazy = llama.experts_from_pretrained([d / "e0", d / "e1"], like=params)
    streamed_run = calibrate(decoder_adapter(model), params, tasks(), EPMQ, experts=lazy)
    for t in range(2):
        names = reads[f"e{t}"]
        assert sorted(names) == sorted(n for n in refs[t].state_dict() if n.startswith("model.layers.")
                                       or n == "model.embed_tokens.weight")
    assert_same(streamed_run, calibrate(decoder_adapter(model), params, tasks(), EPMQ,
                                        experts=in_memory(d)))


def test_regmean_with_streamed_experts_equals_in_memory(llamas):
    d, model, params, _ = llamas
    lazy = llama.experts_from_pretrained([d / "e0", d / "e1"], like=params)
    a, _ = regmean_merge(decoder_adapter(model), params, lazy, tasks(), alphas=(0.6,), batch_size=4)
    b, _ = regmean_merge(decoder_adapter(model), params, in_memory(d), tasks(), alphas=(0.6,),
                         batch_size=4)
    fa, fb = flat(a[0.6]), flat(b[0.6])
    assert fa.keys() == fb.keys()
    for p in fa:
        np.testing.assert_array_equal(fa[p], fb[p], err_msg=p)


def test_regmean_refuses_experts_unlike_base_before_any_work(llamas, monkeypatch):
    d, model, params, _ = llamas
    lazy = llama.experts_from_pretrained([d / "e0"], like=params)
    monkeypatch.setattr("epmq_jax.calib.regmean._batches", lambda *a, **k: pytest.fail("work started"))
    missing, extra = in_memory(d)[1], in_memory(d)[1]
    del missing["model"]["norm"]
    extra["model"]["norm"]["bias"] = extra["model"]["norm"]["scale"]
    for bad, match in ((missing, r"experts\[1\] has no leaf at path 'model/norm/scale'"),
                       (extra, r"experts\[1\] has an extra leaf at path 'model/norm/bias'")):
        with pytest.raises(ValueError, match=match):
            regmean_merge(decoder_adapter(model), params, [lazy[0], bad], tasks(), alphas=(0.6,))


def test_full_mode_with_streamed_experts_equals_in_memory(llamas):
    """E-PMQ-full reads expert blocks as E-PMQ does; only its stem/head (whole trees) refuse them."""
    from epmq_jax.calib.full import FullConfig

    d, model, params, _ = llamas
    lazy = llama.experts_from_pretrained([d / "e0", d / "e1"], like=params)
    cfg = dataclasses.replace(EPMQ, full=FullConfig())
    assert_same(calibrate(decoder_adapter(model), params, tasks(), cfg, experts=lazy),
                calibrate(decoder_adapter(model), params, tasks(), cfg, experts=in_memory(d)))
    with pytest.raises(ValueError, match="config.full.leaves .* needs the experts in memory"):
        calibrate(decoder_adapter(model), params, tasks(),
                  dataclasses.replace(EPMQ, full=FullConfig(leaves=True)), experts=lazy)


# ----------------------------------------------------------------------------- spilled activations


def activation_bytes(config, data, batch_size, k=1):
    """docs/scale.md: per block, Σ_t N_t·S·(2·(d·b + 8) + Σ_g d_in,g·b) bytes (N_t: task t's
    samples rounded up to the batch size: the largest task split evenly into as few batches of
    at most ``batch_size`` as it allows, rounded up to a multiple of the mesh axis size k;
    carries of both paths hold the hidden states and two int32 masks; the expert path keeps each
    group's input: q/k/v and gate/up read d, o_proj heads·head_dim, down_proj the MLP width)."""
    d, b = config.hidden_size, 4
    groups = d + config.num_attention_heads * config.head_dim + d + config.intermediate_size
    n_max = max(x["input_ids"].shape[0] for x in data)
    bs = -(-n_max // -(-n_max // batch_size))
    bs = -(-bs // k) * k
    total = 0
    for x in data:
        n, s = x["input_ids"].shape
        total += -(-n // bs) * bs * s * (2 * (d * b + 8) + groups * b)
    return total


@pytest.mark.parametrize("sharded", [False, True])
def test_spilled_activations_give_the_same_result(llamas, monkeypatch, sharded):
    d, model, params, _ = llamas
    lazy = llama.experts_from_pretrained([d / "e0", d / "e1"], like=params)
    mesh = make_mesh(("x",)) if sharded else None
    moved = []
    real = _placement._to_host
    monkeypatch.setattr(_placement, "_to_host", lambda x: (moved.append(x.shape), real(x))[1])
    need = activation_bytes(model.config, tasks(), 4, 8 if sharded else 1) // (8 if sharded else 1)
    run = lambda budget: calibrate(decoder_adapter(model), params, tasks(), EPMQ,  # noqa: E731
                                   experts=lazy, mesh=mesh, activation_budget=budget)
    split = []                         # blocks run split at their groups' inputs (calib._segments)
    real_advance = driver._advance_segment
    monkeypatch.setattr(driver, "_advance_segment", lambda *a, **k: (split.append(1), real_advance(*a, **k))[1])
    kept = run(need)                   # exactly the stated size: fits, nothing moved, and no
    assert moved == [] and split == []   # room for the values the split passes hand on
    spilled = run(need - 1)
    assert len(moved) > 0 and split == []
    assert_same(spilled, kept)
    n_moved = len(moved)
    roomy = run(2 * need)              # room for them too: split, nothing moved, the same layers
    assert len(moved) == n_moved and len(split) == 2 * 2      # 2 blocks x 2 tasks
    flat_kept, flat_roomy = flat(kept.params), flat(roomy.params)
    for a, b in zip(kept.stats, roomy.stats, strict=True):
        assert b["obj_relaxed"] == pytest.approx(a["obj_relaxed"], rel=1e-4), a["path"]
        assert b["obj_rounded"] == pytest.approx(a["obj_rounded"], rel=0.1), a["path"]
    assert flat_kept.keys() == flat_roomy.keys()


# ----------------------------------------------------------------------------- the mesh


def test_sharded_over_8_devices_equals_single_device(llamas, monkeypatch):
    d, model, params, _ = llamas
    lazy = llama.experts_from_pretrained([d / "e0", d / "e1"], like=params)
    mesh = make_mesh(("x",))
    h_specs = []
    real = driver._task_moments

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs["layout"] is not None:
            h_specs.append(next(iter(out[0].values())).h.sharding.spec)
        return out

    monkeypatch.setattr(driver, "_task_moments", spy)
    for rounding in ("none", "gptq"):
        cfg = CalibConfig(objective=Objective(kind="epmq", lam=0.1), rounding=rounding, spec=SPEC,
                          batch_size=8)
        single = calibrate(decoder_adapter(model), params, tasks(), cfg, experts=lazy)
        h_specs.clear()
        rows = calibrate(decoder_adapter(model), params, tasks(), cfg, experts=lazy, mesh=mesh,
                         h_rows_from=64)
        assert h_specs.count(P("x")) == 2 * 2 and len(h_specs) == 2 * 4 * 2   # down_proj's H
        whole = calibrate(decoder_adapter(model), params, tasks(), cfg, experts=lazy, mesh=mesh)
        assert_same(rows, whole)     # rows split or not: the same fixed-order sums
        k = rows.params["model"]["layers"][1]["mlp"]["up_proj"]["kernel"]
        arr = k if rounding == "none" else k.scales
        assert len(arr.sharding.device_set) == 8 and arr.sharding.spec[-1] == "x"
        if rounding == "none":      # W* to float32 precision (of an ill-conditioned solve)
            a, b = flat(single.params), flat(rows.params)
            for p in a:
                assert np.linalg.norm(b[p] - a[p]) <= 1e-4 * np.linalg.norm(a[p]), p
        # unrounded: float32 agreement; rounded: the last bits of H (sum order) flip codes, and
        # block 1 sees block 0's different codes: equal quality, not equal bits
        rel = 1e-3 if rounding == "none" else 0.05
        for s1, s8 in zip(single.stats, rows.stats):
            assert s8["obj_relaxed"] == pytest.approx(s1["obj_relaxed"], rel=rel, abs=1e-6), s1["path"]
            assert s8["obj_rounded"] == pytest.approx(s1["obj_rounded"], rel=0.05, abs=1e-6), s1["path"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation_budget=-1), "activation_budget must be None or an int >= 0"),
    (dict(h_rows_from=1.5), "h_rows_from must be None or an int >= 0"),
    (dict(h_rows_from=0), "h_rows_from=0 splits H over the rows of a mesh axis: it needs mesh="),
])
def test_bad_scale_options_are_refused(llamas, kwargs, match):
    _, model, params, _ = llamas
    with pytest.raises(ValueError, match=match):
        calibrate(decoder_adapter(model), params, tasks(), EPMQ, **kwargs)


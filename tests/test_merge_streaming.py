"""Streaming merges of Hugging Face checkpoints (epmq_jax.merge.streaming) and mergekit recipes.

The inputs are tiny random transformers Llama checkpoints (hidden 32, 2 layers) written by
``save_pretrained`` (one single-file, one sharded) and by ``torch.save`` of a state dict
(``pytorch_model.bin``). References: the in-memory merge functions of ``epmq_jax.merge`` on the
same tensors, a NumPy transcription of mergekit's formulas, transformers' own model on the
merged directory.
"""

import json
import re
import shutil
import tracemalloc
import weakref
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from epmq_jax import cli, merge
from epmq_jax.merge import mergekit, streaming
from epmq_jax.merge._ties import ties_deltas
from epmq_jax.models import from_pretrained, hf

VOCAB = 96
N_EXPERTS = 3


def llama_config(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaConfig(**{**kw, **overrides}, attn_implementation="eager")


def save_model(directory, state, cfg=None, fmt="safetensors", **save_kw):
    """A Llama checkpoint holding ``state``: save_pretrained, or torch.save (``fmt="bin"``)."""
    model = transformers.LlamaForCausalLM(cfg or llama_config()).eval()
    model.load_state_dict(state)
    if fmt == "bin":
        directory.mkdir(parents=True)
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory, **save_kw)
    return directory


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base (+ tokenizer files) and 3 experts: sharded safetensors, pytorch_model.bin, single."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config()).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    state = base.state_dict()
    save_model(root / "base", state)
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    experts = []
    for t, (fmt, kw) in enumerate([("safetensors", {"max_shard_size": "20KB"}), ("bin", {}),
                                   ("safetensors", {})]):
        gen = torch.Generator().manual_seed(100 + t)
        st = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        experts.append(save_model(root / f"expert{t}", st, fmt=fmt, **kw))
    assert (experts[0] / "model.safetensors.index.json").is_file()
    assert (experts[1] / "pytorch_model.bin").is_file()
    return root / "base", experts


def read_all(directory):
    tensors = hf.open_tensors(directory)
    return {name: np.asarray(tensors[name]) for name in tensors}


def assert_same_tensors(out_dir, reference, atol=1e-6):
    got = read_all(out_dir)
    assert sorted(got) == sorted(reference)
    for name, ref in reference.items():
        ref = np.asarray(ref)
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
        np.testing.assert_allclose(got[name].astype(np.float64), ref.astype(np.float64),
                                   atol=atol, rtol=0, err_msg=name)


def no_leftovers(parent):
    return not [p.name for p in parent.iterdir() if ".epmq-" in p.name]


# --- the in-memory methods, streamed ----------------------------------------------------------

CASES = {
    "ta-per-expert": ("task_arithmetic", {"scaling": [0.3, 0.5, 0.2]}, None,
                      lambda b, e: merge.task_arithmetic(b, e, scaling=[0.3, 0.5, 0.2])),
    "ties-global": ("ties", {"density": 0.3, "scaling": 0.7}, None,
                    lambda b, e: merge.ties_merging(b, e, density=0.3, scaling=0.7)),
    "ties-global-filter": ("ties", {"density": 0.2, "merge_func": "sum"}, r"mlp|self_attn",
                           lambda b, e: merge.ties_merging(b, e, density=0.2, merge_func="sum",
                                                           filter=r"mlp|self_attn")),
    "ties-per-tensor": ("ties", {"density": 0.4, "trim": "per_tensor", "merge_func": "max"}, None,
                        lambda b, e: merge.ties_merging(b, e, density=0.4, trim="per_tensor",
                                                        merge_func="max")),
    "average": ("average", {}, None, lambda b, e: merge.average(e)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_merge_equals_in_memory(tmp_path, ckpts, case):
    base, experts = ckpts
    method, settings, filt, reference = CASES[case]
    out = tmp_path / "merged"
    summary = merge.merge_checkpoints(None if method == "average" else base, experts, out,
                                      method=method, filter=filt, max_shard_size="24KB",
                                      **settings)
    b, e = read_all(base), [read_all(x) for x in experts]
    assert_same_tensors(out, reference(b, e))
    global_trim = method == "ties" and settings.get("trim", "global") == "global"
    assert summary.passes == (4 if global_trim else 1)   # 2 radix passes + votes + write
    n_merged = sum(1 for n in b if filt is None or re.search(filt, n))
    assert (summary.merged, summary.copied) == (n_merged, len(b) - n_merged)
    # a sharded Hugging Face directory: index + shards, config and tokenizer files copied
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(b)
    assert summary.files == ("model.safetensors.index.json", *sorted(set(index["weight_map"].values())))
    assert all((out / f).stat().st_size <= 24_000 + 1000 for f in summary.files[1:])
    ref_dir = experts[0] if method == "average" else base
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (ref_dir / "config.json").read_text())
    if method != "average":
        assert (out / "tokenizer_config.json").read_bytes() == (
            base / "tokenizer_config.json").read_bytes()
    assert no_leftovers(tmp_path)


def dare_key(seed, name):
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def test_dare_task_arithmetic_is_dare_per_tensor_and_reruns_identically(tmp_path, ckpts):
    base, experts = ckpts
    kw = dict(method="dare", drop=0.6, scaling=[0.5, 0.4, 0.3], seed=7)
    merge.merge_checkpoints(base, experts, tmp_path / "a", **kw)
    b, e = read_all(base), [read_all(x) for x in experts]
    ref = {n: merge.dare({n: b[n]}, [{n: x[n]} for x in e], key=dare_key(7, n), drop=0.6,
                         scaling=[0.5, 0.4, 0.3])[n] for n in b}
    assert_same_tensors(tmp_path / "a", ref)
    merge.merge_checkpoints(base, experts, tmp_path / "b", **kw)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors").read_bytes()
    merge.merge_checkpoints(base, experts, tmp_path / "c", **{**kw, "seed": 8})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (
        tmp_path / "c" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("trim", ["global", "per_tensor"])
def test_dare_ties_equals_ties_on_the_per_tensor_dropped_vectors(tmp_path, ckpts, trim):
    base, experts = ckpts
    p, lam = 0.5, 0.8
    summary = merge.merge_checkpoints(base, experts, tmp_path / "m", method="dare", merge="ties",
                                      drop=p, density=0.4, trim=trim, scaling=lam, seed=3)
    assert summary.passes == (4 if trim == "global" else 1)
    b, e = read_all(base), [read_all(x) for x in experts]
    names = list(b)
    # DARE by hand: masks from the documented per-tensor keys, survivors / (1 - p) in float32
    tvs = [[np.where(np.asarray(jax.random.bernoulli(jax.random.fold_in(dare_key(3, n), t),
                                                     np.float32(1 - p), b[n].shape)),
                     e[t][n] - b[n], 0).astype(np.float32) / (np.float32(1) - np.float32(p))
            for n in names] for t in range(N_EXPERTS)]
    if trim == "global":
        tau = ties_deltas(tvs, density=0.4, trim="global", merge_func="mean")
    else:
        tau = [ties_deltas([[tv[j]] for tv in tvs], density=0.4, trim="per_tensor",
                           merge_func="mean")[0] for j in range(len(names))]
    ref = {n: b[n] + lam * np.asarray(d) for n, d in zip(names, tau)}
    assert_same_tensors(tmp_path / "m", ref, atol=1e-6)


# --- the output directory ----------------------------------------------------------------------


def test_merged_directory_loads_in_flax_and_transformers(tmp_path, ckpts):
    base, experts = ckpts
    out = tmp_path / "merged"
    merge.merge_checkpoints(base, experts, out, method="task_arithmetic", scaling=0.4,
                            max_shard_size="30KB")
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(from_pretrained(out)(jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # the merge is not the base: the comparison above is not vacuous
    with torch.no_grad():
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(base)(
            input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(base_logits - want).max() > 1e-2


def test_dtype_casts_every_float_tensor_and_the_config(tmp_path, ckpts):
    base, experts = ckpts
    out = tmp_path / "bf16"
    merge.merge_checkpoints(base, experts, out, method="task_arithmetic", scaling=0.4,
                            dtype="bfloat16")
    b, e = read_all(base), [read_all(x) for x in experts]
    ref = merge.task_arithmetic(b, e, scaling=0.4)
    got = load_file(out / "model.safetensors")
    for n, r in ref.items():   # the float32 merge rounded once to bfloat16
        assert got[n].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[n].astype(np.float32),
                                      np.asarray(r).astype(ml_dtypes.bfloat16).astype(np.float32))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bf16_inputs_merge_in_float32_and_stay_bf16(tmp_path, ckpts):
    base, experts = ckpts
    dirs = []
    for i, d in enumerate([base, *experts[:2]]):
        st = {k: torch.tensor(v.astype(np.float32)).to(torch.bfloat16)
              for k, v in read_all(d).items()}
        model = transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16)
        model.load_state_dict(st)
        model.save_pretrained(tmp_path / f"bf{i}")
        dirs.append(tmp_path / f"bf{i}")
    merge.merge_checkpoints(dirs[0], dirs[1:], tmp_path / "m", method="ties", density=0.5)
    b, e = read_all(dirs[0]), [read_all(x) for x in dirs[1:]]
    assert all(v.dtype == ml_dtypes.bfloat16 for v in b.values())
    assert_same_tensors(tmp_path / "m", merge.ties_merging(b, e, density=0.5), atol=0)


def test_writer_stores_c_order_whatever_the_layout(tmp_path, ckpts):
    base, _ = ckpts

    class Fortran(streaming.TensorMerge):
        def merge_tensor(self, name, b, experts):
            return np.asfortranarray(np.asarray(experts[0]).T).T   # same values, not C-ordered

    streaming.stream_merge(base, [base], tmp_path / "m", Fortran())
    assert_same_tensors(tmp_path / "m", read_all(base), atol=0)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}


def test_checkpoint_info_reads_headers_only(ckpts):
    base, experts = ckpts
    for d in [base, *experts]:
        tensors = hf.open_tensors(d)
        for name in tensors:
            shape, dtype, file = tensors.info(name)
            value = tensors[name]
            assert (shape, dtype) == (value.shape, value.dtype) and file.parent == d


def test_size_parsing():
    assert streaming.parse_size("5GB") == 5 * 10**9
    assert streaming.parse_size("2GiB") == 2 * 2**30
    assert streaming.parse_size("30kb") == 30_000 and streaming.parse_size(123) == 123
    for bad in ("five", "-1GB", 0, "1.5XB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            streaming.parse_size(bad)


# --- memory ----------------------------------------------------------------------------------


class Alive:
    """Counts objects alive at once through weakrefs."""

    def __init__(self):
        self.now = self.peak = 0

    def track(self, value):
        self.now += 1
        self.peak = max(self.peak, self.now)
        weakref.finalize(value, self._gone)
        return value

    def _gone(self):
        self.now -= 1


class Spy(Mapping):
    """A lazy tensor mapping that counts reads and the NumPy tensors it handed out still alive."""

    def __init__(self, inner, reads, alive):
        self.inner, self.reads, self.alive = inner, reads, alive

    def __getitem__(self, name):
        self.reads.append(name)
        return self.alive.track(self.inner[name])

    def info(self, name):
        return self.inner.info(name)

    def __contains__(self, name):   # Mapping's default would read the tensor
        return name in self.inner

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


@pytest.mark.parametrize("method, settings, passes", [
    ("task_arithmetic", {}, 1), ("ties", {"density": 0.5}, 4)])
def test_at_most_one_tensor_per_input_is_alive(tmp_path, ckpts, monkeypatch, method, settings,
                                               passes):
    """Every tensor is read once per pass, and the merge never holds more than one tensor of
    each input: the NumPy arrays read, and the JAX arrays the kernels get."""
    base, experts = ckpts
    real_read = streaming.Inputs.read
    n_tensors = len(hf.open_tensors(base))
    for n in (2, 6):
        reads, host, device = [], Alive(), Alive()
        monkeypatch.setattr(streaming, "open_tensors",
                            lambda d, reads=reads, host=host: Spy(hf.open_tensors(d), reads, host))
        monkeypatch.setattr(streaming.Inputs, "read", lambda self, name, device=device: (
            lambda b, e: (device.track(b), [device.track(x) for x in e]))(*real_read(self, name)))
        merge.merge_checkpoints(base, [experts[t % 3] for t in range(n)], tmp_path / f"m{n}",
                                method=method, **settings)
        assert len(reads) == passes * (n + 1) * n_tensors
        assert device.peak == n + 1           # one tensor of the base and of each expert
        assert host.peak <= n + 1


def test_host_memory_grows_by_a_tensor_per_expert_not_a_model(tmp_path, ckpts):
    """NumPy-side memory (reads, conversion, shard writing; XLA's buffers are not traced)."""
    base, experts = ckpts
    sizes = [v.nbytes for v in read_all(base).values()]

    def peak(n):
        tracemalloc.start()
        merge.merge_checkpoints(base, [experts[t % 3] for t in range(n)], tmp_path / f"m{n}",
                                method="task_arithmetic", overwrite=True)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    for n in (2, 6):   # warm-up: compile the kernels for both expert counts first
        peak(n)
    growth = peak(6) - peak(2)
    assert growth < 4 * 3 * max(sizes)   # 4 more experts: a few tensors each, at most
    assert growth < 4 * sum(sizes) / 2   # never a model each


# --- refusals and atomicity --------------------------------------------------------------------


def test_mismatched_inputs_are_refused_naming_tensor_and_files(tmp_path, ckpts):
    base, experts = ckpts
    torch.manual_seed(1)
    wide = save_model(tmp_path / "wide", transformers.LlamaForCausalLM(
        llama_config(intermediate_size=48)).state_dict(), llama_config(intermediate_size=48))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' is "
                       r"float32 \(32, 48\) in .*wide/model\.safetensors \(experts\[1\]\) but "
                       r"float32 \(32, 64\) in .*base/model\.safetensors \(base\)"):
        merge.merge_checkpoints(base, [experts[0], wide], tmp_path / "out",
                                method="task_arithmetic")
    state = {k: torch.tensor(v) for k, v in read_all(base).items()}
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(base / "config.json", half)
    save_file({k: v.numpy().astype(np.float16) for k, v in state.items()},
              half / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"is float16 .* in .*half/model\.safetensors "
                       r"\(experts\[0\]\) but float32"):
        merge.merge_checkpoints(base, [half], tmp_path / "out", method="ties")
    short = tmp_path / "short"
    short.mkdir()
    shutil.copy(base / "config.json", short)
    save_file({k: v.numpy() for k, v in state.items() if k != "lm_head.weight"},
              short / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"experts\[0\] \(.*short\) has no tensor "
                       r"'lm_head\.weight' that the base has in .*base/model\.safetensors"):
        merge.merge_checkpoints(base, [short], tmp_path / "out", method="task_arithmetic")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_bad_arguments_are_refused_before_any_work(tmp_path, ckpts, monkeypatch):
    base, experts = ckpts
    monkeypatch.setattr(streaming, "open_tensors", lambda d: pytest.fail("opened an input"))
    out = tmp_path / "out"
    for kw, needle in [
        (dict(method="slerp"), "method='slerp'"),
        (dict(method="ties", density=0.0), "density"),
        (dict(method="ties", drop=0.5), "takes the settings"),
        (dict(method="dare", drop=1.0), "drop is a probability"),
        (dict(method="dare", merge="ties", scaling=[0.1, 0.2, 0.3]), "one scalar scaling"),
        (dict(method="task_arithmetic", scaling=[0.1, 0.2]), "one per expert"),
        (dict(method="task_arithmetic", dtype="int8"), "dtype='int8'"),
        (dict(method="task_arithmetic", max_shard_size="big"), "max_shard_size"),
    ]:
        with pytest.raises(ValueError, match=needle):
            merge.merge_checkpoints(base, experts, out, **kw)
    with pytest.raises(ValueError, match="average' takes base=None"):
        merge.merge_checkpoints(base, experts, out, method="average")
    with pytest.raises(ValueError, match="is \\(or contains\\) the input"):
        merge.merge_checkpoints(base, experts, base, method="task_arithmetic", overwrite=True)
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        merge.merge_checkpoints(base, experts, out, method="task_arithmetic")


def test_nonfinite_input_is_refused_and_nothing_is_written(tmp_path, ckpts):
    base, _ = ckpts
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"bad/model\.safetensors: tensor "
                       r"'model\.layers\.1\.mlp\.up_proj\.weight' .* NaN/inf"):
        merge.merge_checkpoints(base, [bad], tmp_path / "out", method="task_arithmetic")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_merge_leaves_no_output(tmp_path, ckpts, monkeypatch, error):
    base, experts = ckpts
    out = tmp_path / "out"
    merge.merge_checkpoints(base, experts, out, method="task_arithmetic", scaling=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = streaming._ShardWriter.write, []

    def failing(self, name, value):
        calls.append(name)
        if len(calls) == 7:
            raise error("injected")
        real(self, name, value)

    monkeypatch.setattr(streaming._ShardWriter, "write", failing)
    with pytest.raises(error, match="injected"):   # a new merge over the old one, with overwrite
        merge.merge_checkpoints(base, experts, out, method="ties", overwrite=True,
                                max_shard_size="20KB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(error, match="injected"):   # a new directory
        calls.clear()
        merge.merge_checkpoints(base, experts, tmp_path / "new", method="task_arithmetic")
    assert not (tmp_path / "new").exists() and no_leftovers(tmp_path)


# --- mergekit recipes ------------------------------------------------------------------------


def mergekit_reference(method, base, models, weights, densities, *, normalize, lam, rescale,
                       masks=None):
    """mergekit's GeneralizedTaskArithmeticMerge / LinearMerge on one tensor, in NumPy
    (transcribed from mergekit/merge_methods/generalized_task_arithmetic.py, linear.py and
    sparsify.py), float32 task vectors as mergekit with dtype float32, the rest in float64."""
    if method == "linear":
        x = np.stack(models).astype(np.float64)
        w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * base.ndim)
        res = (w * x).sum(0)
        return res / w.sum(0) if normalize else res
    sparsify = {"ties": "magnitude", "dare_ties": "random", "dare_linear": "random"}.get(method)
    deltas = []
    for t, x in enumerate(models):
        delta = x.astype(np.float32) - base.astype(np.float32)
        if sparsify and densities[t] < 1:
            if sparsify == "magnitude":
                k = int(densities[t] * delta.size)
                mask = np.zeros(delta.size)
                mask[np.argsort(-np.abs(delta).reshape(-1), kind="stable")[:k]] = 1
                mask = mask.reshape(delta.shape)
            else:
                mask = masks[t]
            masked = delta.astype(np.float64) * mask
            if rescale:
                before, after = np.abs(delta.astype(np.float64)).sum(), np.abs(masked).sum()
                if not (before < 1e-7 or after < 1e-7):
                    masked = masked * (before / after)
            delta = masked
        deltas.append(np.asarray(delta, np.float64))
    deltas = np.stack(deltas)
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * base.ndim)
    wd = deltas * w
    if method in ("ties", "dare_ties"):
        majority = np.where(wd.sum(0) >= 0, 1, -1)
        mask = np.sign(wd) == majority
        mixed, divisor = (wd * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = wd.sum(0), w.sum()
        if abs(divisor) < 1e-8:
            divisor = 1
    if normalize:
        mixed = mixed / divisor
    return base.astype(np.float64) + mixed * lam


def _recipe_case(method, ckpts):
    base, experts = ckpts
    weights, densities = [1.0, 0.5, 0.8], [0.5, 0.3, 0.7]
    models = [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, weights)]
    if method in ("ties", "dare_ties", "dare_linear"):
        for m, d in zip(models, densities):
            m["parameters"]["density"] = d
    recipe = {"merge_method": method, "models": models, "dtype": "float32"}
    defaults = {"task_arithmetic": (False, False), "ties": (True, False),
                "dare_ties": (False, True), "dare_linear": (False, True), "linear": (True, False)}
    normalize, rescale = defaults[method]
    lam = 1.0
    if method == "linear":
        recipe["models"][1]["parameters"]["weight"] = 0.3
        weights = [1.0, 0.3, 0.8]
    else:
        recipe["base_model"] = str(base)
        recipe["parameters"] = {"lambda": 0.9, "int8_mask": True}
        lam = 0.9
    if method == "ties":   # the base listed among the models is skipped, as mergekit does
        recipe["models"].append({"model": str(base)})
    if method == "task_arithmetic":
        recipe["parameters"]["normalize"] = normalize = True
    if method not in ("ties", "dare_ties", "dare_linear"):
        densities = [1.0] * 3
    return recipe, weights, densities, normalize, rescale, lam


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear",
                                    "linear"])
def test_recipe_equals_mergekit_formula(tmp_path, ckpts, method):
    base, experts = ckpts
    recipe, weights, densities, normalize, rescale, lam = _recipe_case(method, ckpts)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    summary = merge.merge_recipe(path, tmp_path / "m", seed=5)
    assert summary.passes == 1
    b, e = read_all(base), [read_all(x) for x in experts]
    ref = {}
    for name in b:
        masks = [np.asarray(jax.random.bernoulli(jax.random.fold_in(dare_key(5, name), t),
                                                 np.float32(d), b[name].shape))
                 for t, d in enumerate(densities)]
        models = [x[name] for x in e]
        ref[name] = mergekit_reference(method, b[name], models, weights, densities,
                                       normalize=normalize, lam=lam, rescale=rescale,
                                       masks=masks).astype(np.float32)
    assert_same_tensors(tmp_path / "m", ref, atol=2e-6)


def test_recipe_maps_onto_the_in_memory_methods(tmp_path, ckpts):
    """task_arithmetic = TA with scaling λ w_t / Σw; linear with equal weights = average."""
    base, experts = ckpts
    b, e = read_all(base), [read_all(x) for x in experts]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "parameters": {"lambda": 0.5, "normalize": True},
              "models": [{"model": str(x), "parameters": {"weight": w}}
                         for x, w in zip(experts, [1.0, 2.0, 1.0])]}
    merge.merge_recipe(recipe, tmp_path / "ta")
    assert_same_tensors(tmp_path / "ta", merge.task_arithmetic(
        b, e, scaling=[0.5 * w / 4 for w in (1.0, 2.0, 1.0)]), atol=1e-6)
    recipe = {"merge_method": "linear", "parameters": {"weight": 0.7},
              "models": [{"model": str(x)} for x in experts]}
    merge.merge_recipe(recipe, tmp_path / "avg")
    assert_same_tensors(tmp_path / "avg", merge.average(e), atol=1e-6)


def test_recipe_dtype_and_ties_density_check(tmp_path, ckpts):
    base, experts = ckpts
    recipe = {"merge_method": "dare_linear", "base_model": str(base), "out_dtype": "bfloat16",
              "models": [{"model": str(x), "parameters": {"weight": 0.5, "density": 0.5}}
                         for x in experts]}
    merge.merge_recipe(recipe, tmp_path / "bf")
    assert all(v.dtype == ml_dtypes.bfloat16 for v in load_file(
        tmp_path / "bf" / "model.safetensors").values())
    recipe["merge_method"] = "ties"
    recipe["models"][0]["parameters"]["density"] = 0.01   # int(0.01 * 32) = 0 for the norms
    with pytest.raises(ValueError, match=r"density 0.01 of .*expert0 keeps no entry of tensor "
                       r"'model\.layers\.0\.input_layernorm\.weight' \(32 entries\)"):
        merge.merge_recipe(recipe, tmp_path / "t")
    assert not (tmp_path / "t").exists()


_OK = {"merge_method": "ties", "base_model": "b",
       "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 0.5}}]}


@pytest.mark.parametrize("change, needle", [
    ({"slices": [{"sources": []}]}, "unsupported key 'slices'"),
    ({"modules": {}}, "unsupported key 'modules'"),
    ({"chat_template": "auto"}, "unsupported key 'chat_template'"),
    ({"frobnicate": 1}, "unknown key 'frobnicate'"),
    ({"merge_method": "slerp"}, "merge_method 'slerp' is not supported"),
    ({"merge_method": "della"}, "merge_method 'della' is not supported"),
    ({"parameters": {"gamma": 0.01}}, "parameters.gamma is not supported"),
    ({"parameters": {"normalize": "yes"}}, "parameters.normalize: expected true or false"),
    ({"parameters": {"lambda": [1, 2]}}, "parameters.lambda: gradients"),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "epsilon": 0.1}}]},
     r"models\[0\].parameters.epsilon is not supported"),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "density": [1, 0.5]}}]},
     r"models\[0\].parameters.density: gradients"),
    ({"models": [{"model": "x", "parameters": {"weight": [{"filter": "mlp", "value": 1},
                                                          {"value": 0}]}}]},
     r"models\[0\].parameters.weight: per-tensor filter lists"),
    ({"models": [{"model": "x", "parameters": {"density": 0.5}}]},
     r"models\[0\].parameters.weight: missing"),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "density": 1.5}}]},
     r"models\[0\].parameters.density: 1.5 is outside"),
    ({"models": [{"model": "x+lora", "parameters": {"weight": 1}}]}, "LoRA"),
    ({"models": [{"model": "x", "layer_range": [0, 2]}]}, r"models\[0\].layer_range"),
    ({"models": []}, "models: expected a non-empty list"),
    ({"models": [{"model": "b"}]}, "no model besides base_model"),
    ({"base_model": None}, "base_model: merge_method ties needs a base model"),
    ({"tokenizer_source": "union"}, "tokenizer_source 'union'"),
    ({"dtype": "int8"}, "dtype: 'int8' is not supported"),
    ({"merge_method": "linear", "base_model": "z", "models": [{"model": "x", "parameters": {
        "weight": 1}}]}, "base_model must be one of them"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"density": 0.5}}]},
     r"models\[0\].parameters.density is not supported by merge_method linear"),
])
def test_unsupported_recipes_are_refused_naming_the_key(change, needle):
    with pytest.raises(mergekit.RecipeError, match=needle) as e:
        merge.read_recipe({**_OK, **change})
    assert "\n" not in str(e.value)


def test_recipe_defaults_follow_mergekit():
    r = merge.read_recipe({**_OK, "parameters": {"weight": 0.3}, "models": [
        {"model": "x", "parameters": {"density": 0.5}}, {"model": "y@v1"}]})
    assert (r.normalize, r.rescale, r.lam, r.dtype) == (True, False, 1.0, None)
    assert [(m.path, m.revision, m.weight, m.density) for m in r.models] == [
        ("x", None, 0.3, 0.5), ("y", "v1", 0.3, 1.0)]
    r = merge.read_recipe({**_OK, "merge_method": "dare_linear", "dtype": "torch.float16"})
    assert (r.normalize, r.rescale, r.dtype) == (False, True, "float16")


# --- the CLI ---------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_merges_a_recipe(tmp_path, ckpts, capsys):
    base, experts = ckpts
    recipe, *_ = _recipe_case("ties", ckpts)
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    rc, stdout, err = run_cli(capsys, "merge", "--mergekit", str(path), "--out", str(out),
                              "--max-shard-size", "30KB")
    assert rc == 0, err
    assert str(out) in stdout and (out / "model.safetensors.index.json").is_file()
    assert from_pretrained(out) is not None
    rc, _, err = run_cli(capsys, "merge", "--mergekit", str(path), "--out", str(out))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    rc, _, err = run_cli(capsys, "merge", "--mergekit", str(path), "--out", str(out),
                         "--overwrite")
    assert rc == 0, err


@pytest.mark.parametrize("argv, needle", [
    (["merge", "--mergekit", "r.yml", "--config", "c.py"], "not allowed with argument"),
    (["merge", "--mergekit", "r.yml"], "--mergekit needs --out"),
    (["merge", "--mergekit", "r.yml", "--out", "o", "--method", "ta"], "--method"),
    (["merge", "--config", "c.py", "--method", "ta", "--out", "o"], "--out"),
    (["merge"], "one of the arguments --config --mergekit is required"),
])
def test_cli_usage_errors(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("epmq merge: error: ") and needle in err


def test_cli_refuses_a_bad_recipe_in_one_line(tmp_path, capsys):
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({**_OK, "slices": []}))
    rc, _, err = run_cli(capsys, "merge", "--mergekit", str(path), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "unsupported key 'slices'" in err
    path.write_text("models: [\n")
    rc, _, err = run_cli(capsys, "merge", "--mergekit", str(path), "--out", str(tmp_path / "o"))
    assert rc == 2 and "not valid YAML" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()

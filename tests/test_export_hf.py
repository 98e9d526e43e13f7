"""Hugging Face GPTQ directories (``epmq_jax.checkpoint.save_pretrained``, ``epmq export``).

The directories are read by an independent NumPy reader written here from AutoGPTQ's description
of the format (not from epmq_jax's packer), loaded into transformers' PyTorch models and compared
with the project's models on the same weights; read back by ``from_pretrained`` (packed and
dequantized); and refused, leaving nothing behind, when the format cannot hold the quantization.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from epmq_jax import cli, pipeline, report
from epmq_jax.checkpoint import save_pretrained
from epmq_jax.models import bert, clip, from_pretrained, llama, t5
from epmq_jax.nn import QuantLinear, quantize_params
from epmq_jax.quant import QuantizedWeight, QuantSpec, gptq, is_quantized

ROOT = Path(__file__).resolve().parents[1]
BLOCK_LINEARS = r"(layers|block)/\d+/.*/kernel$"


# --------------------------------------------------------------------------- independent reader


def unpack_codes_autogptq(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 words ``(m, k)`` packed along axis 0 -> codes ``(32 * m / bits, k)``.

    As AutoGPTQ's packer lays them out: for 2/4/8 bits word ``r`` holds codes
    ``r*32/b ... r*32/b + 32/b - 1``, code ``j`` of the word in bits ``[b*j, b*j + b)``. For 3 bits
    three words hold 32 codes: codes 0-9 in bits 0-29 of the first word, code 10 in its bits
    30-31 (low two bits) and bit 0 of the second word, codes 11-20 in bits 1-30 of the second
    word, code 21 in its bit 31 (low bit) and bits 0-1 of the third, codes 22-31 in bits 2-31.
    """
    u = words.astype(np.int64) & 0xFFFFFFFF
    if bits in (2, 4, 8):
        per = 32 // bits
        shifts = np.arange(per)[None, :, None] * bits
        return ((u[:, None, :] >> shifts) & ((1 << bits) - 1)).reshape(-1, u.shape[1])
    assert bits == 3
    w0, w1, w2 = u[0::3], u[1::3], u[2::3]
    codes = [(w0 >> (3 * j)) & 7 for j in range(10)]
    codes.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    codes += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
    codes.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    codes += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
    return np.stack(codes, axis=1).reshape(-1, u.shape[1])


def read_gptq_dir(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GPTQ model directory in torch layout, quantized linears dequantized.

    ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])`` in float64, with the
    zero points read from ``qzeros`` plus one for ``checkpoint_format`` "gptq" (v1).
    """
    config = json.loads((directory / "config.json").read_text())
    qc = config.get("quantization_config")
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    raw = {}
    for f in files:
        raw.update(load_file(directory / f))
    out = {}
    for name, value in raw.items():
        if not name.endswith(".qweight"):
            if name.rsplit(".", 1)[-1] not in ("qzeros", "scales", "g_idx"):
                out[name] = value.astype(np.float64) if value.dtype.kind == "f" else value
            continue
        base, bits = name.removesuffix(".qweight"), qc["bits"]
        q = unpack_codes_autogptq(value, bits)                               # (in, out)
        zeros = unpack_codes_autogptq(raw[f"{base}.qzeros"].T, bits).T      # (groups, out)
        if qc["checkpoint_format"] == "gptq":
            zeros = zeros + 1
        scales = raw[f"{base}.scales"].astype(np.float64)
        g = raw[f"{base}.g_idx"]
        assert raw[f"{base}.scales"].dtype == np.float16 and g.dtype == np.int32
        out[f"{base}.weight"] = (scales[g] * (q - zeros[g])).T
    return out


def expected_weight(qw: QuantizedWeight) -> np.ndarray:
    """What a reader must find for ``qw``: float16 scales, the codes, torch layout (float64)."""
    codes = np.asarray(qw.codes(), np.float64)
    scales = np.asarray(qw.scales).astype(np.float16).astype(np.float64)
    zeros, g = np.asarray(qw.zeros, np.float64), np.asarray(qw.g_idx)
    return (scales[g] * (codes - zeros[g])).T


def to_torch(tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32) if v.dtype.kind == "f" else v)
            for k, v in tensors.items()}


def pure(model: nnx.Module):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def qleaves(tree) -> dict[str, object]:
    from epmq_jax._tree import leaves_with_paths

    return dict(leaves_with_paths(tree, is_leaf=is_quantized))


def act_order_gptq(seed: int, spec: QuantSpec, static_groups: bool = False):
    """A quantizer running GPTQ with act-order (dynamic or static groups) on a random Hessian."""
    def quantize(path: str, w: jax.Array) -> QuantizedWeight:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(4 * w.shape[0], w.shape[0])) * rng.uniform(0.1, 10, w.shape[0])
        return gptq(w, jnp.asarray(x.T @ x, jnp.float32), spec, act_order=True,
                    static_groups=static_groups)
    return quantize


def check_against_source(directory: Path, model: nnx.Module, params) -> dict[str, np.ndarray]:
    """The independent reader finds every source leaf (float16 storage) in torch layout."""
    read = read_gptq_dir(directory)
    family = {llama.LlamaForCausalLM: llama, t5.T5ForConditionalGeneration: t5}.get(
        type(model), clip)
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    for path, leaf in qleaves(params).items():
        *mods, last = path.split("/")
        name = family.to_hf(".".join([*mods, "weight" if last in ("kernel", "scale", "embedding")
                                      else last]), model_type)
        if is_quantized(leaf):
            np.testing.assert_array_equal(read[name], expected_weight(leaf), err_msg=name)
        else:
            x = np.asarray(leaf).astype(np.float16).astype(np.float64)
            x = x.T if last == "kernel" and x.ndim == 2 else (
                x.transpose(3, 2, 0, 1) if last == "kernel" else x)
            np.testing.assert_array_equal(read[name], x, err_msg=name)
    return read


# --------------------------------------------------------------------------- (a) torch parity


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_llama_directory_loads_into_transformers_with_equal_logits(tmp_path, fmt):
    cfg = llama.LlamaConfig.tiny()
    model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    spec = QuantSpec(bits=4, group_size=32)
    params = quantize_params(pure(model), r"layers/0/self_attn/q_proj/kernel", act_order_gptq(1, spec))
    params = quantize_params(params, r"layers/0/self_attn/k_proj/kernel",
                             act_order_gptq(2, spec, static_groups=True))
    params = quantize_params(params, BLOCK_LINEARS, spec)
    q, k = (params["model"]["layers"][0]["self_attn"][n]["kernel"].g_idx for n in ("q_proj", "k_proj"))
    assert not np.all(np.diff(np.asarray(q)) >= 0) and np.all(np.diff(np.asarray(k)) >= 0)
    out = save_pretrained(model, params, tmp_path / "llama-gptq", checkpoint_format=fmt)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    read = check_against_source(out, model, params)

    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    ref.load_state_dict(to_torch(read), strict=True)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    ours = from_pretrained(out)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), want, atol=1e-4, rtol=0)
    packed = from_pretrained(out, quantized="packed")
    assert isinstance(packed.model.layers[1].mlp.down_proj, QuantLinear)
    np.testing.assert_allclose(np.asarray(packed(jnp.asarray(ids))), want, atol=1e-4, rtol=0)


def test_clip_vision_directory_loads_into_transformers_with_equal_embeddings(tmp_path):
    cfg = clip.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=8,
                                projection_dim=32)
    model = clip.CLIPVisionModelWithProjection(cfg, rngs=nnx.Rngs(0))
    params = quantize_params(pure(model), BLOCK_LINEARS, QuantSpec(bits=3, group_size=32))
    out = save_pretrained(model, params, tmp_path / "clip-gptq")
    read = check_against_source(out, model, params)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model"
    assert config["quantization_config"]["block_name_to_quantize"] == "vision_model.encoder.layers"

    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **{k: v for k, v in config.items() if k != "quantization_config"})).float().eval()
    ref.load_state_dict(to_torch(read), strict=True)
    pixels = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()
    np.testing.assert_allclose(np.asarray(from_pretrained(out)(jnp.asarray(pixels))), want,
                               atol=1e-4, rtol=0)


def test_t5_directory_loads_into_transformers_with_equal_logits(tmp_path):
    cfg = t5.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                      num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16)
    model = t5.T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    params = quantize_params(pure(model), BLOCK_LINEARS, QuantSpec(bits=8, group_size=-1))
    out = save_pretrained(model, params, tmp_path / "t5-gptq", checkpoint_format="gptq_v2")
    read = check_against_source(out, model, params)
    config = json.loads((out / "config.json").read_text())
    assert "block_name_to_quantize" not in config["quantization_config"]   # two stacks

    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(
        **{k: v for k, v in config.items() if k != "quantization_config"})).float().eval()
    ref.lm_head.weight = torch.nn.Parameter(torch.empty(64, 64))   # untied, as in the export
    missing, unexpected = ref.load_state_dict(to_torch(read), strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    rng = np.random.default_rng(4)
    ids, dec = rng.integers(2, 64, (2, 7)), rng.integers(2, 64, (2, 5))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
    ours = from_pretrained(out)
    got = ours(jnp.asarray(ids), decoder_input_ids=jnp.asarray(dec))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_float_export_transposes_non_square_kernels_exactly(tmp_path):
    """No quantized kernel: a plain float32 directory whose non-square kernels are stored as their
    transposes (C order, not a permuted view)."""
    model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(), rngs=nnx.Rngs(5))
    params = pure(model)
    out = save_pretrained(model, None, tmp_path / "fp", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert not (out / "quantize_config.json").exists()
    stored = load_file(out / "model.safetensors")
    kernel = np.asarray(params["lm_head"]["kernel"])                     # (64, 128)
    assert stored["lm_head.weight"].shape == (128, 64)
    np.testing.assert_array_equal(stored["lm_head.weight"], kernel.T)
    k = np.asarray(params["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"])   # (64, 32)
    np.testing.assert_array_equal(stored["model.layers.0.self_attn.k_proj.weight"], k.T)


@pytest.mark.parametrize("build", [
    lambda: llama.LlamaForCausalLM(llama.LlamaConfig.tiny("qwen2", tie_word_embeddings=True),
                                   rngs=nnx.Rngs(1)),
    lambda: clip.CLIPModel(clip.CLIPConfig(
        vision_config=clip.CLIPVisionConfig.small(), projection_dim=64,
        text_config=clip.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=16, projection_dim=64)),
        rngs=nnx.Rngs(2)),
    lambda: t5.T5ForConditionalGeneration(t5.T5Config(
        vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=2, num_heads=4,
        tie_word_embeddings=True, scale_decoder_outputs=True), rngs=nnx.Rngs(3)),
    lambda: bert.BertModel(bert.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64,
                                           max_position_embeddings=20), rngs=nnx.Rngs(4)),
], ids=["qwen2-tied", "clip", "t5-tied", "bert"])
def test_every_family_round_trips_through_its_names(tmp_path, build):
    """Each family's ``to_hf`` inverts its ``from_hf`` renaming: from_pretrained gives every param
    (float32) back exactly, in a model of the same config."""
    model = build()
    out = save_pretrained(model, None, tmp_path / "fp", dtype="float32")
    back = from_pretrained(out)
    assert type(back) is type(model) and back.config == model.config
    jax.tree.map(np.testing.assert_array_equal, pure(back), pure(model))


# --------------------------------------------------------------------------- (b) round trip


def synthetic_qw(rng, shape, bits, group_size, mode, *, symmetric=False, min_zero=1):
    """A QuantizedWeight with random codes, scales and zero points; ``mode`` picks g_idx:
    "static" (i // group_size), "act_order" (groups of permuted rows: non-monotonic)."""
    d_in, d_out = shape
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    groups, glen = spec.n_groups(d_in), spec.group_len(d_in)
    maxq = spec.maxq
    g_idx = np.arange(d_in) // glen
    if mode == "act_order":
        g_idx = g_idx[np.argsort(rng.permutation(d_in))]
        assert groups == 1 or not np.all(np.diff(g_idx) >= 0)
    zeros = (np.full((groups, d_out), 1 << (bits - 1)) if symmetric
             else rng.integers(min_zero, maxq + 1, (groups, d_out)))
    return QuantizedWeight.from_codes(
        jnp.asarray(rng.integers(0, maxq + 1, shape)), jnp.asarray(rng.uniform(1e-3, 0.1, (groups, d_out))),
        jnp.asarray(zeros), jnp.asarray(g_idx), spec)


def synthetic_llama(bits, group_size, mode, *, symmetric=False, min_zero=1, seed=0, pattern=BLOCK_LINEARS):
    model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = quantize_params(pure(model), pattern, lambda p, w: synthetic_qw(
        rng, w.shape, bits, group_size, mode, symmetric=symmetric, min_zero=min_zero))
    return model, params


@pytest.mark.parametrize("bits,group_size,mode,symmetric,fmt", [
    (2, 32, "static", False, "gptq"), (2, 64, "act_order", False, "gptq_v2"),
    (3, 32, "static", False, "gptq_v2"), (3, 32, "act_order", True, "gptq"),
    (4, 32, "act_order", False, "gptq"), (4, -1, "static", False, "gptq_v2"),
    (4, 64, "static", True, "gptq"), (8, 32, "act_order", False, "gptq_v2"),
    (8, -1, "static", True, "gptq"),
])
def test_round_trip_gives_the_same_quantized_weights(tmp_path, bits, group_size, mode, symmetric, fmt):
    model, params = synthetic_llama(bits, group_size, mode, symmetric=symmetric,
                                    min_zero=0 if fmt == "gptq_v2" else 1)
    out = save_pretrained(model, params, tmp_path / "m", checkpoint_format=fmt)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == (bits, group_size,
                                                                                  symmetric, fmt)
    assert qc["desc_act"] == (mode == "act_order")
    back = qleaves(pure(from_pretrained(out, quantized="packed")))
    source = qleaves(params)
    assert back.keys() == source.keys()
    for path, want in source.items():
        got = back[path]
        if not is_quantized(want):
            np.testing.assert_array_equal(got, np.asarray(want).astype(np.float16).astype(np.float32))
            continue
        assert is_quantized(got), path
        assert (got.bits, got.group_size, got.symmetric, got.shape) == (bits, group_size, symmetric,
                                                                         want.shape)
        np.testing.assert_array_equal(got.codes(), want.codes(), err_msg=path)
        np.testing.assert_array_equal(got.zeros, want.zeros, err_msg=path)
        np.testing.assert_array_equal(got.g_idx, want.g_idx, err_msg=path)
        np.testing.assert_array_equal(got.scales, np.asarray(want.scales).astype(np.float16)
                                      .astype(np.float32), err_msg=path)
    np.testing.assert_array_equal(read_gptq_dir(out)["model.layers.1.mlp.up_proj.weight"],
                                  expected_weight(source["model/layers/1/mlp/up_proj/kernel"]))


def test_sharded_directory_with_tokenizer_reads_back(tmp_path):
    model, params = synthetic_llama(4, 32, "static")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (tok / "notes.txt").write_text("not a tokenizer file")
    out = save_pretrained(model, params, tmp_path / "m", max_shard_size="20KB", tokenizer_dir=tok)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).stat().st_size <= 20_000 + 10_000 for s in shards)
    assert not (out / "model.safetensors").exists() and not (out / "notes.txt").exists()
    assert index["metadata"]["total_size"] == sum(v.nbytes for s in shards for v in load_file(out / s).values())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tok / f).read_bytes()
    back = qleaves(pure(from_pretrained(out, quantized="packed")))
    for path, want in qleaves(params).items():
        if is_quantized(want):
            np.testing.assert_array_equal(back[path].codes(), want.codes(), err_msg=path)
    assert read_gptq_dir(out).keys() == read_gptq_dir(save_pretrained(model, params, tmp_path / "one")).keys()


# --------------------------------------------------------------------------- (c) config.json


def test_quantization_config_fields(tmp_path):
    model, params = synthetic_llama(4, 32, "static", pattern=r"layers/\d+/mlp/.*/kernel$|lm_head")
    out = save_pretrained(model, params, tmp_path / "m",
                          quantization_config={"damp_percent": 0.01, "true_sequential": True,
                                               "meta": {"epmq_method": "epmq"}})
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
                  "checkpoint_format": "gptq", "format": "gptq", "lm_head": True,
                  "block_name_to_quantize": "model.layers",
                  "modules_in_block_to_quantize": [["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]],
                  "damp_percent": 0.01, "true_sequential": True,
                  "meta": {"quantizer": ["epmq-jax:0.1.0"], "epmq_method": "epmq"}}
    assert config["torch_dtype"] == "float16" and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "quantize_config.json").read_text()) == {**qc, "model_file_base_name": "model"}
    auto = transformers.AutoConfig.from_pretrained(out)
    assert auto.model_type == "llama" and auto.quantization_config["bits"] == 4
    assert llama.LlamaConfig.from_dict(config) == model.config
    # lm_head and the MLPs come back packed, attention stays float
    back = from_pretrained(out, quantized="packed")
    assert isinstance(back.lm_head, QuantLinear) and isinstance(back.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(back.model.layers[0].self_attn.q_proj, nnx.Linear)


@pytest.mark.parametrize("cfg", [
    llama.LlamaConfig.tiny(),
    llama.LlamaConfig.tiny("mistral", sliding_window=8, tie_word_embeddings=True, eos_token_id=(2, 5)),
    llama.LlamaConfig.tiny("qwen2", sliding_window=16, layer_types=("full_attention", "sliding_attention")),
    llama.LlamaConfig.tiny("qwen3", head_dim=32, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    t5.T5Config(num_decoder_layers=3, tie_word_embeddings=True, scale_decoder_outputs=True),
    clip.CLIPVisionConfig.small(),
    clip.CLIPConfig(),
    bert.BertConfig(num_hidden_layers=3),
])
def test_regenerated_config_reads_back_as_the_same_config(cfg):
    family = {llama.LlamaConfig: llama, t5.T5Config: t5, bert.BertConfig: bert}.get(type(cfg), clip)
    d = json.loads(json.dumps(family.hf_config(cfg)))
    if isinstance(cfg, llama.LlamaConfig):
        back = llama.LlamaConfig.from_dict(d)
        ref = transformers.AutoConfig.for_model(**d)     # transformers reads the same model
        assert (ref.num_key_value_heads, ref.head_dim) == (cfg.num_key_value_heads, cfg.head_dim)
    elif isinstance(cfg, t5.T5Config):
        back = t5.T5Config.from_hf(d, has_lm_head=not cfg.tie_word_embeddings)
    elif isinstance(cfg, bert.BertConfig):
        back = bert.BertConfig.from_dict(d)
    elif isinstance(cfg, clip.CLIPConfig):
        back = clip.CLIPConfig.from_dict(d)
    else:
        back = clip.CLIPVisionConfig.from_dict(d)
    assert back == cfg


# --------------------------------------------------------------------------- (d) refusals


def _refused(tmp_path, match, *args, **kwargs):
    """save_pretrained raises ValueError matching ``match`` and leaves tmp_path as it was."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=match):
        save_pretrained(*args, **kwargs)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_quantization_the_format_cannot_hold_is_refused_before_writing(tmp_path):
    out = tmp_path / "out" / "m"
    model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    p = pure(model)
    q = "model/layers/0/self_attn/q_proj/kernel"
    _refused(tmp_path, r"5-bit codes.*\(2, 3, 4, 8\)", model,
             quantize_params(p, BLOCK_LINEARS, QuantSpec(bits=5, group_size=32)), out)
    mixed = quantize_params(quantize_params(p, q, QuantSpec(bits=8, group_size=32)), BLOCK_LINEARS,
                            QuantSpec(bits=4, group_size=32))
    _refused(tmp_path, "several grids", model, mixed, out)
    awq = quantize_params(p, BLOCK_LINEARS, lambda path, w: QuantizedWeight.from_codes(
        *_rtn_parts(w), QuantSpec(bits=4, group_size=32), input_scale=jnp.ones(w.shape[0])))
    _refused(tmp_path, "input_scale", model, awq, out)
    _, zero0 = synthetic_llama(4, 32, "static", min_zero=0)
    _refused(tmp_path, "zero points are 0.*gptq_v2", model, zero0, out)
    save_pretrained(model, zero0, tmp_path / "v2", checkpoint_format="gptq_v2")   # v2 holds them
    _refused(tmp_path, "not a linear kernel", model,
             quantize_params(p, "embed_tokens/embedding", QuantSpec(bits=4, group_size=32)), out)
    ragged = quantize_params(p, BLOCK_LINEARS, lambda path, w: QuantizedWeight.from_codes(
        *_rtn_parts(w)[:3], jnp.zeros(w.shape[0], jnp.int32).at[0].set(1), QuantSpec(bits=4, group_size=32)))
    _refused(tmp_path, "group_size rows", model, ragged, out)
    half = quantize_params(p, r"layers/0/.*/kernel", QuantSpec(bits=4, group_size=32))
    _refused(tmp_path, "float linear where the other blocks quantize", model,
             quantize_params(half, r"layers/1/mlp/up_proj/kernel", QuantSpec(bits=4, group_size=32)), out)
    wide = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(hidden_size=48, num_attention_heads=4),
                                  rngs=nnx.Rngs(0))
    _refused(tmp_path, "multiples of 32", wide,
             quantize_params(pure(wide), BLOCK_LINEARS, QuantSpec(bits=4, group_size=16)), out)
    vision = clip.CLIPVisionModelWithProjection(clip.CLIPVisionConfig.small(), rngs=nnx.Rngs(0))
    _refused(tmp_path, "outside the model's blocks", vision,
             quantize_params(pure(vision), "visual_projection", QuantSpec(bits=4, group_size=32)), out)
    big = jax.tree.map(lambda x: x, p)
    big["model"]["norm"]["scale"] = big["model"]["norm"]["scale"].at[0].set(1e6)
    _refused(tmp_path, "model/norm/scale.*float16's range", model, big, out)
    save_pretrained(model, big, tmp_path / "f32", dtype="float32")
    full = quantize_params(p, BLOCK_LINEARS, QuantSpec(bits=4, group_size=32))
    _refused(tmp_path, "bits=8, but the quantized weights say 4", model, full, out,
             quantization_config={"bits": 8})
    _refused(tmp_path, "no kernel of params is quantized", model, p, out,
             quantization_config={"damp_percent": 0.01})


def _rtn_parts(w):
    from epmq_jax.quant import rtn

    qw = rtn(w, QuantSpec(bits=4, group_size=32))
    return qw.codes(), qw.scales, qw.zeros, qw.g_idx


def test_bad_paths_and_options_are_refused_and_overwrite_replaces(tmp_path):
    model, params = synthetic_llama(4, 32, "static")
    (tmp_path / "afile").write_text("x")
    _refused(tmp_path, "is a file", model, params, tmp_path / "afile")
    _refused(tmp_path, "a parent of", model, params, tmp_path / "afile" / "sub" / "m")
    _refused(tmp_path, "checkpoint_format", model, params, tmp_path / "m", checkpoint_format="gptq_v3")
    _refused(tmp_path, "dtype", model, params, tmp_path / "m", dtype="int8")
    _refused(tmp_path, "max_shard_size", model, params, tmp_path / "m", max_shard_size="5 parsecs")
    _refused(tmp_path, "tokenizer_dir.*not a directory", model, params, tmp_path / "m",
             tokenizer_dir=tmp_path / "nope")
    (tmp_path / "emptytok").mkdir()
    _refused(tmp_path, "none of the tokenizer files", model, params, tmp_path / "m",
             tokenizer_dir=tmp_path / "emptytok")
    _refused(tmp_path, "model_or_config", object(), params, tmp_path / "m")
    _refused(tmp_path, "params: None", model.config, None, tmp_path / "m")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    _refused(tmp_path, "holds no config.json", model, params, tmp_path / "home", overwrite=True)

    out = save_pretrained(model, params, tmp_path / "m")
    first = (out / "model.safetensors").read_bytes()
    _refused(tmp_path, "exists; pass overwrite", model, params, out, checkpoint_format="gptq_v2")
    assert (out / "model.safetensors").read_bytes() == first
    _, other = synthetic_llama(4, 32, "static", seed=1)
    save_pretrained(model.config, other, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "emptytok", "home", "m"]
    kept = json.loads((out / "config.json").read_text())          # a config.json dict is kept
    save_pretrained({**kept, "note": "kept"}, other, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["note"] == "kept"


# --------------------------------------------------------------------------- (e) epmq export


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """One tiny offline `epmq run` (about a minute); its 4-bit E-PMQ checkpoint."""
    workdir = tmp_path_factory.mktemp("export_run")
    config = str(ROOT / "configs" / "offline_8task.py") + ":tiny"
    assert cli.main(["run", "--config", config, "--workdir", str(workdir), "--no-plots",
                     "--config.run.companions="]) == 0   # the narrow regime alone
    return Path(report.read_json(workdir / "results.json")["checkpoints"]["ta_epmq_w4"])


def test_epmq_export_writes_a_clip_vision_gptq_directory(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "vision-gptq"
    assert cli.main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["model_type"] == "clip_vision_model" and config["num_channels"] == 1
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == (4, 32, False, "gptq")
    assert qc["damp_percent"] == 0.01 and qc["true_sequential"] is True
    assert qc["meta"]["epmq_method"] == "epmq" and qc["meta"]["epmq_merge"] == "ta"

    meta, _, model_pool, _, params = pipeline.load_checkpoint(tiny_checkpoint)
    back = qleaves(pure(from_pretrained(out, quantized="packed")))
    source = qleaves(params)
    assert sum(map(is_quantized, source.values())) == 12
    for path, want in source.items():
        if is_quantized(want):
            np.testing.assert_array_equal(back[path].codes(), want.codes(), err_msg=path)
            np.testing.assert_array_equal(back[path].zeros, want.zeros, err_msg=path)

    # transformers' CLIPVisionModelWithProjection on the independently read weights
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **{k: v for k, v in config.items() if k != "quantization_config"})).float().eval()
    ref.load_state_dict(to_torch(read_gptq_dir(out)), strict=True)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).image_embeds.numpy()
    np.testing.assert_allclose(np.asarray(from_pretrained(out)(jnp.asarray(images))), want,
                               atol=1e-4, rtol=0)
    # ... and it is the run's model, up to float16 storage
    run_model = nnx.merge(model_pool.graphdef, pipeline.dequantize_tree(params))
    np.testing.assert_allclose(np.asarray(run_model(jnp.asarray(images))), want, atol=2e-2,
                               rtol=2e-2)

    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists; pass overwrite" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                     "--format", "gptq_v2", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"


def test_epmq_export_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    cases = [
        (["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
         "no checkpoint directory"),
        (["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")], "no meta.json"),
        (["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "awq"],
         "invalid choice"),
        (["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--config.quant.bits=3"],
         "overrides only apply"),
        (["export", "--checkpoint", str(tmp_path)], "--out"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists()

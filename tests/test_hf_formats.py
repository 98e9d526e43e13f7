"""from_pretrained on every weight format the hub publishes, against transformers' PyTorch models.

Fixtures are written here from tiny random transformers models: safetensors (save_pretrained,
single and sharded), ``pytorch_model.bin`` (``torch.save(state_dict)`` beside config.json, single
and sharded with its index) and ``flax_model.msgpack`` in the hub's Flax layout (single and
sharded), the latter converted from the torch state dict by the PyTorch -> Flax rules written out
below (by module type), independently of the loader. Also: format preference, lazy reading, a
mocked hub (only the chosen format is fetched, the revision is passed), the offline cache, the
missing-torch error, truncated/corrupt files, NaN weights and the ``dtype`` option.
"""

import copy
import json
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx, serialization, traverse_util

from epmq_jax.models import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_models_clip import VISION_KW, _pixels, _text_batch, _torch_clip  # noqa: E402
from test_models_t5 import _inputs, _torch_t5  # noqa: E402

EOS = 3  # CLIP text config's eos_token_id
BF16, F16, F32 = map(np.dtype, ("bfloat16", "float16", "float32"))


# --- writers of the formats, from a torch model ----------------------------------------------


def _split(names, n):
    """``names`` in order, cut into ``n`` consecutive non-empty groups."""
    return [list(part) for part in np.array_split(np.array(names, dtype=object), n)]


def _write_index(d: Path, index_name: str, weight_map: dict):
    (d / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_bin(model, d: Path, shards: int = 1):
    """``torch.save(state_dict)`` beside config.json, as older hub repos hold it."""
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    sd = model.state_dict()
    if shards == 1:
        torch.save(sd, d / "pytorch_model.bin")
        return d
    weight_map = {}
    for i, names in enumerate(_split(list(sd), shards)):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: sd[k] for k in names}, d / file)
        weight_map.update(dict.fromkeys(names, file))
    _write_index(d, "pytorch_model.bin.index.json", weight_map)
    return d


def torch_to_flax(model) -> dict[tuple[str, ...], np.ndarray]:
    """The hub's Flax layout of a torch model's params (transformers' PyTorch -> Flax rules):
    Linear ``weight`` -> ``kernel`` transposed, Conv2d ``weight`` -> ``kernel`` HWIO, LayerNorm
    ``weight`` -> ``scale``, Embedding ``weight`` -> ``embedding``; everything else (T5's
    layer-norm ``weight``, CLIP's ``class_embedding`` and ``logit_scale``) as is. A module shared
    under two names (T5's embed_tokens = shared) is stored once, under its first name."""
    flat, seen = {}, set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key, w = (*(mod_name.split(".") if mod_name else ()), p_name), p.detach().numpy()
            if p_name == "weight":
                if isinstance(mod, torch.nn.Linear):
                    key, w = key[:-1] + ("kernel",), w.T
                elif isinstance(mod, torch.nn.Conv2d):
                    key, w = key[:-1] + ("kernel",), w.transpose(2, 3, 1, 0)
                elif isinstance(mod, torch.nn.LayerNorm):
                    key = key[:-1] + ("scale",)
                elif isinstance(mod, torch.nn.Embedding):
                    key = key[:-1] + ("embedding",)
            flat[key] = np.array(w, order="C")  # (ascontiguousarray would make 0-d 1-d)
    return flat


def save_msgpack(model, d: Path, shards: int = 1):
    """``flax_model.msgpack`` (or shards + ``flax_model.msgpack.index.json`` keyed by
    "/"-joined param paths, as transformers' Flax ``save_pretrained`` writes them)."""
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    flat = torch_to_flax(model)
    if shards == 1:
        tree = traverse_util.unflatten_dict(flat)
        (d / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
        return d
    weight_map = {}
    for i, keys in enumerate(_split(list(flat), shards)):
        file = f"flax_model-{i + 1:05d}-of-{shards:05d}.msgpack"
        tree = traverse_util.unflatten_dict({k: flat[k] for k in keys})
        (d / file).write_bytes(serialization.msgpack_serialize(tree))
        weight_map.update(dict.fromkeys(("/".join(k) for k in keys), file))
    _write_index(d, "flax_model.msgpack.index.json", weight_map)
    return d


def save_safetensors(model, d: Path, shards: int = 1):
    model.save_pretrained(d, **({"max_shard_size": "20KB"} if shards > 1 else {}))
    assert (d / "model.safetensors.index.json").is_file() == (shards > 1)
    return d


SAVE = {"safetensors": save_safetensors, "msgpack": save_msgpack, "bin": save_bin}
LAYOUTS = [(fmt, shards) for fmt in SAVE for shards in (1, 3)]


# --- CLIP: reference outputs once per module ---------------------------------------------------


@pytest.fixture(scope="module")
def clip_ref():
    ref = _torch_clip(EOS, "gelu")
    x = _pixels()
    ids, mask = _text_batch(EOS)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    want = {"img": out.image_embeds.numpy(), "txt": out.text_embeds.numpy(),
            "logits": out.logits_per_image.numpy()}
    return ref, (x, ids, mask), want


def _clip_outputs(model, inputs):
    x, ids, mask = map(jnp.asarray, inputs)
    img = model.get_image_features(x)
    txt = model.get_text_features(ids, mask)
    return {"img": img / jnp.linalg.norm(img, axis=-1, keepdims=True),
            "txt": txt / jnp.linalg.norm(txt, axis=-1, keepdims=True),
            "logits": model(x, ids, mask)}


def _assert_clip_parity(model, clip_ref, atol=1e-4):
    _, inputs, want = clip_ref
    got = _clip_outputs(model, inputs)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float32), want[k], atol=atol, rtol=0,
                                   err_msg=k)


@pytest.mark.parametrize("fmt,shards", LAYOUTS)
def test_clip_every_format_matches_torch(tmp_path, clip_ref, fmt, shards):
    d = SAVE[fmt](clip_ref[0], tmp_path / fmt, shards)
    tensors = hf.open_tensors(d)
    assert tensors.format == fmt and (len(tensors.files) > 2) == (shards > 1)
    model = hf.from_pretrained(d)
    assert _param_dtypes(model) == {F32}
    _assert_clip_parity(model, clip_ref)


@pytest.mark.parametrize("fmt,shards", [("bin", 1), ("msgpack", 1), ("msgpack", 2)])
def test_t5_formats_match_torch(tmp_path, fmt, shards):
    """T5 keeps its layer norms' ``weight`` in Flax; the bin state dict repeats ``shared`` as
    ``encoder/decoder.embed_tokens``; the untied lm_head (FLAN-T5) is a Dense kernel."""
    ref, _, _ = _torch_t5(tmp_path / "st", untied=True)
    d = SAVE[fmt](ref, tmp_path / fmt, shards)
    if fmt == "msgpack":
        flat = torch_to_flax(ref)
        assert ("encoder", "final_layer_norm", "weight") in flat
        assert ("shared", "embedding") in flat and ("lm_head", "kernel") in flat
    assert hf.open_tensors(d).format == fmt
    ids, mask, dec = _inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec)).logits.numpy()
    model = hf.from_pretrained(d)
    got = model(jnp.asarray(ids), jnp.asarray(mask), decoder_input_ids=jnp.asarray(dec))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_legacy_pickle_bin_is_read_without_mmap(tmp_path, clip_ref):
    """Pre-zip ``torch.save`` files (old hub repos) cannot be memory-mapped; they still load."""
    d = tmp_path / "legacy"
    d.mkdir()
    clip_ref[0].config.save_pretrained(d)
    torch.save(clip_ref[0].state_dict(), d / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    _assert_clip_parity(hf.from_pretrained(d), clip_ref)


# --- which format, laziness ------------------------------------------------------------------


def _vision(seed):
    torch.manual_seed(seed)
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW)).eval()


def test_preference_safetensors_then_msgpack_then_bin(tmp_path):
    """Three different models' weights in one directory: the format read is the one loaded."""
    d = tmp_path / "all"
    models = {fmt: _vision(seed) for seed, fmt in enumerate(("safetensors", "msgpack", "bin"))}
    for fmt, m in models.items():
        SAVE[fmt](m, d, 2)
    name = "encoder.layers.0.mlp.fc1.weight"
    for fmt, m in models.items():
        tensors = hf.open_tensors(d)
        assert tensors.format == fmt
        np.testing.assert_array_equal(tensors[name], m.state_dict()[name].numpy())
        loaded = hf.from_pretrained(d)
        np.testing.assert_array_equal(loaded.encoder.layers[0].mlp.fc1.kernel[...],
                                      m.state_dict()[name].numpy().T)
        (d / tensors.files[0]).unlink()  # drop this format's index: the next one is read
    with pytest.raises(FileNotFoundError, match="no complete weights.*pytorch_model.bin"):
        hf.open_tensors(d)


def test_incomplete_shards_fall_back_to_the_next_format(tmp_path, clip_ref):
    d = save_safetensors(clip_ref[0], tmp_path / "d", 3)
    save_msgpack(clip_ref[0], d)
    next(d.glob("model-*.safetensors")).unlink()
    assert hf.open_tensors(d).format == "msgpack"
    (d / "flax_model.msgpack").unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are absent: model-0000"):
        hf.open_tensors(d)


def test_tensors_are_read_on_lookup_only(tmp_path, clip_ref, monkeypatch):
    d = save_safetensors(clip_ref[0], tmp_path / "d")
    reads = []
    real = hf._SafetensorsFile.read
    monkeypatch.setattr(hf._SafetensorsFile, "read",
                        lambda self, name: reads.append(name) or real(self, name))
    tensors = hf.open_tensors(d)
    names = list(tensors)
    assert len(tensors) == len(names) and "logit_scale" in tensors and "nope" not in tensors
    assert reads == []
    assert tensors["logit_scale"].shape == ()
    assert reads == ["logit_scale"]
    with pytest.raises(KeyError):
        tensors["nope"]
    hf.from_pretrained(d)  # load_into reads each tensor it uses once
    assert sorted(reads[1:]) == sorted(n for n in names if not n.endswith("position_ids"))


# --- the hub (mocked: no network) --------------------------------------------------------------


class FakeHub:
    """Stands in for huggingface_hub's model_info / hf_hub_download / snapshot_download over a
    local "repo" directory, recording every file requested and every revision passed."""

    def __init__(self, repo: Path, cache: Path):
        self.repo, self.cache, self.calls = repo, cache, []

    def _copy(self, names, revision):
        out = self.cache / (revision or "main")
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(self.repo / name, out / name)
        return out

    def model_info(self, repo_id, *, revision=None, **kw):
        self.calls.append(("model_info", repo_id, revision, None))
        files = sorted(p.name for p in self.repo.iterdir())
        return SimpleNamespace(sha="f" * 40, siblings=[SimpleNamespace(rfilename=f) for f in files])

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kw):
        self.calls.append(("hf_hub_download", repo_id, revision, [filename]))
        return str(self._copy([filename], revision) / filename)

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None,
                          local_files_only=False, **kw):
        assert not local_files_only
        self.calls.append(("snapshot_download", repo_id, revision, list(allow_patterns)))
        names = [p.name for p in self.repo.iterdir()
                 if any(fnmatch(p.name, pat) for pat in allow_patterns)]
        return str(self._copy(names, revision))

    def requested(self):
        return {f for call in self.calls if call[3] for f in call[3]}


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def install(repo: Path, cache: Path) -> FakeHub:
        hub = FakeHub(repo, cache)
        for name in ("model_info", "hf_hub_download", "snapshot_download"):
            monkeypatch.setattr(huggingface_hub, name, getattr(hub, name))
        return hub

    return install


def _repo(tmp_path, clip_ref, formats):
    repo = tmp_path / "repo"
    clip_ref[0].config.save_pretrained(repo)
    for fmt, shards in formats:
        SAVE[fmt](clip_ref[0], repo, shards)
    (repo / "tf_model.h5").write_bytes(b"not read")
    (repo / "README.md").write_text("model card")
    return repo


def test_hub_fetches_only_the_chosen_format(tmp_path, clip_ref, online):
    repo = _repo(tmp_path, clip_ref, [("safetensors", 3), ("msgpack", 1), ("bin", 1)])
    hub = online(repo, tmp_path / "cache")
    model = hf.from_pretrained("org/tiny-clip", revision="v1.0")
    _assert_clip_parity(model, clip_ref)
    shards = {p.name for p in repo.glob("model-*.safetensors")}
    assert len(shards) > 1
    assert hub.requested() == {"config.json", "model.safetensors.index.json", *shards}
    assert {call[2] for call in hub.calls} == {"v1.0"}
    assert {call[1] for call in hub.calls} == {"org/tiny-clip"}


def test_hub_repo_like_openai_clip_gets_msgpack_only(tmp_path, clip_ref, online):
    """openai/clip-vit-base-patch32 holds pytorch_model.bin, flax_model.msgpack, tf_model.h5."""
    hub = online(_repo(tmp_path, clip_ref, [("msgpack", 1), ("bin", 1)]), tmp_path / "cache")
    _assert_clip_parity(hf.from_pretrained("openai/tiny-clip"), clip_ref)
    assert hub.requested() == {"config.json", "flax_model.msgpack"}
    assert {call[2] for call in hub.calls} == {None}


def test_hub_bin_only_without_torch_fails_before_downloading(tmp_path, clip_ref, online,
                                                             monkeypatch):
    hub = online(_repo(tmp_path, clip_ref, [("bin", 2)]), tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"pytorch_model.bin.index.json.*pip install"):
        hf.from_pretrained("org/old-clip")
    assert hub.requested() == set()
    monkeypatch.setitem(sys.modules, "torch", torch)
    _assert_clip_parity(hf.from_pretrained("org/old-clip"), clip_ref)
    assert hub.requested() == {"config.json", "pytorch_model.bin.index.json",
                               "pytorch_model-00001-of-00002.bin",
                               "pytorch_model-00002-of-00002.bin"}


def test_hub_errors_are_file_not_found(tmp_path, clip_ref, online, monkeypatch):
    import huggingface_hub

    repo = _repo(tmp_path, clip_ref, [])
    online(repo, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="org/no-weights.*no complete weights"):
        hf.from_pretrained("org/no-weights")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known\nmore lines")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(FileNotFoundError, match=r"'org/x' at revision 'v2' on the hub: "
                                                r"ConnectionError: Name or service not known$"):
        hf.from_pretrained("org/x", revision="v2")
    with pytest.raises(ValueError, match="revision='v2' applies to hub repo ids"):
        hf.from_pretrained(repo, revision="v2")


def test_offline_uses_any_format_in_the_cache(tmp_path, clip_ref, monkeypatch):
    """A real hub cache layout (refs/main -> snapshots/<sha>/...) read by huggingface_hub itself
    with HF_HUB_OFFLINE=1; the snapshot holds the msgpack a previous download chose."""
    import huggingface_hub

    sha = "a" * 40
    root = tmp_path / "hub" / "models--org--tiny-clip"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    snap = save_msgpack(clip_ref[0], root / "snapshots" / sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_clip_parity(hf.from_pretrained("org/tiny-clip"), clip_ref)
    _assert_clip_parity(hf.from_pretrained("org/tiny-clip", revision=sha), clip_ref)
    with pytest.raises(FileNotFoundError, match="'org/tiny-clip' at revision 'v9' in the local "
                                                "hub cache"):
        hf.from_pretrained("org/tiny-clip", revision="v9")
    (snap / "flax_model.msgpack").unlink()
    with pytest.raises(FileNotFoundError, match="cached 'org/tiny-clip'.*no complete weights"):
        hf.from_pretrained("org/tiny-clip")


# --- errors: torch missing, truncated and corrupt files, NaN -----------------------------------


def test_bin_without_torch_names_the_file_and_the_fix(tmp_path, clip_ref, monkeypatch):
    d = save_bin(clip_ref[0], tmp_path / "d")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError) as err:
        hf.from_pretrained(d)
    msg = str(err.value)
    assert "\n" not in msg and str(d / "pytorch_model.bin") in msg
    assert "pip install 'epmq-jax[torch]'" in msg


@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1),
                                        ("bin", 2), ("msgpack", 1)])
def test_truncated_file_is_a_one_line_error_naming_it(tmp_path, clip_ref, fmt, shards):
    d = SAVE[fmt](clip_ref[0], tmp_path / "d", shards)
    victim = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".msgpack"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError) as err:
        hf.from_pretrained(d)
    msg = str(err.value)
    assert str(victim) in msg and "truncated or corrupt" in msg and "\n" not in msg


def test_git_lfs_pointer_is_named(tmp_path, clip_ref):
    d = save_safetensors(clip_ref[0], tmp_path / "d")
    (d / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                         "oid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match="model.safetensors is a git-lfs pointer.*git lfs pull"):
        hf.from_pretrained(d)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "msgpack"])
def test_nonfinite_weight_is_refused_naming_tensor_and_file(tmp_path, fmt):
    m = _vision(0)
    name = "encoder.layers.1.mlp.fc2.weight"
    with torch.no_grad():
        m.state_dict()[name][2, 3] = float("nan")
        m.state_dict()[name][0, 0] = float("inf")
    d = SAVE[fmt](m, tmp_path / fmt, 1)
    with pytest.raises(ValueError) as err:
        hf.from_pretrained(d)
    msg = str(err.value)
    assert f"tensor {name!r}" in msg and "2 NaN/inf" in msg and "\n" not in msg
    assert str(next(d.glob(f"*.{fmt}"))) in msg
    model = hf.from_pretrained(d, allow_nonfinite=True)
    kernel = np.asarray(model.encoder.layers[1].mlp.fc2.kernel[...])
    assert np.isnan(kernel[3, 2]) and np.isinf(kernel[0, 0])


# --- dtype -------------------------------------------------------------------------------------


def _param_dtypes(model):
    return {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_dtype_bfloat16_gives_bf16_params(tmp_path, clip_ref):
    d = save_safetensors(clip_ref[0], tmp_path / "d")
    model = hf.from_pretrained(d, dtype="bfloat16")
    assert _param_dtypes(model) == {BF16}
    ref_w = clip_ref[0].state_dict()["vision_model.encoder.layers.0.mlp.fc1.weight"].numpy()
    np.testing.assert_array_equal(model.vision_model.encoder.layers[0].mlp.fc1.kernel[...],
                                  ref_w.T.astype(ml_dtypes.bfloat16))
    _assert_clip_parity(model, clip_ref, atol=5e-2)  # bf16 rounding of weights and activations
    assert _param_dtypes(hf.from_pretrained(d, dtype=np.float16)) == {F16}
    with pytest.raises(ValueError, match="dtype='int8'.*floating"):
        hf.from_pretrained(d, dtype="int8")


def test_dtype_auto_reads_config(tmp_path, clip_ref):
    d = save_safetensors(clip_ref[0], tmp_path / "d")
    config = json.loads((d / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"  # transformers 5 writes "dtype", 4.x "torch_dtype"
    (d / "config.json").write_text(json.dumps(config))
    assert _param_dtypes(hf.from_pretrained(d, dtype="auto")) == {BF16}
    config.pop("dtype")
    config["torch_dtype"] = "float16"
    (d / "config.json").write_text(json.dumps(config))
    assert _param_dtypes(hf.from_pretrained(d, dtype="auto")) == {F16}
    config.pop("torch_dtype")
    (d / "config.json").write_text(json.dumps(config))
    assert _param_dtypes(hf.from_pretrained(d, dtype="auto")) == {F32}


def test_t5_dtype_bfloat16_params_float32_compute(tmp_path):
    ref, _, _ = _torch_t5(tmp_path / "st", untied=True)
    model = hf.from_pretrained(tmp_path / "st", dtype="bfloat16")
    assert _param_dtypes(model) == {BF16}
    ids, mask, dec = _inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec)).logits.numpy()
    got = model(jnp.asarray(ids), jnp.asarray(mask), decoder_input_ids=jnp.asarray(dec))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=5e-2 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "msgpack"])
def test_bf16_checkpoints_read_exactly(tmp_path, fmt):
    """bfloat16 weights on disk (numpy has no bfloat16 of its own) load to the same values."""
    m = _vision(1).to(torch.bfloat16)
    if fmt == "msgpack":  # numpy needs float32 on the way; flax stores bfloat16 natively
        d = tmp_path / fmt
        m.config.save_pretrained(d)
        flat = torch_to_flax(copy.deepcopy(m).float())
        tree = traverse_util.unflatten_dict({k: v.astype(ml_dtypes.bfloat16)
                                             for k, v in flat.items()})
        (d / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    else:
        d = SAVE[fmt](m, tmp_path / fmt, 1)
    name = "encoder.layers.0.self_attn.q_proj.weight"
    tensors = hf.open_tensors(d)
    assert tensors[name].dtype == ml_dtypes.bfloat16
    model = hf.from_pretrained(d)
    assert _param_dtypes(model) == {F32}
    np.testing.assert_array_equal(model.encoder.layers[0].self_attn.q_proj.kernel[...],
                                  m.state_dict()[name].float().numpy().T)

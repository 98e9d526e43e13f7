"""Low-bit checkpoints: orbax round trip, atomic saves under simulated crashes, safetensors export
read back with an independent NumPy unpacker."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from epmq_jax import checkpoint
from epmq_jax.quant import QuantizedWeight, QuantSpec, rtn


def make_tree(seed):
    rng = np.random.default_rng(seed)
    w1 = jnp.asarray(rng.normal(size=(64, 24)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(40, 16)), jnp.bfloat16)
    q2 = rtn(w2, QuantSpec(bits=3, group_size=-1, symmetric=True))
    q2 = QuantizedWeight(**{**q2.__dict__, "input_scale": jnp.linspace(0.5, 2.0, 40)})
    return {"params": {"fc1": {"kernel": rtn(w1, QuantSpec(bits=4, group_size=16)),
                               "bias": jnp.arange(24.0)},
                       "fc2": {"kernel": q2},
                       "ln": {"scale": jnp.ones(7)}},
            "step": jnp.asarray(3)}


def assert_same(a, b):
    fa, fb = a["params"]["fc1"]["kernel"], b["params"]["fc1"]["kernel"]
    assert isinstance(fb, QuantizedWeight) and fb.spec == fa.spec and fb.shape == fa.shape
    for x, y in [(fa, fb), (a["params"]["fc2"]["kernel"], b["params"]["fc2"]["kernel"])]:
        np.testing.assert_array_equal(np.asarray(x.packed), np.asarray(y.packed))
        np.testing.assert_array_equal(np.asarray(x.dequantize(), np.float32),
                                      np.asarray(y.dequantize(), np.float32))
        assert x.dtype == y.dtype
    np.testing.assert_array_equal(a["params"]["fc1"]["bias"], b["params"]["fc1"]["bias"])
    assert int(b["step"]) == int(a["step"])


def test_round_trip_without_target(tmp_path):
    tree = make_tree(0)
    checkpoint.save(tmp_path / "ck", tree)
    assert_same(tree, checkpoint.load(tmp_path / "ck"))


def test_load_into_target_structure(tmp_path):
    tree = make_tree(0)
    checkpoint.save(tmp_path / "ck", tree)
    got = checkpoint.load(tmp_path / "ck", target=tree)
    assert_same(tree, got)
    with pytest.raises(ValueError, match="params/extra: in target but not in the checkpoint"):
        checkpoint.load(tmp_path / "ck", target={"params": {"extra": jnp.ones(2)}})


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    first = make_tree(0)
    checkpoint.save(ck, first)
    real_write = checkpoint._write_version

    def crash_while_writing(tmp, tree):
        (tmp / "epmq.json").write_text("{partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "_write_version", crash_while_writing)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(ck, make_tree(1))
    assert_same(first, checkpoint.load(ck))

    # crash after the new version is complete but before LATEST moves
    monkeypatch.setattr(checkpoint, "_write_version", real_write)
    monkeypatch.setattr(checkpoint, "_point_latest", lambda *a: (_ for _ in ()).throw(OSError))
    with pytest.raises(OSError):
        checkpoint.save(ck, make_tree(1))
    assert_same(first, checkpoint.load(ck))

    # the next good save wins and cleans up the leftovers
    monkeypatch.undo()
    second = make_tree(2)
    checkpoint.save(ck, second)
    assert_same(second, checkpoint.load(ck))
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "v000002"]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoint.load(tmp_path)


def np_unpack_words(words, bits, n, axis):
    """Independent reader: int32 words -> little-endian bitstream -> n b-bit codes."""
    w = np.ascontiguousarray(np.moveaxis(words, axis, -1)).astype("<i4")
    stream = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")[..., :n * bits]
    stream = stream.reshape(*stream.shape[:-1], n, bits)
    codes = (stream * (1 << np.arange(bits))).sum(-1)
    return np.moveaxis(codes, -1, axis)


def test_export_safetensors_gptq_layout(tmp_path):
    tree = make_tree(0)
    f = checkpoint.export_safetensors(tree, tmp_path / "model.safetensors")
    t = load_file(str(f))
    k = "params/fc1/kernel"
    assert t[k + ".qweight"].dtype == np.int32 and t[k + ".qweight"].shape == (64 * 4 // 32, 24)
    assert t[k + ".qzeros"].shape == (4, 24 * 4 // 32) and t[k + ".scales"].shape == (4, 24)
    assert "params/fc1/bias" in t and "params/fc2/kernel.input_scale" in t
    with safe_open(str(f), "np") as fh:
        meta = json.loads(fh.metadata()["epmq_jax"])
    for path in ["params/fc1/kernel", "params/fc2/kernel"]:
        bits = meta[path]["bits"]
        d_in, d_out = meta[path]["shape"]
        q = np_unpack_words(t[path + ".qweight"], bits, d_in, axis=0)
        z = np_unpack_words(t[path + ".qzeros"], bits, d_out, axis=1)
        g = t[path + ".g_idx"]
        w = t[path + ".scales"][g] * (q - z[g])
        if path + ".input_scale" in t:
            w = w / t[path + ".input_scale"][:, None]
        qw = tree["params"][path.split("/")[1]]["kernel"]
        np.testing.assert_allclose(w, np.asarray(qw.dequantize(), np.float32), rtol=1e-2 if
                                   qw.dtype == "bfloat16" else 1e-6, atol=1e-6)
    # 4-bit: word j of a column holds rows 8j..8j+7, row 8j+i in bits 4i..4i+3 (GPTQ layout)
    codes = np.asarray(tree["params"]["fc1"]["kernel"].codes()).astype(np.int64)
    word0 = sum(codes[i, 0] << (4 * i) for i in range(8))
    assert t[k + ".qweight"][0, 0] == np.int64(word0).astype(np.uint32).view(np.int32)


# ---------------------------------------------------------------------------------------------
# export_safetensors: collisions, existing paths, no temp files, C order.

def test_export_refuses_two_leaves_exporting_one_tensor(tmp_path):
    q = rtn(jnp.ones((8, 4)), QuantSpec(bits=4, group_size=-1))
    for tree, names in [({"a": q, "a.qweight": jnp.ones(3)}, ("a", "a.qweight")),
                        ({"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}, ("a/b", "a/b"))]:
        with pytest.raises(ValueError, match=rf"^tree: leaves '{names[0]}' and '{names[1]}' both "
                                             "export the tensor"):
            checkpoint.export_safetensors(tree, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_directories_and_existing_files(tmp_path, monkeypatch):
    tree = {"w": jnp.arange(4.0)}
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a directory"):      # before: IsADirectoryError + .tmp
        checkpoint.export_safetensors(tree, tmp_path / "dir.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.export_safetensors(tree, tmp_path / "nowhere" / "m.safetensors")
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"precious")
    with pytest.raises(ValueError, match=rf"^file: {f} exists; pass overwrite=True"):
        checkpoint.export_safetensors(tree, f)
    assert f.read_bytes() == b"precious"

    import safetensors.numpy

    def fails_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", fails_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.export_safetensors(tree, f, overwrite=True)
    monkeypatch.undo()
    assert f.read_bytes() == b"precious"
    checkpoint.export_safetensors(tree, f, overwrite=True)
    np.testing.assert_array_equal(load_file(str(f))["w"], np.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "m.safetensors"]


def test_export_writes_transposed_arrays_in_c_order(tmp_path):
    w = np.arange(15, dtype=np.float32).reshape(3, 5).T          # (5, 3), a Fortran-order view
    b = np.asarray(jnp.arange(6, dtype=jnp.bfloat16)).reshape(2, 3).T
    f = checkpoint.export_safetensors({"w": w, "b": b}, tmp_path / "m.safetensors")
    t = load_file(str(f))
    np.testing.assert_array_equal(t["w"], [[0, 5, 10], [1, 6, 11], [2, 7, 12], [3, 8, 13], [4, 9, 14]])
    np.testing.assert_array_equal(t["b"].astype(np.float32), [[0, 3], [1, 4], [2, 5]])


"""Low-bit checkpoints: orbax round trip, loading on another device count (subprocesses with 8
and 1 devices), checksums against damaged files, atomic and locked saves under crashes
(SIGKILL in a subprocess) and concurrency, never deleting foreign data, and the safetensors
export read back with an independent NumPy unpacker. References: the saved trees' host bytes."""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file

from epmq_jax import checkpoint
from epmq_jax._tree import leaves_with_paths
from epmq_jax.quant import QuantizedWeight, QuantSpec, gptq, rtn

ROOT = Path(__file__).resolve().parents[1]


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
    assert sorted(p.name for p in ck.iterdir()) == [".epmq-checkpoint", ".epmq-checkpoint.lock",
                                                 "LATEST", "v000002"]


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
# Any topology: a tree sharded over 8 devices loads bit-exactly in a 1-device process, and back.

def host_arrays(tree):
    """{path: host array} of every array in ``tree`` (QuantizedWeight fields as path/field)."""
    return {p: np.asarray(x) for p, x in leaves_with_paths(tree)}


def run_python(code, devices, *args):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=600)


TOPOLOGY_SCRIPT = """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
    from epmq_jax import checkpoint
    from epmq_jax._tree import leaves_with_paths
    from epmq_jax.quant import QuantizedWeight, QuantSpec, gptq
    mode, ck, ref = sys.argv[1:]
    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    cols, rows, rep = (NamedSharding(mesh, s) for s in (P(None, "x"), P("x"), P()))
    host = lambda t: {p: np.asarray(x) for p, x in leaves_with_paths(t)}
    if mode == "save":
        rng = np.random.default_rng(0)
        x = rng.normal(size=(128, 32)).astype(np.float32)
        w = jax.device_put(rng.normal(size=(32, 64)).astype(np.float32), cols)
        tree = {"layer": {"kernel": gptq(w, jnp.asarray(x.T @ x), QuantSpec(bits=4, group_size=16)),
                          "bias": jax.device_put(rng.normal(size=64).astype(np.float32), rows)}}
        assert tree["layer"]["kernel"].packed.sharding.is_equivalent_to(cols, 2)
        checkpoint.save(ck, tree)
        np.savez(ref, **host(tree))
    else:
        target = {"layer": {"kernel": cols, "bias": rows}} if mode == "load-sharded" else None
        got = checkpoint.load(ck, target)
        want = np.load(ref)
        have = host(got)
        assert sorted(have) == sorted(want.files), (sorted(have), want.files)
        for p in want.files:
            assert have[p].dtype == want[p].dtype, p
            np.testing.assert_array_equal(have[p], want[p], err_msg=p)
        qw = got["layer"]["kernel"]
        assert isinstance(qw, QuantizedWeight) and (qw.bits, qw.group_size, qw.shape) == (4, 16, (32, 64))
        arrays = dict(leaves_with_paths(got))
        if target is None:      # the default device of this process
            for p, a in arrays.items():
                assert a.sharding == SingleDeviceSharding(jax.devices()[0]), (p, a.sharding)
        else:                   # the kernel's d_out split carried over to the packed arrays
            for f in ("packed", "scales", "zeros"):
                assert arrays[f"layer/kernel/{f}"].sharding.is_equivalent_to(cols, 2), f
            assert arrays["layer/kernel/g_idx"].sharding.is_equivalent_to(rep, 1)
            assert arrays["layer/bias"].sharding.is_equivalent_to(rows, 1)
            assert len(arrays["layer/bias"].devices()) == jax.device_count() == 8
    print("OK", mode, jax.device_count())
"""


@pytest.mark.parametrize("saved_on, loaded_on, mode", [(8, 1, "load"), (1, 8, "load-sharded")])
def test_checkpoint_loads_bit_exactly_on_another_device_count(tmp_path, saved_on, loaded_on, mode):
    ck, ref = tmp_path / "ck", tmp_path / "ref.npz"
    saved = run_python(TOPOLOGY_SCRIPT, saved_on, "save", ck, ref)
    assert saved.returncode == 0 and "OK save" in saved.stdout, saved.stderr[-3000:]
    loaded = run_python(TOPOLOGY_SCRIPT, loaded_on, mode, ck, ref)
    assert loaded.returncode == 0 and f"OK {mode} {loaded_on}" in loaded.stdout, loaded.stderr[-3000:]


def sharded_tree():
    """A gptq kernel and a plain array, column-/row-sharded over this process's 8 devices."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 32)).astype(np.float32)
    w = jax.device_put(rng.normal(size=(32, 64)).astype(np.float32), NamedSharding(mesh, P(None, "x")))
    qw = gptq(w, jnp.asarray(x.T @ x), QuantSpec(bits=4, group_size=16))
    b = jax.device_put(np.arange(64, dtype=np.float32), NamedSharding(mesh, P("x")))
    return mesh, {"layer": {"kernel": qw, "bias": b}}


def test_load_places_arrays_as_the_target_says(tmp_path):
    mesh, tree = sharded_tree()
    ck = tmp_path / "ck"
    checkpoint.save(ck, tree)
    want = host_arrays(tree)

    def check(got, shardings):
        have = host_arrays(got)
        assert sorted(have) == sorted(want)
        for p in want:
            np.testing.assert_array_equal(have[p], want[p], err_msg=p)
        for p, a in leaves_with_paths(got):
            assert a.sharding.is_equivalent_to(shardings[p], a.ndim), (p, a.sharding)

    original = {p: a.sharding for p, a in leaves_with_paths(tree)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
    for target in (tree, abstract, jax.tree.map(lambda a: a.sharding, tree)):
        check(checkpoint.load(ck, target=target), original)
    # A float kernel where the checkpoint has a QuantizedWeight: split along d_out like it.
    cols = NamedSharding(mesh, P(None, "x"))
    kernel = jax.device_put(jnp.zeros((32, 64)), cols)
    got = checkpoint.load(ck, target={"layer": {"kernel": kernel, "bias": 0}})
    rep, dev0 = NamedSharding(mesh, P()), SingleDeviceSharding(jax.devices()[0])
    check(got, {"layer/kernel/packed": cols, "layer/kernel/scales": cols, "layer/kernel/zeros": cols,
                "layer/kernel/g_idx": rep, "layer/bias": dev0})
    # No target: every array on the current default device.
    with jax.default_device(jax.devices()[3]):
        got = checkpoint.load(ck)
    check(got, {p: SingleDeviceSharding(jax.devices()[3]) for p in want})
    with pytest.raises(ValueError, match=r"layer/bias: target has shape \(65,\), the checkpoint"):
        checkpoint.load(ck, target={"layer": {"bias": jnp.zeros(65)}})


# ---------------------------------------------------------------------------------------------
# Integrity: damaged files and manifests give one-line ValueErrors naming the file or array.

def data_files(ck):
    return sorted((p for p in (ck / "v000000" / "state").rglob("*") if p.is_file()),
                  key=lambda p: (p.stat().st_size, str(p)))


def test_flipped_bit_in_the_largest_data_file_is_refused(tmp_path):
    ck = tmp_path / "ck"
    checkpoint.save(ck, {"a": jnp.arange(20000.0), "b": jnp.ones((40, 40))})
    big = data_files(ck)[-1]
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x04
    big.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{big}: corrupt \(sha256 differs") as e:
        checkpoint.load(ck)
    assert "\n" not in str(e.value)


def many_sharded_arrays():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    s = NamedSharding(mesh, P("x"))
    return {f"k{i}": jax.device_put(jnp.arange(800.0) + i, s) for i in range(40)}


@pytest.mark.parametrize("which", ["largest", "state/d", "state/manifest.ocdbt", "state/_METADATA"])
def test_truncated_file_one_line_error_without_event_loop_spew(tmp_path, capfd, which):
    # Before: a bare Exception (largest) or tensorstore's ValueError followed by one
    # "RuntimeError: Event loop is closed" traceback per pending read (state/d, manifest).
    ck = tmp_path / "ck"
    checkpoint.save(ck, many_sharded_arrays())
    files = data_files(ck)
    victim = files[-1] if which == "largest" else next(
        p for p in files if p.relative_to(ck / "v000000").as_posix().startswith(which))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    with pytest.raises(ValueError, match=rf"^{victim}: truncated or altered \({len(data) // 2} "
                                         rf"bytes, {len(data)} written\)$"):
        checkpoint.load(ck)
    time.sleep(0.5)      # the spew came from reads finishing after the error
    out, err = capfd.readouterr()
    assert "Event loop is closed" not in out + err and "Traceback" not in out + err


def test_array_failing_its_checksum_is_named(tmp_path):
    # Damage the file checks cannot see (the manifest's record of one array disagrees with
    # the stored bytes, its files intact): the array check names the array.
    ck = tmp_path / "ck"
    tree = make_tree(0)
    version = checkpoint.save(ck, tree)
    manifest = json.loads((version / "epmq.json").read_text())
    other = np.asarray(tree["params"]["fc1"]["bias"]) + 1
    manifest["arrays"]["params/fc1/bias"]["sha256"] = hashlib.sha256(other.tobytes()).hexdigest()
    manifest["manifest_sha256"] = checkpoint._manifest_sha256(manifest)
    (version / "epmq.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"^{version}: array 'params/fc1/bias' fails its checksum"):
        checkpoint.load(ck)
    # and an edit of the manifest itself is caught by its own checksum
    manifest["quantized"]["params/fc1/kernel"]["bits"] = 3
    (version / "epmq.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"^{version / 'epmq.json'}: corrupt \(its content"):
        checkpoint.load(ck)


def test_corrupt_latest_json_and_marker_are_one_line_errors(tmp_path):
    ck = tmp_path / "ck"
    version = checkpoint.save(ck, make_tree(0))
    (ck / "LATEST").write_bytes(b"\xff\xfe\x00garbage")        # before: UnicodeDecodeError
    with pytest.raises(ValueError, match=rf"^{ck / 'LATEST'}: unreadable or corrupt"):
        checkpoint.load(ck)
    (ck / "LATEST").write_text("v000009")
    with pytest.raises(ValueError, match=rf"^{ck / 'LATEST'}: names v000009, which is missing"):
        checkpoint.load(ck)
    (ck / "LATEST").write_text(version.name)
    (version / "epmq.json").write_text('{"format": "epmq-jax-tree/2", "quan')  # before: JSONDecodeError
    with pytest.raises(ValueError, match=rf"^{version / 'epmq.json'}: unreadable or corrupt "
                                         r"\(JSONDecodeError"):
        checkpoint.load(ck)
    (ck / checkpoint.MARKER).write_text("[1, 2")
    with pytest.raises(ValueError, match=rf"^{ck / checkpoint.MARKER}: unreadable or corrupt"):
        checkpoint.save(ck, make_tree(1))
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) == ["LATEST", "v000000"]


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    # The layout written before manifests existed (format /1): still readable, said unverified.
    import orbax.checkpoint as ocp

    ck = tmp_path / "ck"
    (ck / "v000000").mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((ck / "v000000" / "state").absolute(), {"w": {"kernel": jnp.arange(6.0)}})
    (ck / "v000000" / "epmq.json").write_text('{"format": "epmq-jax-tree/1", "quantized": {}}')
    (ck / "LATEST").write_text("v000000")
    with pytest.warns(UserWarning, match="written without checksums"):
        got = checkpoint.load(ck)
    np.testing.assert_array_equal(got["w"]["kernel"], np.arange(6.0))


# ---------------------------------------------------------------------------------------------
# Saves never destroy data: foreign entries, key collisions, concurrency, SIGKILL.

def test_save_never_deletes_what_it_did_not_write(tmp_path):
    d = tmp_path / "d"
    for name in ("v000001", ".tmp-mine", "results"):
        (d / name).mkdir(parents=True)
        (d / name / "data.txt").write_text(name)
    with pytest.raises(ValueError, match=rf"^path: {d} is not empty .* no \.epmq-checkpoint marker"):
        checkpoint.save(d, make_tree(0))
    assert sorted(p.name for p in d.iterdir()) == [".tmp-mine", "results", "v000001"]  # no lock either
    with pytest.raises(ValueError, match="is a file"):
        checkpoint.save(d / "results" / "data.txt", make_tree(0))

    ck = tmp_path / "ck"
    checkpoint.save(ck, make_tree(0))
    for name in ("v000007", ".tmp-mine"):            # a user's own entries, added later
        (ck / name).mkdir()
        (ck / name / "data.txt").write_text(name)
    checkpoint.save(ck, make_tree(1))
    last = checkpoint.save(ck, make_tree(2))
    assert last.name == "v000009"                     # numbered past the foreign v000007
    assert sorted(p.name for p in ck.iterdir()) == [
        ".epmq-checkpoint", ".epmq-checkpoint.lock", ".tmp-mine", "LATEST", "v000007", "v000009"]
    assert (ck / "v000007" / "data.txt").read_text() == "v000007"
    assert_same(make_tree(2), checkpoint.load(ck))


@pytest.mark.parametrize("tree, names", [
    ({"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}, ("a/b", "a/b")),
    ({"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}, ("a/b", "a.b")),
    ({"k/packed": jnp.ones(2), "k": rtn(jnp.ones((8, 4)), QuantSpec(bits=4, group_size=-1))},
     ("k", "k/packed")),
])
def test_save_refuses_two_leaves_stored_under_one_name(tmp_path, tree, names):
    with pytest.raises(ValueError, match=rf"^tree: leaves '{names[0]}' and '{names[1]}' would both"):
        checkpoint.save(tmp_path / "ck", tree)
    assert not (tmp_path / "ck").exists()


def test_save_refuses_a_leaf_that_is_also_a_parent(tmp_path):
    with pytest.raises(ValueError, match=r"^tree: leaf 'a/b' is also the parent of leaf 'a/b/c'"):
        checkpoint.save(tmp_path / "ck", {"a/b": jnp.ones(2), "a": {"b": {"c": jnp.zeros(2)}}})
    assert not (tmp_path / "ck").exists()


def test_concurrent_saves_run_one_after_the_other(tmp_path):
    ck = tmp_path / "ck"
    checkpoint.save(ck, make_tree(0))
    fd = os.open(ck / ".epmq-checkpoint.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)          # as another process in the middle of a save
    errors = []

    def save(seed):
        try:
            checkpoint.save(ck, make_tree(seed))
        except BaseException as e:           # reported below
            errors.append(e)

    waiting = threading.Thread(target=save, args=(1,))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive() and (ck / "LATEST").read_text() == "v000000"
    os.close(fd)
    waiting.join(timeout=120)
    assert not waiting.is_alive() and not errors
    assert_same(make_tree(1), checkpoint.load(ck))
    # Two saves started together both succeed; the last one wins, one version remains.
    both = [threading.Thread(target=save, args=(seed,)) for seed in (2, 3)]
    for t in both:
        t.start()
    for t in both:
        t.join(timeout=120)
    assert not errors
    got = checkpoint.load(ck)
    packed = lambda t: np.asarray(t["params"]["fc1"]["kernel"].packed)
    seed = 2 if np.array_equal(packed(got), packed(make_tree(2))) else 3
    assert_same(make_tree(seed), got)
    assert [p.name for p in ck.iterdir() if p.name.startswith("v")] == ["v000003"]


SIGKILL_SCRIPT = """
    import os, signal, sys
    import numpy as np
    from epmq_jax import checkpoint
    ck = sys.argv[1]
    tree = lambda seed: {"w": np.random.default_rng(seed).normal(size=(64, 48)).astype(np.float32)}
    checkpoint.save(ck, tree(0))
    write = checkpoint._write_version

    def killed_while_writing(tmp, stored):
        write(tmp, stored)                   # the new version's files are all there ...
        os.kill(os.getpid(), signal.SIGKILL) # ... but never renamed into place

    checkpoint._write_version = killed_while_writing
    checkpoint.save(ck, tree(1))
"""


def test_save_killed_with_sigkill_keeps_the_previous_version(tmp_path):
    ck = tmp_path / "ck"
    r = run_python(SIGKILL_SCRIPT, 1, ck)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    tree = lambda seed: {"w": np.random.default_rng(seed).normal(size=(64, 48)).astype(np.float32)}
    leftover = [p.name for p in ck.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftover) == 1
    assert json.loads((ck / checkpoint.MARKER).read_text())["pending"] == leftover
    np.testing.assert_array_equal(checkpoint.load(ck)["w"], tree(0)["w"])
    checkpoint.save(ck, tree(2))              # removes the killed save's leftovers: they are its own
    assert sorted(p.name for p in ck.iterdir()) == [
        ".epmq-checkpoint", ".epmq-checkpoint.lock", "LATEST", "v000001"]
    np.testing.assert_array_equal(checkpoint.load(ck)["w"], tree(2)["w"])


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


def test_round_trip_keeps_every_dtype_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"bf16": jnp.asarray(rng.normal(size=(3, 5)), jnp.bfloat16),
            "f16": jnp.asarray(rng.normal(size=7), jnp.float16),
            "i8": jnp.asarray(rng.integers(-128, 128, size=(2, 3)), jnp.int8),
            "u32": jnp.asarray(rng.integers(0, 2**32, size=4), jnp.uint32),
            "mask": jnp.asarray(rng.random(6) > 0.5),
            "step": jnp.asarray(7),
            "nan": jnp.asarray([np.nan, -0.0, np.inf], jnp.float32)}
    checkpoint.save(tmp_path / "ck", tree)
    got = checkpoint.load(tmp_path / "ck")
    for k, x in tree.items():
        want, have = np.asarray(x), np.asarray(got[k])
        assert have.dtype == want.dtype and have.shape == want.shape, k
        assert have.tobytes() == want.tobytes(), k

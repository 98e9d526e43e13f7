"""The `epmq` command line and config overrides: help texts, one-line errors, override parsing."""

import subprocess
import sys
import textwrap

import ml_collections
import pytest

from epmq_jax import cli
from epmq_jax.config import (
    ConfigError,
    apply_override,
    config_name,
    load_config,
    load_with_overrides,
    split_override_args,
)

CONFIG = textwrap.dedent('''
    import ml_collections

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.quant = dict(bits=(4, 3), group_size=64, symmetric=False, damp=0.01)
        c.calib = dict(lam=0.1, anchor="output", n_per_task=256)
        c.merge = dict(methods=("ta", "ties"), scaling=ml_collections.config_dict.placeholder(float))
        c.size = arg or "full"
        return c
''')


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "my_exp.py"
    p.write_text(CONFIG)
    return p


def run_main(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("cmd", ["run", "merge", "quantize", "eval", "report", "export"])
def test_every_subcommand_has_help_with_examples(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: epmq {cmd}")
    assert "examples:" in out and f"epmq {cmd} --" in out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("run", "merge", "quantize", "eval", "report", "export"):
        assert f"    {cmd} " in out


@pytest.mark.parametrize("argv, needle", [
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["run"], "required: --config"),
    (["run", "--config", "no/such/file.py"], "config file not found: no/such/file.py"),
    (["quantize", "--config", "x.py", "--bits", "9"], "invalid choice: 9"),
    (["quantize", "--config", "x.py", "--bits", "four"], "invalid int value: 'four'"),
    (["merge", "--config", "x.py"], "required: --method"),
    (["eval"], "required: --checkpoint"),
    (["eval", "--checkpoint", "/no/such/ckpt"], "no checkpoint directory at /no/such/ckpt"),
    (["report", "--workdir", "/no/such/run"], "no results file at /no/such/run/results.json"),
    (["run", "--bogus", "--config", "x.py"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line(capsys, argv, needle):
    rc, out, err = run_main(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("epmq") and ": error: " in err and needle in err
    assert "Traceback" not in err


def test_bad_override_is_one_line_with_close_matches(capsys, cfg_file):
    rc, _, err = run_main(capsys, "run", "--config", str(cfg_file), "--config.quant.bitz=3")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "unknown config key --config.quant.bitz" in err and "--config.quant.bits" in err
    rc, _, err = run_main(capsys, "run", "--config", str(cfg_file), "--config.calib.lam=big")
    assert rc == 2 and "expected float" in err and "Traceback" not in err
    rc, _, err = run_main(capsys, "run", "--config", str(cfg_file), "--config.quant")
    assert rc == 2 and "needs a value" in err


def test_config_without_get_config_is_an_error(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    rc, _, err = run_main(capsys, "run", "--config", str(bad))
    assert rc == 2 and "defines no get_config()" in err


def test_installed_script_module_gives_one_line_error():
    # A fresh interpreter: no traceback reaches the user even before jax is imported.
    r = subprocess.run([sys.executable, "-m", "epmq_jax.cli", "run", "--config", "missing.py"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "epmq run: error: config file not found: missing.py"


def test_load_config_name_and_arg(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg.name == "my_exp" == config_name(cfg_file) == config_name(f"{cfg_file}:tiny")
    assert load_config(f"{cfg_file}:tiny").size == "tiny"


@pytest.mark.parametrize("key, text, expected", [
    ("quant.group_size", "128", 128),
    ("quant.damp", "0.1", 0.1),
    ("quant.damp", "1", 1.0),            # an int where a float is: accepted, stays float
    ("quant.symmetric", "True", True),
    ("quant.symmetric", "no", False),
    ("quant.bits", "3", (3,)),           # a single item for a tuple
    ("quant.bits", "4,3,2", (4, 3, 2)),
    ("quant.bits", "(2, 8)", (2, 8)),
    ("calib.anchor", "weight", "weight"),
    ("merge.methods", "ties", ("ties",)),
    ("merge.scaling", "0.4", 0.4),       # a typed placeholder
])
def test_override_parsing(cfg_file, key, text, expected):
    cfg = load_with_overrides(cfg_file, [(key, text)])
    section, leaf = key.split(".")
    got = cfg[section][leaf]
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("key, text, needle", [
    ("quant.group_size", "1.5", "expected int"),
    ("quant.symmetric", "maybe", "expected bool"),
    ("quant.bits", "4,x", "expected tuple of int"),
    ("merge.scaling", "abc", "expected float"),
    ("quant", "3", "is a section"),
    ("nosuch.key", "1", "unknown config key --config.nosuch.key"),
    ("calib.lamb", "1", "did you mean --config.calib.lam"),
])
def test_override_errors(cfg_file, key, text, needle):
    cfg = load_config(cfg_file)
    with pytest.raises(ConfigError) as e:
        apply_override(cfg, key, text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_split_override_args_both_forms():
    ov, rest = split_override_args(["run", "--config.a.b=1", "--config", "f.py", "--config.c", "x y", "--workdir", "w"])
    assert ov == [("a.b", "1"), ("c", "x y")]
    assert rest == ["run", "--config", "f.py", "--workdir", "w"]


def test_overrides_apply_in_order():
    cfg = ml_collections.ConfigDict({"q": {"bits": 4}})
    apply_override(cfg, "q.bits", "3")
    apply_override(cfg, "q.bits", "2")
    assert cfg.q.bits == 2


def test_report_subcommand_rewrites_the_report(tmp_path, capsys):
    from epmq_jax import report

    rows = [report.make_row("expert", "fp", {"a": 90.0, "b": 80.0}),
            report.make_row("ta", "fp", {"a": 70.0, "b": 60.0}, merge_scaling=0.3),
            report.make_row("ta", "gptq", {"a": 65.0, "b": 55.0}, bits=4, merge_scaling=0.3)]
    report.write_json(tmp_path / "results.json", rows, timings={"total": 1.0})
    rc, out, err = run_main(capsys, "report", "--workdir", str(tmp_path))
    assert rc == 0 and err == ""
    assert "GPTQ w4" in out and "60.0" in out
    assert report.read_csv(tmp_path / "results.csv") == rows
    assert (tmp_path / "results.md").read_text().startswith("# epmq results")
    assert not (tmp_path / "per_task.png").exists()
    assert run_main(capsys, "report", "--results", str(tmp_path / "results.json"), "--plots")[0] == 0
    assert (tmp_path / "per_task.png").stat().st_size > 10_000


BAD_VALUES = [
    ("--config.quant.bits=9", "quant.bits"),
    ("--config.quant.bits=", "quant.bits"),
    ("--config.quant.group_size=7", "quant.group_size"),
    ("--config.quant.methods=rtn,bogus", "quant.methods"),
    ("--config.calib.lam=-1", "calib.lam"),
    ("--config.calib.anchor=bogus", "calib.anchor"),
    ("--config.calib.ablations=target=nowhere", "calib.ablations"),
    ("--config.merge.scalings=", "merge.scalings"),
    ("--config.merge.filter=nomatch", "merge.filter"),
    ("--config.merge.methods=ta,dare", "merge.methods"),
    ("--config.eval.limit=0", "eval.limit"),
    ("--config.run.mesh=data", "run.mesh"),
    ("--config.suite.regime=wide", "suite.regime"),
    ("--config.calib.full.settings.head_lam=0", "calib.full.settings"),
]


@pytest.mark.parametrize("argv", [["run"], ["merge", "--method", "ta"], ["quantize", "--bits", "4"]])
@pytest.mark.parametrize("override, key", BAD_VALUES)
def test_bad_config_values_fail_in_one_line_before_any_work(capsys, tmp_path, argv, override, key):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "offline_8task.py"
    rc, out, err = run_main(capsys, *argv, "--config", f"{path}:tiny", "--workdir", str(tmp_path / "w"),
                            override)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"epmq {argv[0]}: error: --config.{key}"), err
    # nothing was built or trained (checks against the model's shapes need no training)
    assert not list((tmp_path / "w").glob("cache/*")), list((tmp_path / "w").rglob("*"))


@pytest.mark.parametrize("config", ["clip_vit_b32_ta8", "flan_t5_base_glue"])
def test_paper_config_without_its_checkpoints_fails_in_one_line(capsys, tmp_path, config):
    """Offline, a hub checkpoint that is not cached is one line naming it, not a traceback."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{config}.py"
    rc, out, err = run_main(capsys, "quantize", "--config", str(path), "--workdir", str(tmp_path),
                            f"--config.model_pool.base={tmp_path / 'missing'}")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "missing" in err


# --------------------------------------------------------------------------- companion configs

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"

COMPANION = textwrap.dedent('''
    from epmq_jax.config import load_config

    def get_config(arg="tiny"):
        c = load_config("{broad}:" + arg)
        c.name = "{name}"
        {extra}
        return c
''')


def _companion_file(tmp_path, stem, name, extra="pass"):
    path = tmp_path / f"{stem}.py"
    path.write_text(COMPANION.format(broad=CONFIGS / "offline_8task_broad.py", name=name, extra=extra))
    return str(path)


@pytest.mark.parametrize("companions, needle", [
    ("nothere.py", "config file not found: "),
    ("offline_8task.py", "has companions of its own"),                      # nothing nests
    ("offline_8task_broad.py:huge", "size must be 'full', 'small' or 'tiny', got 'huge'"),
    ("offline_8task_broad.py,offline_8task_broad.py:small", "is taken by the companion"),
    ("offline_8task_broad.py,offline_8task_broad.py", "no repeated configs"),
    ("{tmp}/cache.py", "is a folder of the run directory"),
    ("{tmp}/bad_bits.py", "offline_8task_broad_bad ({tmp}/bad_bits.py:tiny): --config.quant.bits=(9,)"),
])
def test_bad_companions_fail_in_one_line_before_any_work(capsys, tmp_path, companions, needle):
    _companion_file(tmp_path, "cache", "cache")
    _companion_file(tmp_path, "bad_bits", "offline_8task_broad_bad", extra="c.quant.bits = (9,)")
    companions, needle = companions.format(tmp=tmp_path), needle.format(tmp=tmp_path)
    rc, out, err = run_main(capsys, "run", "--config", f"{CONFIGS / 'offline_8task.py'}:tiny",
                            "--workdir", str(tmp_path / "w"), f"--config.run.companions={companions}")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("epmq run: error: --config.run.companions"), err
    assert needle in err, err
    assert not (tmp_path / "w").exists()


def test_companions_take_the_run_section_and_the_size(tmp_path, monkeypatch):
    """The main job's companion is the broad regime at the main config's size, found next to the
    config file whatever the working directory, with the command line's run.* settings."""
    from epmq_jax.pipeline.validate import check_companions, check_config

    monkeypatch.chdir(tmp_path)
    cfg = load_with_overrides(f"{CONFIGS / 'offline_8task.py'}:tiny", [
        ("run.mesh", "data:4"), ("run.resume", "true"), ("run.cache_dir", str(tmp_path / "c"))])
    [broad] = check_companions(cfg)
    alone = load_config(f"{CONFIGS / 'offline_8task_broad.py'}:tiny")
    assert broad.name == "offline_8task_broad" and broad.suite.regime == "broad"
    assert broad.suite.to_dict() == alone.suite.to_dict() and broad.model.to_dict() == alone.model.to_dict()
    assert (broad.run.mesh, broad.run.resume, broad.run.cache_dir) == ("data:4", True, str(tmp_path / "c"))
    assert broad.run.companions == () and broad.run.source == f"{CONFIGS / 'offline_8task_broad.py'}:tiny"
    assert check_companions(alone) == []       # run alone, the broad regime runs nothing after it
    cfg = load_with_overrides(f"{CONFIGS / 'offline_8task.py'}:tiny",
                              [("run.companions", "offline_8task_broad.py:small")])
    assert check_companions(cfg)[0].suite.pretrain_n == load_config(
        f"{CONFIGS / 'offline_8task_broad.py'}:small").suite.pretrain_n != alone.suite.pretrain_n
    assert check_companions(load_with_overrides(f"{CONFIGS / 'offline_8task.py'}:tiny",
                                                [("run.companions", "")])) == []
    # merge / quantize do not run companions: the config's own check does not load them
    check_config(load_with_overrides(f"{CONFIGS / 'offline_8task.py'}:tiny", [("run.companions", "nothere.py")]))


def test_heads_need_a_task_pool_with_readout_heads():
    """E-PMQ-full's ``heads`` (on in the offline suite's settings) needs per-task linear heads
    from the task pool, checked once the pools are built; without the piece nothing is asked."""
    from epmq_jax.pipeline.validate import check_task_pool

    cfg = load_with_overrides(f"{CONFIGS / 'offline_8task.py'}:tiny", [])
    check_task_pool(cfg, type("Pool", (), {"readout_heads": lambda self: []})())
    with pytest.raises(ConfigError, match="task pool 'offline_suite' has no per-task linear heads"):
        check_task_pool(cfg, object())
    check_task_pool(load_with_overrides(f"{CONFIGS / 'offline_8task.py'}:tiny",
                                        [("calib.full.settings.heads", "false")]), object())

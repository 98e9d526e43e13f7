"""The runner's run-wide knobs on the tiny offline config: a mesh, resuming, and eval.limit.

Shares the trained tiny suite with tests/test_pipeline_e2e.py through the training cache
(``run.cache_dir``), so only merging, calibration and scoring run here.
"""

from pathlib import Path

import pytest

from epmq_jax import pipeline
from epmq_jax.config import load_with_overrides
from epmq_jax.pipeline import runner as runner_mod

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "offline_8task.py") + ":tiny"


def _cfg(cache, **overrides):
    cfg = load_with_overrides(CONFIG, [(k, v) for k, v in overrides.items()])
    with cfg.unlocked():
        cfg.run.cache_dir = str(cache)
        cfg.merge.methods = ("ta",)
        cfg.merge.scaling = 0.3
        cfg.quant.methods = ("gptq", "epmq")
        cfg.calib.lam_sweep = ()
        cfg.calib.ablations = ()
        cfg.calib.full = None      # E-PMQ-full's rows: tests/test_pipeline_e2e.py
        cfg.run.companions = ()    # the broad companion: tests/test_pipeline_e2e.py
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "runner_cache"


@pytest.fixture(scope="module")
def plain(cache, tmp_path_factory):
    return pipeline.run(_cfg(cache), tmp_path_factory.mktemp("plain"), plots=False, log=lambda _: None)


def _by_name(doc):
    return {(r["merge"], r["method"], r["bits"]): r for r in doc["rows"]}


def test_mesh_reaches_calibration_and_evaluation(cache, plain, tmp_path, monkeypatch):
    """run.mesh shards calibration batches and solves and the evaluation batches over 4 devices:
    the float rows score the same images, and the calibrated rows are of the same quality."""
    from epmq_jax import calib

    seen = []
    real = calib.calibrate

    def spy(*args, **kwargs):
        seen.append((kwargs.get("mesh"), kwargs.get("axis")))
        return real(*args, **kwargs)

    monkeypatch.setattr(calib, "calibrate", spy)
    doc = pipeline.run(_cfg(cache, **{"run.mesh": "data:4"}), tmp_path, plots=False, log=lambda _: None)
    assert seen and all(m is not None and m.shape == {"data": 4} and a == "data" for m, a in seen)
    got, want = _by_name(doc), _by_name(plain)
    n_test = _cfg(cache).suite.n_test
    for key in (("expert", "fp", None), ("ta", "fp", None)):   # the same models: at most one tie flips
        for t, acc in want[key]["per_task"].items():
            assert abs(got[key]["per_task"][t] - acc) <= 100.0 / n_test + 1e-9, (key, t)
    for key in (("ta", "gptq", 4), ("ta", "epmq", 4)):         # the same recipe on 4 devices
        assert got[key]["avg"] == pytest.approx(want[key]["avg"], abs=3.0), key


def test_resume_reuses_finished_rows(cache, plain, tmp_path, monkeypatch):
    """A run that dies after its third row (started without run.resume), rerun with run.resume,
    computes only the rest and ends with the uninterrupted run's table."""
    cfg = _cfg(cache)
    computed = []
    real = runner_mod.Runner.compute

    def dies_after_three(self, v):
        if len(computed) == 3:
            raise KeyboardInterrupt
        computed.append(v.name)
        return real(self, v)

    monkeypatch.setattr(runner_mod.Runner, "compute", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path, plots=False, log=lambda _: None)
    assert computed == ["expert_fp", "multitask_fp", "ta_fp"]
    monkeypatch.setattr(runner_mod.Runner, "compute", lambda self, v: (computed.append(v.name), real(self, v))[1])
    doc = pipeline.run(_cfg(cache, **{"run.resume": "true"}), tmp_path, plots=False, log=lambda _: None)
    assert computed[3:] == ["ta_epmq_unrounded", "ta_gptq_w4", "ta_epmq_w4"]   # finished rows not redone
    assert [r["per_task"] for r in doc["rows"][:3]] == [r["per_task"] for r in plain["rows"][:3]]
    assert set(doc["checkpoints"]) == {"ta_gptq_w4", "ta_epmq_w4"}
    # another config does not reuse them
    other = _cfg(cache, **{"run.resume": "true", "calib.lam": "0.5"})
    computed.clear()
    pipeline.run(other, tmp_path, plots=False, log=lambda _: None)
    assert computed[0] == "expert_fp"


def test_fingerprint_ignores_what_no_row_depends_on():
    """Resuming, where the config was loaded from and its companions do not change a row."""
    base = _cfg("/tmp/c")
    other = _cfg("/tmp/c", **{"run.resume": "true"})
    with other.unlocked():
        other.run.companions = ("offline_8task_broad.py:small",)
        other.run.source = "elsewhere.py:tiny"
    assert runner_mod._fingerprint(base) == runner_mod._fingerprint(other)
    for key, value in (("calib.lam", "0.5"), ("run.mesh", "data:2"), ("quant.group_size", "16")):
        assert runner_mod._fingerprint(_cfg("/tmp/c", **{key: value})) != runner_mod._fingerprint(base), key


def test_eval_limit_scores_the_first_examples(cache, plain, tmp_path):
    doc = pipeline.run(_cfg(cache, **{"eval.limit": "8"}), tmp_path, plots=False, log=lambda _: None)
    for r in doc["rows"]:
        assert all(v * 8 / 100 == pytest.approx(round(v * 8 / 100)) for v in r["per_task"].values())

"""Result rows, their writers (json / csv / md), the terminal table and the plots, on synthetic rows."""

import json

import numpy as np
import pytest

from epmq_jax import plots, report
from epmq_jax.report import make_row

TASKS = ["mnist", "mnist_rot90", "mnist_inverted", "digits_upscaled"]
EPMQ = dict(anchor="output", target="expert", task_weights="frobenius", rounding="gptq")


def synthetic_rows(seed=0):
    rng = np.random.default_rng(seed)

    def acc(base):
        return {t: float(np.clip(base + rng.normal(0, 4), 0, 100)) for t in TASKS}

    rows = [make_row("expert", "fp", acc(95)), make_row("multitask", "fp", acc(90))]
    for merge, base in (("ta", 70), ("ties", 74)):
        rows.append(make_row(merge, "fp", acc(base), merge_scaling=0.3))
        rows.append(make_row(merge, "epmq_unrounded", acc(base + 8), merge_scaling=0.3, lam=0.1,
                             **{**EPMQ, "rounding": "none"}))
        for bits in (4, 3):
            for method, off in (("rtn", -10), ("gptq", -3), ("awq", -4)):
                rows.append(make_row(merge, method, acc(base + off - 5 * (4 - bits)), bits=bits, merge_scaling=0.3))
            rows.append(make_row(merge, "epmq", acc(base + 6), bits=bits, merge_scaling=0.3, default=True,
                                 lam=0.1, **EPMQ))
    for lam in (0.0, 0.01, 1.0, 10.0):
        rows.append(make_row("ta", "epmq", acc(74 - lam), bits=4, block="sweep", merge_scaling=0.3, lam=lam, **EPMQ))
    rows.append(make_row("ta", "epmq", acc(72), bits=4, block="ablation", merge_scaling=0.3, lam=0.1,
                         **{**EPMQ, "target": "mix"}, alpha=0.25))
    rows.append(make_row("ta", "epmq", acc(71), bits=4, block="ablation", merge_scaling=0.3, lam=0.1,
                         **{**EPMQ, "anchor": "weight"}))
    return rows


def test_make_row_schema_and_average():
    r = make_row("ta", "gptq", {"a": 50.0, "b": 100.0}, bits=4)
    assert set(r) == set(report.ROW_KEYS)
    assert r["avg"] == 75.0 and r["bits"] == 4 and r["default"] is False and r["lam"] is None


@pytest.mark.parametrize("kwargs, needle", [
    (dict(merge="ta", method="gptq", per_task={"a": 1.0}), "expected an int for a quantized method"),
    (dict(merge="ta", method="fp", per_task={"a": 1.0}, bits=4), "expected None for a float method"),
    (dict(merge="ta", method="fp", per_task={"a": float("nan")}), "per_task['a']=nan"),
    (dict(merge="ta", method="fp", per_task={"a": 0.9 * 200}), "in [-100, 100]"),
    (dict(merge="ta", method="fp", per_task={"a": -100.5}), "per_task['a']=-100.5"),
    (dict(merge="ta", method="magic", per_task={"a": 1.0}), "row method 'magic'"),
    (dict(merge="ta", method="fp", per_task={}), "per_task is empty"),
    (dict(merge="ta", method="fp", per_task={"a": 1.0}, lamda=1.0), "row switches ['lamda']"),
])
def test_make_row_rejects_bad_rows(kwargs, needle):
    with pytest.raises(ValueError) as e:
        make_row(**kwargs)
    assert needle in str(e.value)


def test_negative_correlation_scores_are_kept(tmp_path):
    # GLUE: STS-B Spearman and CoLA MCC (x100) can be negative; rows keep them as they are
    per = {"cola": -12.5, "stsb": -100.0, "sst2": 91.0}
    r = make_row("ta", "gptq", per, bits=4)
    assert r["per_task"] == per and r["avg"] == pytest.approx((-12.5 - 100.0 + 91.0) / 3)
    report.write_csv(tmp_path / "results.csv", [r])
    assert report.read_csv(tmp_path / "results.csv") == [r]
    line = [ln for ln in report.format_table([r]).splitlines() if ln.startswith("GPTQ w4")][0]
    assert line.split()[2:] == ["-12.5", "-100.0", "91.0", "-7.2"]


def test_csv_round_trip_equals_rows(tmp_path):
    rows = synthetic_rows()
    report.write_csv(tmp_path / "results.csv", rows)
    assert report.read_csv(tmp_path / "results.csv") == rows


def test_json_has_rows_config_versions_machine_timings(tmp_path):
    rows = synthetic_rows()
    report.write_json(tmp_path / "results.json", rows, config={"quant": {"bits": (4, 3)}},
                      timings={"train": 1.5, "total": 9.0})
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["rows"] == rows and doc["tasks"] == TASKS
    assert doc["config"] == {"quant": {"bits": [4, 3]}}
    assert {"python", "jax", "flax", "numpy"} <= set(doc["versions"]) and doc["versions"]["jax"]
    assert {"platform", "cpu_count", "device_kind"} <= set(doc["machine"])
    assert doc["timings"] == {"train": 1.5, "total": 9.0}
    assert report.read_json(tmp_path / "results.json")["rows"] == rows
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a results.json"):
        report.read_json(tmp_path / "bad.json")


def _table_lines(text):
    return [ln for ln in text.splitlines() if ln and not ln.startswith(("--", " ", "#"))]


def test_terminal_table_blocks_and_numbers():
    rows = synthetic_rows()
    text = report.format_table(rows)
    header = text.splitlines()[0].split()
    assert header[-1] == "avg" and len(header) == len(TASKS) + 1
    titles = [ln for ln in text.splitlines() if ln.startswith("-- ")]
    assert [t.split(" -")[0][3:] for t in titles] == [
        "Full precision, no merge method", "Task Arithmetic (merge coefficient 0.3)",
        "TIES-Merging (merge coefficient 0.3)", "E-PMQ anchor strength λ, Task Arithmetic, 4 bits",
        "E-PMQ switches, Task Arithmetic, 4 bits"]
    body = _table_lines(text)
    # main blocks: 2 shared + 2 merges x (2 float + 2 bits x 4) = 22; sweep 4 + default; ablation 2 + default
    assert len(body) == 22 + 5 + 3
    gptq_ta_3 = next(r for r in rows if r["merge"] == "ta" and r["method"] == "gptq" and r["bits"] == 3)
    line = [ln for ln in body if ln.startswith("GPTQ w3")][0]
    assert [float(v) for v in line.split()[2:]] == pytest.approx(
        [round(gptq_ta_3["per_task"][t], 1) for t in TASKS] + [round(gptq_ta_3["avg"], 1)], abs=0.051)
    sweep = [ln.split()[0] for ln in body if ln.startswith("λ=")]
    assert sweep == ["λ=0", "λ=0.01", "λ=0.1", "λ=1", "λ=10"]  # sorted, default included
    assert sum("(default)" in ln for ln in body) == 2


def test_markdown_has_header_and_every_row(tmp_path):
    rows = synthetic_rows()
    report.write_markdown(tmp_path / "results.md", rows, title="Run", notes=["Test split."],
                          timings={"total": 3.0})
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Run\n")
    assert "| variant | " + " | ".join(TASKS) + " | avg |" in md
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| variant")
                  and not ln.startswith("| step") and "|---" not in ln and not ln.startswith("| total")]
    assert len(table_rows) == 22 + 5 + 3
    assert "| total | 3.0 |" in md and "Machine:" in md


def test_markdown_sections_for_companion_configs(tmp_path):
    """With companions, each config gets a section with its own notes, blocks and timings."""
    rows, other = synthetic_rows(0), synthetic_rows(1)[:6]
    report.write_markdown(tmp_path / "results.md", rows, title="Run", notes=["Main note."], timings={"total": 3.0},
                          heading="main: narrow", companions=[
                              {"heading": "other: broad", "rows": other, "notes": ["Other note."],
                               "timings": {"total": 4.0}}])
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Run\n\n## main: narrow\n")
    main, rest = md.split("## other: broad\n")
    assert "Main note." in main and "| total | 3.0 |" in main and "Other note." not in main
    assert "Other note." in rest and "| total | 4.0 |" in rest and rest.count("Machine:") == 1

    def n_rows(text):
        return sum(1 for ln in text.splitlines() if ln.startswith("| ") and "|---" not in ln
                   and not ln.startswith(("| variant", "| step", "| total")))

    assert (n_rows(main), n_rows(rest)) == (22 + 5 + 3, 2 + 4)
    assert f"| FP experts | {other[0]['per_task'][TASKS[0]]:.1f} |" in rest
    report.write_markdown(tmp_path / "alone.md", rows, title="Run", heading="main: narrow")
    assert "## main" not in (tmp_path / "alone.md").read_text()   # no companions: as before


def _png_ok(path, min_bytes=15_000):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes


def test_plots_are_written_and_non_trivial(tmp_path):
    import matplotlib.image as mpimg

    paths = plots.plot_all(synthetic_rows(), tmp_path)
    assert sorted(p.name for p in paths) == ["accuracy_vs_bits.png", "lambda_sweep.png", "per_task.png"]
    for p in paths:
        assert _png_ok(p), p
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05  # not a blank canvas


def test_plots_skip_what_has_no_data(tmp_path):
    rows = [r for r in synthetic_rows() if r["block"] == "main" and r["bits"] is None]
    paths = plots.plot_all(rows, tmp_path)
    assert [p.name for p in paths] == ["per_task.png"]


def test_short_task_names_are_unique_and_short():
    suite = ["mnist", "mnist_inverted", "mnist_rot90", "mnist_flip_parity", "mnist_noise",
             "mnist_block_shuffle", "mnist_elastic_shift", "digits_upscaled"]
    assert report.short_task_names(suite) == ["mnist", "inverted", "rot90", "parity", "noise", "shuffle",
                                              "elastic", "upscaled"]
    clash = report.short_task_names(["x_long_name_a", "x_long_name_b"], width=6)
    assert len(set(clash)) == 2 and all(len(c) <= 6 for c in clash)

"""``diffsim compare``: parallel runs give the same table as serial ones; sweeps; bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from diffsim import cli
from diffsim.reports.comparison import COMPARISON_COLUMNS, RunSpec, format_table


@pytest.fixture(scope="module")
def short_trace(tmp_path_factory) -> Path:
    """The first 20 s of traces/static.csv (about 180 queries at 9 qps)."""
    from diffsim.resources import resolve_trace
    from diffsim.workload.traces import Trace, read_trace, write_trace

    full = read_trace(resolve_trace("static.csv"))
    keep = full.arrival_s < 20.0
    path = tmp_path_factory.mktemp("traces") / "short.csv"
    write_trace(Trace(arrival_s=full.arrival_s[keep], prompt_id=full.prompt_id[keep]), path)
    return path


def compare(out: Path, trace: Path, *args: str) -> int:
    return cli.main(["compare", "--trace", str(trace), "--out", str(out), *args])


def table(capsys) -> str:
    out = capsys.readouterr().out
    return out[: out.index("wrote ")]


def test_jobs_do_not_change_results(tmp_path, short_trace, capsys):
    policies = ["--policies", "diffserve,clipper-heavy", "--no-plot"]
    assert compare(tmp_path / "j1", short_trace, *policies, "--jobs", "1") == 0
    serial = table(capsys)
    assert compare(tmp_path / "j2", short_trace, *policies, "--jobs", "2") == 0
    parallel = table(capsys)
    assert serial == parallel
    assert (tmp_path / "j1" / "comparison.csv").read_bytes() == (tmp_path / "j2" / "comparison.csv").read_bytes()
    for run in ("diffserve_g16", "clipper-heavy_g16"):
        a = (tmp_path / "j1" / "runs" / run / "timeseries.csv").read_bytes()
        assert a == (tmp_path / "j2" / "runs" / run / "timeseries.csv").read_bytes()
    with open(tmp_path / "j1" / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["policy"] for r in rows] == ["diffserve", "clipper-heavy"]
    assert list(rows[0]) == list(COMPARISON_COLUMNS)
    assert all(int(r["requests"]) == int(rows[0]["requests"]) > 100 for r in rows)


def test_compare_matches_simulate(tmp_path, short_trace, capsys):
    """A compare run is the same simulation as `diffsim simulate` with that policy."""
    assert compare(tmp_path / "cmp", short_trace, "--policies", "clipper-light", "--gpus", "4", "--jobs", "1") == 0
    assert cli.main(["simulate", "--trace", str(short_trace), "--policy", "clipper-light", "--gpus", "4",
                     "--out", str(tmp_path / "sim"), "--quiet", "--no-plot"]) == 0
    capsys.readouterr()
    run = json.loads((tmp_path / "cmp" / "runs" / "clipper-light_g4" / "summary.json").read_text())
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())
    for key in ("requests", "completed", "late", "dropped", "slo_violation_ratio", "mean_fid", "latency_p99_s", "events"):
        assert run[key] == sim[key], key
    assert (tmp_path / "cmp" / "comparison.png").read_bytes().startswith(b"\x89PNG")


def test_gpu_sweep(tmp_path, short_trace, capsys):
    rc = compare(tmp_path, short_trace, "--policies", "clipper-light,clipper-heavy", "--sweep-gpus", "2,4", "--jobs", "2")
    assert rc == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "comparison.json").read_text())
    runs = data["runs"]
    assert [(r["policy"], r["gpus"]) for r in runs] == [
        ("clipper-light", 2), ("clipper-light", 4), ("clipper-heavy", 2), ("clipper-heavy", 4)
    ]
    heavy2, heavy4 = runs[2], runs[3]
    # 9 qps is far beyond 2 heavy GPUs (about 1 qps each at batch 1... 2.2 at batch 8): more GPUs, fewer violations.
    assert heavy2["slo_violation_ratio"] > heavy4["slo_violation_ratio"]
    assert (tmp_path / "sweep_gpus.png").read_bytes().startswith(b"\x89PNG")
    assert data["scenario"]["cascade"] == "sdturbo-sdv15"


def test_threshold_sweep_pins_the_threshold(tmp_path, short_trace, capsys):
    rc = compare(tmp_path, short_trace, "--policies", "diffserve", "--sweep-thresholds", "0,0.1", "--jobs", "1")
    assert rc == 0
    capsys.readouterr()
    runs = json.loads((tmp_path / "comparison.json").read_text())["runs"]
    assert [r["threshold"] for r in runs] == [0.0, 0.1]
    for r in runs:
        with open(tmp_path / "runs" / f"diffserve_g16_t{r['threshold']:g}" / "timeseries.csv") as fh:
            thresholds = {float(row["threshold"]) for row in csv.DictReader(fh) if row["threshold"]}
        assert thresholds == {r["threshold"]}
    assert runs[0]["deferred"] == 0 and runs[0]["light_fraction"] == 1.0
    assert runs[1]["deferred"] > 0
    assert [r["pinned_share"] for r in runs] == [1.0, 1.0]  # feasible throughout: the pin held
    assert (tmp_path / "sweep_thresholds.png").exists()


def test_threshold_sweep_says_when_the_pinned_threshold_was_not_in_force(tmp_path, short_trace, capsys):
    # On 2 GPUs deferring half the queries to the heavy model is infeasible: the plans fall back to the
    # best-effort plan (threshold 0), and the table must not pass that run off as one at threshold 0.5.
    rc = compare(tmp_path, short_trace, "--policies", "diffserve", "--gpus", "2", "--sweep-thresholds", "0.5",
                 "--jobs", "1", "--no-plot")
    assert rc == 0
    assert "pinned_share" in table(capsys)
    run = json.loads((tmp_path / "comparison.json").read_text())["runs"][0]
    assert run["threshold"] == 0.5 and run["pinned_share"] < 0.5 and run["infeasible_plans"] > 0
    with open(tmp_path / "comparison.csv") as fh:
        assert float(next(csv.DictReader(fh))["pinned_share"]) == run["pinned_share"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--policies", "diffserve,nope"], "nope"),
        (["--policies", ","], "--policies"),
        (["--sweep-gpus", "8,x"], "--sweep-gpus"),
        (["--sweep-gpus", "0"], "--sweep-gpus"),
        (["--sweep-thresholds", "0.1,2"], "--sweep-thresholds"),
        (["--jobs", "0"], "--jobs"),
        (["--policies", "diffserve,proteus", "--sweep-thresholds", "0.1"], "proteus"),
        (["--cascade", "nope"], "nope"),
    ],
)
def test_bad_input(tmp_path, short_trace, capsys, args, needle):
    rc = compare(tmp_path, short_trace, *args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err and err.startswith("diffsim compare: error:")


def test_run_names_and_table():
    assert RunSpec("static", 16).name == "static_g16"
    assert RunSpec("diffserve", 8, 0.05).name == "diffserve_g8_t0.05"
    text = format_table([{"policy": "a", "x": 0.5, "n": None}], ("policy", "x", "n"))
    assert text.splitlines() == ["policy  x       n", "------  ------  -", "a       0.5000  -"]


def test_table_and_csv_carry_both_fid_and_violation_figures(tmp_path, short_trace, capsys):
    assert compare(tmp_path, short_trace, "--policies", "diffserve", "--jobs", "1", "--no-plot") == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0].split()
    for column in ("slo_violation_ratio", "slo_violation_window_mean", "mean_fid", "fid_overall_mix"):
        assert column in header and column in COMPARISON_COLUMNS
    with open(tmp_path / "comparison.csv") as fh:
        row = next(csv.DictReader(fh))
    run = json.loads((tmp_path / "runs" / "diffserve_g16" / "summary.json").read_text())
    assert float(row["mean_fid"]) == run["mean_fid"] and float(row["fid_overall_mix"]) == run["fid_overall_mix"]
    assert float(row["slo_violation_window_mean"]) == run["slo_violation_window_mean"]
    # stderr is not a terminal here: one plain line per finished run, no bar.
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[1/1] diffserve_g16: violations ") and "\r" not in captured.err
    assert compare(tmp_path, short_trace, "--policies", "diffserve", "--jobs", "1", "--no-plot", "--quiet") == 0
    assert capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    from types import SimpleNamespace

    from diffsim.commands.compare import Progress

    summary = {"slo_violation_ratio": 0.25, "slo_violation_window_mean": 0.125, "mean_fid": 17.5,
               "fid_overall_mix": 17.25, "wall_s": 1.0}
    results = [SimpleNamespace(spec=RunSpec("diffserve", g), summary=summary) for g in (8, 16)]
    line = "diffserve_g8: violations 25.00% (per-window mean 12.50%), FID 17.50 (overall mix 17.25) (1.0 s)"
    plain = io.StringIO()
    progress = Progress(2, plain)
    for r in results:
        progress.done(r)
    progress.close()
    assert plain.getvalue().splitlines() == [f"[1/2] {line}", f"[2/2] {line.replace('g8', 'g16')}"]
    terminal = _Terminal()
    progress = Progress(2, terminal)
    for r in results:
        progress.done(r)
    progress.close()
    text = terminal.getvalue()
    assert "\r" in text and "runs" in text  # tqdm's bar, redrawn in place
    assert f"[1/2] {line}" in text


def test_fallback_runs_carry_the_fallback_bound(tmp_path, short_trace, capsys):
    """With --fallback light the table and comparison.csv give mean_fid_fallback_bound after mean_fid (and
    how many fell back); without it neither has the column (test_jobs_do_not_change_results)."""
    assert compare(tmp_path, short_trace, "--policies", "diffserve", "--gpus", "8", "--preset", "artifact",
                   "--queue-model", "tail", "--fallback", "light", "--jobs", "1", "--no-plot") == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0].split()
    assert header[header.index("mean_fid") + 1] == "mean_fid_fallback_bound" and header[-1] == "fallback_light"
    assert "with fallbacks at worst" in captured.err
    with open(tmp_path / "comparison.csv") as fh:
        row = next(csv.DictReader(fh))
    columns = list(row)
    assert columns[columns.index("mean_fid") + 1] == "mean_fid_fallback_bound"
    assert [c for c in columns if c not in ("mean_fid_fallback_bound", "fallback_light")] == list(COMPARISON_COLUMNS)
    assert columns[-1] == "fallback_light" and "fallback_light" not in COMPARISON_COLUMNS
    run = json.loads((tmp_path / "runs" / "diffserve_g8" / "summary.json").read_text())
    assert float(row["mean_fid_fallback_bound"]) == run["mean_fid_fallback_bound"] >= run["mean_fid"]

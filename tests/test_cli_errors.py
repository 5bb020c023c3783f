"""Every bad input ends in one line on stderr naming the file and field (or the flag), exit code 2.

The cases are the findings of a tester's pass over a fresh clone (issue 14): tracebacks on a core install
without the optional extras, on binary files, on absurd but well-typed numbers, settings silently accepted,
and messages that named the wrong source. tests/test_fuzz_inputs.py explores the same inputs at random.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffsim import cli
from diffsim.commands.simulate import format_summary

REPO = Path(__file__).resolve().parent.parent
BINARY = b"\xff\xfe" + bytes(range(256)) * 4  # no UTF-8 text: 0xff is never part of a character


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def one_line_error(argv, needle: str, command: str) -> str:
    rc, _, err = run_cli(*argv)
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"diffsim {command}: error: "), err
    assert needle in err, err
    assert "Traceback" not in err and "usage:" not in err
    return err


@pytest.fixture
def small_trace(tmp_path) -> Path:
    path = tmp_path / "small.csv"
    path.write_text("arrival_s,prompt_id\n0.1,1\n0.5,2\n1.0,3\n2.5,4\n")
    return path


def simulate_args(tmp_path, trace, *args):
    return ["simulate", "--trace", trace, "--out", tmp_path / "out", "--quiet", "--no-plot", *args]


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("args, needle", [
    (["--gpus", "x"], "--gpus: must be an integer in 1..100000, got 'x'"),
    (["--gpus", "1000000000"], "--gpus: must be an integer in 1..100000"),
    (["--gpus", "0"], "--gpus: must be an integer in 1..100000"),
    (["--seed", "-1"], "--seed: must be an integer in 0..4294967295"),
    (["--window-s", "1e-6"], "--window-s: must be a number >= 0.01"),
    (["--max-utilization", "nan"], "--max-utilization: must be a number > 0 and <= 1"),
    (["--tail-quantile", "1"], "--tail-quantile: must"),  # the 100th percentile of a latency plans nothing
    (["--out", ""], "--out: must not be empty"),
    (["--trace", ""], "--trace: must not be empty"),
    (["--fail-worker", "20@5"], "--fail-worker/--recover-worker: worker 20 does not exist"),
])
def test_simulate_flags_name_the_flag_not_a_config(tmp_path, small_trace, args, needle):
    err = one_line_error(simulate_args(tmp_path, small_trace, *args), needle, "simulate")
    assert "config:" not in err
    assert not (tmp_path / "out").exists()


def test_windows_are_bounded_by_count_over_the_trace(tmp_path):
    long = tmp_path / "long.csv"
    long.write_text("arrival_s,prompt_id\n0.5,1\n9999999,2\n")
    one_line_error(simulate_args(tmp_path, long, "--window-s", "0.01"), "more than 1,000,000", "simulate")


@pytest.mark.parametrize("argv, needle, command", [
    (["plan", "--demand", "1", "--queue-delay-s", "-1,0"], "--queue-delay-s: each value must be a number >= 0", "plan"),
    (["plan", "--demand", "1", "--thresholds", ""], "--thresholds: expected comma-separated numbers", "plan"),
    (["plan", "--demand", "inf"], "--demand: must be a number", "plan"),
    (["compare", "--sweep-gpus", ""], "--sweep-gpus: expected comma-separated integers", "compare"),
    (["compare", "--sweep-thresholds", ","], "--sweep-thresholds: expected", "compare"),
    (["trace", "poisson", "--rate", "1e9", "--duration", "1e9", "--out", "x.csv"], "--rate: must be", "trace poisson"),
    (["trace", "poisson", "--rate", "1e6", "--duration", "1e6", "--out", "x.csv"], "10,000,000 a trace may hold", "trace"),
    (["trace", "gamma", "--rate", "1", "--cv", "1e300", "--duration", "5", "--out", "x.csv"], "--cv", "trace gamma"),
    (["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15", "--port", "99999"], "--port: must be an integer in 0..65535", "serve"),
    (["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15", "--port", "-1"], "--port: must be an integer in 0..65535", "serve"),
    (["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15", "--threads", "0"], "--threads: must be an integer in 1..1024", "serve"),
    (["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15", "--batch-sizes", ""], "--batch-sizes: expected", "serve"),
    (["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15", "--tail-quantile", "1"],
     "--tail-quantile: must be a number > 0 and < 1, got '1'", "serve"),
    (["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15", "--static-plan",
      '{"threshold": 0.1, "light_workers": 40, "heavy_workers": 2, "light_batch": 1, "heavy_batch": 1}'],
     "--static-plan: 40 light + 2 heavy workers need 42 GPUs", "serve"),
    (["profile", "--backend", "tpu"], "--backend: invalid choice: 'tpu'", "profile"),
    (["nope"], "COMMAND: invalid choice: 'nope'", ""),
])
def test_flags_out_of_bounds_are_one_line(tmp_path, monkeypatch, argv, needle, command):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(*argv)
    prefix = f"diffsim {command}: error: " if command else "diffsim: error: "
    assert rc == 2 and err.count("\n") == 1 and err.startswith(prefix) and needle in err, err
    assert "usage:" not in err and not (tmp_path / "x.csv").exists()


def test_help_states_the_bounds_and_points_to_the_config_format():
    rc, out, _ = run_cli_help("simulate")
    text = " ".join(out.split())
    assert "number of GPUs (1..100000; default 16)" in text
    assert "random seed (0..4294967295; default 0)" in text
    assert "'Config file'" in text
    for command in ("calibrate", "quality", "discriminator", "quality fid", "profile"):
        _, out, _ = run_cli_help(*command.split())
        assert "``" not in out and ":mod:" not in out and "imported only" not in out, command
    _, out, _ = run_cli_help("quality", "fid")
    assert "--images DIR folder of images to score" in " ".join(out.split())
    _, out, _ = run_cli_help("profile")
    assert "{cuda,cpu-tiny}" in out
    for command in ("serve", "simulate"):  # what --tail-quantile takes
        _, out, _ = run_cli_help(command)
        assert "latency meets the SLO (> 0, < 1; default 0.99)" in " ".join(out.split()), command


def run_cli_help(*argv) -> tuple[int, str, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    return done.value.code, out.getvalue(), ""


# ------------------------------------------------------------------------------------------ files


def test_binary_files_are_named(tmp_path, small_trace):
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(BINARY)
    for flag in ("--gpu", "--config", "--cascades", "--trace"):
        one_line_error(simulate_args(tmp_path, small_trace, flag, binary), "blob.yaml: line 1: not UTF-8", "simulate")
    # a profile, a cascades file and a confidences CSV named inside a config file
    for key in ("gpu", "cascades", "confidences"):
        config = tmp_path / f"{key}.yaml"
        config.write_text(f"{key}: blob.yaml\n")
        one_line_error(simulate_args(tmp_path, small_trace, "--config", config), "blob.yaml: line 1: not UTF-8",
                       "simulate")
    one_line_error(["trace", "info", binary], "blob.yaml: line 1: not UTF-8", "trace")


@pytest.mark.parametrize("text, needle", [
    ("gpus: 4\ngpus: 8\n", "line 2: duplicate key 'gpus' (first given on line 1)"),
    ("controller: {tick_s: 1, tick_s: 2}\n", "duplicate key 'tick_s'"),
    ("gpus: true\n", "gpus: Input should be a valid integer"),
    ("seed: '3'\n", "seed: Input should be a valid integer"),
    ("window_s: .nan\n", "window_s"),
    ("batch_sizes: [0]\n", "batch_sizes.0"),
    ("batch_sizes: []\n", "batch_sizes"),
    ("trace: ''\n", "trace"),
    ("static_plan: {threshold: 0.02, light_workers: 40, heavy_workers: 12, light_batch: 16, heavy_batch: 4}\n"
     "policy: static\n", "static_plan: 40 light + 12 heavy workers need 52 GPUs"),
    ("faults:\n  - {at_s: 1, workers: [20]}\n", "faults: worker 20 does not exist"),
])
def test_config_file_errors_name_the_file(tmp_path, small_trace, text, needle):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    err = one_line_error(simulate_args(tmp_path, small_trace, "--config", config), needle, "simulate")
    assert f"{config}: " in err


def test_profile_errors_name_the_file(tmp_path, small_trace):
    a100 = (REPO / "profiles" / "a100.yaml").read_text()
    dup = tmp_path / "dup.yaml"
    dup.write_text(a100 + "gpu: again\n")
    one_line_error(["plan", "--demand", "5", "--gpu", dup], "duplicate key 'gpu'", "plan")
    tiny = tmp_path / "tiny.yaml"
    assert "p50_ms: [100, 150" in a100
    tiny.write_text(a100.replace("p50_ms: [100, 150", "p50_ms: [1.0e-300, 150", 1))
    one_line_error(["plan", "--demand", "5", "--gpu", tiny], "p50_ms values must be positive milliseconds", "plan")


def test_trace_arrivals_are_bounded(tmp_path):
    far = tmp_path / "far.csv"
    far.write_text("arrival_s,prompt_id\n0.5,1\n1e300,2\n")
    one_line_error(["trace", "info", far], "far.csv: line 3: arrival_s 1e300 is beyond 10,000,000 s", "trace")
    one_line_error(simulate_args(tmp_path, far), "beyond 10,000,000 s", "simulate")


# ------------------------------------------------------------------------------------------ reports


def test_a_served_run_summary_has_no_none_seed_or_events():
    summary = {"cascade": "c", "gpus": 2, "gpu": "g", "policy": "p", "trace": "t.csv", "seed": None,
               "requests": 1, "completed": 1, "on_time": 1, "late": 0, "dropped": 0, "violations": 0,
               "slo_violation_ratio": 0.0, "slo_s": 5, "mean_fid": 17.0, "fid_source": "cascade",
               "light_fraction": 1.0, "deferral_fraction": 0.0, "latency_p50_s": 0.1, "latency_p99_s": 0.1,
               "throughput_qps": 1.0, "duration_s": 1.0, "gpu_utilization": 0.5, "plans_applied": 1,
               "plan_changes": 0, "infeasible_plans": 0, "wall_s": 1.0, "events": None}
    text = format_summary(summary)
    assert "None" not in text and "seed" not in text and "events" not in text
    text = format_summary({**summary, "seed": 3, "events": 12})
    assert "seed 3" in text and "(12 events)" in text


# ------------------------------------------------------------------------------------------ extras

BLOCKER = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    BLOCKED = set(sys.argv[1].split(","))

    class Missing(MetaPathFinder):
        # what Python raises for a module that is not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Missing())
    from diffsim import cli

    sys.exit(cli.main(sys.argv[2:]))
    """
)


def run_without(modules: str, *argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, modules, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.parametrize("blocked, argv, needle", [
    ("fastapi", ["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15", "--port", "0"], "'.[serve]'"),
    ("torch", ["profile", "--backend", "cpu-tiny", "--models", "sdxs", "--batch-sizes", "1", "--out", "p.yaml"],
     "'.[cuda]'"),
    ("httpx,aiohttp", ["load", "--url", "http://127.0.0.1:9", "--trace", "static.csv", "--out", "o"], "pip install"),
])
def test_a_missing_extra_is_named_in_one_line(tmp_path, blocked, argv, needle):
    res = run_without(blocked, *argv, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_prompt_files_binary_or_with_huge_fields_are_one_line(tmp_path):
    from diffsim.commands.quality import read_prompts as read_image_prompts
    from diffsim.errors import InputError
    from diffsim.profiling.calibration import read_prompts

    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"image,prompt\n" + BINARY)
    huge = tmp_path / "huge.csv"
    huge.write_text("image,prompt\na.png," + "x" * 200_000 + "\n")
    with pytest.raises(InputError, match=r"binary.csv: line 2: not UTF-8"):
        read_image_prompts(binary)
    with pytest.raises(InputError, match=r"huge.csv: line 2: bad CSV \(field larger than field limit"):
        read_image_prompts(huge)
    huge.write_text("prompt_id,prompt\n1," + "x" * 200_000 + "\n")
    with pytest.raises(InputError, match=r"huge.csv: line 2: bad CSV"):
        read_prompts(huge)

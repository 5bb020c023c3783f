"""``--fallback`` / ``fallback:``: bad values are one line naming the flag or the file and field (exit 2);
a good one reaches the run and its reports."""

from __future__ import annotations

import json

import pytest
from test_cli_errors import one_line_error, run_cli, simulate_args

from diffsim.config import RunConfig
from diffsim.errors import InputError
from sim_helpers import a100_cascade


@pytest.fixture
def small_trace(tmp_path):
    path = tmp_path / "small.csv"
    path.write_text("arrival_s,prompt_id\n0.1,1\n0.5,2\n1.0,3\n2.5,4\n")
    return path


@pytest.mark.parametrize("command", ["simulate", "compare", "serve"])
def test_a_bad_fallback_flag_is_one_line(tmp_path, small_trace, command):
    argv = simulate_args(tmp_path, small_trace, "--fallback", "heavy") if command == "simulate" else (
        ["compare", "--trace", small_trace, "--out", tmp_path / "c", "--quiet", "--no-plot", "--fallback", "heavy"]
        if command == "compare" else ["serve", "--fallback", "heavy"])
    err = one_line_error(argv, "--fallback: invalid choice: 'heavy'", command)
    assert "config:" not in err


def test_a_bad_fallback_setting_names_the_file_and_field(tmp_path, small_trace):
    config = tmp_path / "run.yaml"
    config.write_text("fallback: heavy\n")
    err = one_line_error(simulate_args(tmp_path, small_trace, "--config", config), "fallback:", "simulate")
    assert f"{config}: fallback: " in err and "'light'" in err


def test_the_run_config_checks_the_field():
    with pytest.raises(InputError, match="config: fallback: must be one of none, light, got 'heavy'"):
        RunConfig(cascade=a100_cascade(), fallback="heavy")


def test_the_flag_reaches_the_run_and_its_summary(tmp_path, small_trace):
    rc, _, err = run_cli(*simulate_args(tmp_path, small_trace, "--fallback", "light", "--json"))
    assert rc == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["fallback"] == "light" and summary["fallback_light"] == 0  # four queries: nothing late
    rc, _, err = run_cli(*simulate_args(tmp_path, small_trace))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert rc == 0 and "fallback" not in summary and summary["fallback_light"] == 0

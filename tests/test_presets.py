"""``--preset artifact``: the DiffServe artifact's settings in one named set, under the config file and flags."""

from __future__ import annotations

import json

import pytest

from diffsim import cli
from diffsim.config import build_sim_config, read_config_file
from diffsim.errors import InputError
from diffsim.plan import Plan, StagePlan
from diffsim.policies import policy_for, spread_spare_gpus
from diffsim.presets import PRESETS, apply_preset


def test_artifact_preset_is_the_artifacts_settings():
    config = build_sim_config({"preset": "artifact"})
    assert config.routing == "random"
    assert config.max_utilization == 1.0
    assert config.queue_model == "little"
    assert (config.controller.demand, config.controller.headroom) == ("in-system", 1.2)
    assert (config.controller.tick_s, config.controller.replan_s, config.controller.ewma_window) == (1.0, 5.0, 20)
    assert config.controller.ewma_alpha == pytest.approx(1 / 3.1)
    assert (config.drop_factor, config.admission, config.deadline_sweep_s) == (1.5, False, 0.0)
    assert (config.batch_timeout_s, config.swap_s, config.batch_wait) == (0.0, 0.0, 0.0)
    assert config.batch_sizes == (1, 2, 4, 8, 16, 32)
    assert config.static_plan is None  # the paper's plan for the cascade, scaled to the GPU count
    policy = policy_for(config)
    assert (policy.queue_model, policy.routing, policy.max_utilization) == ("little", "random", 1.0)


def test_defaults_are_untouched_without_a_preset():
    config = build_sim_config({})
    assert (config.routing, config.max_utilization, config.queue_model) == ("least-loaded", 0.8, None)
    assert (config.controller.demand, config.controller.headroom) == ("arrival", 1.05)
    assert policy_for(config).queue_model == "little"


def test_settings_given_win_over_the_preset_key_by_key():
    merged = apply_preset("artifact", {"routing": "least-loaded", "controller": {"replan_s": 2.0}})
    assert merged["routing"] == "least-loaded"
    assert merged["controller"]["replan_s"] == 2.0
    assert merged["controller"]["headroom"] == 1.2  # the rest of the preset's controller stays
    assert PRESETS["artifact"]["controller"]["replan_s"] == 5.0  # the preset itself is not changed


def test_config_file_names_the_preset_and_the_new_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: artifact\nqueue_model: tail\ntail_quantile: 0.95\ndemand: arrival\n")
    config = build_sim_config(read_config_file(path))
    assert (config.routing, config.queue_model, config.tail_quantile) == ("random", "tail", 0.95)
    assert (config.controller.demand, config.controller.headroom) == ("arrival", 1.2)


def test_unknown_preset_and_bad_values_are_refused(tmp_path):
    with pytest.raises(InputError, match="preset"):
        build_sim_config({"preset": "paper"})
    path = tmp_path / "run.yaml"
    path.write_text("queue_model: p99\n")
    with pytest.raises(InputError, match="queue_model"):
        read_config_file(path)


def test_simulate_with_the_preset_and_flags_over_it(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["simulate", "--trace", "static.csv", "--gpus", "4", "--preset", "artifact", "--queue-model", "tail",
            "--quiet", "--no-plot", "--json", "--out", str(out)]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["routing"] == "random"
    assert summary["requests"] == summary["completed"] + summary["dropped"]
    assert cli.main(["simulate", "--tail-quantile", "1", "--quiet", "--out", str(out)]) == 2
    assert "--tail-quantile" in capsys.readouterr().err


def _plan(light: int, heavy: int, deferral: float, gpus: int = 8) -> Plan:
    return Plan(cascade="c", mode="cascade",
                stages=(StagePlan("light", "l", light, 4, 0.24, light * 4 / 0.24),
                        StagePlan("heavy", "h", heavy, 2 if heavy else 0, 2.16 if heavy else 0.0,
                                  heavy * 2 / 2.16 if heavy else 0.0)),
                threshold=0.0 if not deferral else 0.02, light_share=1.0, deferral_fraction=deferral,
                expected_fid=20.0, predicted_latency_s=1.0, demand_qps=20.0, gpus=gpus, feasible=True)


def test_spare_gpus_stay_where_they_are():
    """A plan that stops deferring for a moment keeps the heavy workers of the plan in force idle rather
    than moving them to the light stage (and back at the next plan)."""
    current = _plan(2, 6, 0.2)
    new = _plan(2, 0, 0.0)
    spread = spread_spare_gpus(new, current)
    assert (spread.light.workers, spread.heavy.workers) == (2, 6)
    assert spread.heavy.batch_size == 2  # the idle stage keeps its batch size
    assert (spread_spare_gpus(new).light.workers, spread_spare_gpus(new).heavy.workers) == (8, 0)


def test_serve_takes_the_preset_under_its_flags():
    import argparse

    from diffsim.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    base = ["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15"]
    plain = serve.options_from_args(parser.parse_args(base))
    assert (plain.routing, plain.max_utilization, plain.controller.demand) == ("least-loaded", 0.8, "arrival")
    artifact = serve.options_from_args(parser.parse_args(base + ["--preset", "artifact", "--routing", "least-loaded"]))
    assert (artifact.routing, artifact.max_utilization) == ("least-loaded", 1.0)
    assert (artifact.controller.demand, artifact.controller.headroom) == ("in-system", 1.2)
    assert artifact.admission  # the server's own promise stays
    assert plain.controller.stabilization_s == artifact.controller.stabilization_s == 60.0
    windowless = serve.options_from_args(parser.parse_args(base + ["--preset", "artifact", "--stabilization-s", "0"]))
    assert (windowless.controller.stabilization_s, windowless.controller.headroom) == (0.0, 1.2)

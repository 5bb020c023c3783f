"""SimConfig / ControllerConfig validation and the YAML config file for ``diffsim simulate --config``."""

from __future__ import annotations

from pathlib import Path

import pytest
from sim_helpers import a100_cascade

from diffsim.config import ControllerConfig, SimConfig, build_sim_config, read_config_file
from diffsim.errors import InputError


def test_defaults_match_the_paper_testbed():
    c = ControllerConfig()
    assert (c.tick_s, c.replan_s, c.ewma_alpha, c.headroom, c.ewma_window) == (1.0, 5.0, 1 / 3.1, 1.05, 20)
    s = SimConfig(cascade=a100_cascade())
    assert (s.gpus, s.policy, s.drop_factor, s.swap_s, s.batch_timeout_s) == (16, "diffserve", 1.5, 0.0, 0.0)
    assert s.batch_sizes == (1, 2, 4, 8, 16, 32)
    # Two deliberate departures from the paper (README, "Policy defaults"): least-loaded routing instead of
    # uniform random, and stages planned to 80% of capacity instead of 100%.
    assert (s.routing, s.max_utilization, s.batch_wait) == ("least-loaded", 0.8, 0.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"gpus": 0}, "gpus"), ({"routing": "round-robin"}, "routing"), ({"drop_factor": 0}, "drop_factor"),
     ({"swap_s": -1}, "swap_s"), ({"batch_sizes": (0, 2)}, "batch_sizes"), ({"seed": 1.5}, "seed")],
)
def test_bad_sim_config(kwargs, field):
    with pytest.raises(InputError, match=field):
        SimConfig(cascade=a100_cascade(), **kwargs)


def test_bad_controller_config():
    with pytest.raises(InputError, match="controller.replan_s"):
        ControllerConfig(replan_s=0)
    with pytest.raises(InputError, match="controller.ewma_alpha"):
        ControllerConfig(ewma_alpha=1.5)


def test_config_file_round_trip(tmp_path: Path):
    (tmp_path / "conf.csv").write_text("1,0.5\n")
    path = tmp_path / "run.yaml"
    path.write_text(
        "cascade: sdxs-sdv15\ngpus: 8\npolicy: static\nseed: 3\nrouting: least-loaded\nswap_s: 0.5\n"
        "trace: my.csv\nconfidences: conf.csv\nbatch_sizes: [1, 4]\n"
        "static_plan: {threshold: 0.1, light_workers: 2, heavy_workers: 6, light_batch: 4, heavy_batch: 1}\n"
        "controller: {replan_s: 10, initial_demand_qps: 20}\n"
    )
    settings = read_config_file(path)
    assert settings["trace"] == str(tmp_path / "my.csv")  # relative to the file
    config = build_sim_config(settings)
    assert config.cascade.name == "sdxs-sdv15" and config.gpus == 8 and config.policy == "static"
    assert config.seed == 3 and config.routing == "least-loaded" and config.swap_s == 0.5
    assert config.batch_sizes == (1, 4)
    assert config.confidences_path == tmp_path / "conf.csv"
    assert config.static_plan["light_workers"] == 2 and isinstance(config.static_plan["light_workers"], int)
    assert config.controller.replan_s == 10 and config.controller.initial_demand_qps == 20
    assert config.controller.tick_s == 1.0


def test_a_config_file_sets_every_controller_field(tmp_path: Path):
    """Each ControllerConfig field but ``demand`` (a top-level key) can be given in a config file's
    ``controller`` mapping, and a value out of range is one line naming the file and the field."""
    from dataclasses import fields

    given = {"tick_s": 0.5, "replan_s": 2.0, "ewma_alpha": 0.5, "ewma_window": 7, "headroom": 1.2,
             "initial_demand_qps": 3.0, "stabilization_s": 30.0}
    assert set(given) == {f.name for f in fields(ControllerConfig)} - {"demand"}
    path = tmp_path / "run.yaml"
    path.write_text("controller: {" + ", ".join(f"{k}: {v}" for k, v in given.items()) + "}\n")
    config = build_sim_config(read_config_file(path))
    assert {k: getattr(config.controller, k) for k in given} == given
    path.write_text("controller: {stabilization_s: -1}\n")
    with pytest.raises(InputError, match=r"run.yaml.*controller.stabilization_s"):
        read_config_file(path)


def test_empty_config_file_gives_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    config = build_sim_config(read_config_file(path))
    assert config.cascade.name == "sdturbo-sdv15" and config.gpus == 16


@pytest.mark.parametrize(
    "text, message",
    [
        ("gpus: 0\n", "gpus"),
        ("gpus: many\n", "gpus"),
        ("colour: red\n", "colour"),
        ("routing: round-robin\n", "routing"),
        ("policy: nope\n", "policy"),
        ("controller: {tick_s: -1}\n", "controller.tick_s"),
        ("controller: {speed: 1}\n", "controller.speed"),
        ("- a\n- b\n", "top level"),
        ("gpus: [1\n", "line"),
    ],
)
def test_bad_config_file_names_file_and_field(tmp_path: Path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        read_config_file(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_unknown_cascade_and_missing_file(tmp_path: Path):
    with pytest.raises(InputError, match="no cascade 'nope'"):
        build_sim_config({"cascade": "nope"})
    with pytest.raises(InputError, match="cannot read"):
        read_config_file(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="unknown setting"):
        build_sim_config({"gpus": 4, "colour": "red"})

"""``diffsim simulate`` writes queries.csv as queries end: the same bytes as writing it from every kept
query at the end, and no partial file when a run fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffsim import cli
from diffsim.reports import metrics
from diffsim.workload.traces import Trace, write_trace


@pytest.fixture
def overload_trace(tmp_path) -> Path:
    """Three minutes at 50 qps on 4 GPUs under the static plan: drops, late completions and deferrals."""
    rng = np.random.default_rng(5)
    arrival = np.sort(rng.uniform(0, 180, 9000)).round(6)
    path = tmp_path / "overload.csv"
    write_trace(Trace(arrival_s=arrival, prompt_id=rng.integers(1, 5000, len(arrival))), path)
    return path


def test_streamed_queries_csv_is_what_the_kept_queries_give(tmp_path, overload_trace):
    from diffsim.commands.simulate import load_scenario
    from diffsim.simulator import simulate

    out = tmp_path / "out"
    assert cli.main(["simulate", "--quiet", "--no-plot", "--out", str(out), "--trace", str(overload_trace),
                     "--gpus", "4", "--policy", "static"]) == 0
    config, trace, _ = load_scenario({"trace": str(overload_trace), "gpus": 4, "policy": "static"})
    kept = simulate(config, trace)
    outcomes = {q.outcome for q in kept.queries}
    assert {"completed", "dropped"} <= outcomes and any(q.late for q in kept.queries)
    assert any(q.deferred and q.outcome == "completed" for q in kept.queries)
    metrics.write_csv(tmp_path / "kept.csv", metrics.query_rows(kept.queries), metrics.QUERY_COLUMNS)
    assert (out / metrics.QUERIES_FILE).read_bytes() == (tmp_path / "kept.csv").read_bytes()
    assert not (out / (metrics.QUERIES_FILE + ".part")).exists()


def test_a_failed_run_leaves_no_partial_queries_csv(tmp_path, monkeypatch):
    import diffsim.simulator

    real = diffsim.simulator.simulate

    def failing(config, trace, **kwargs):
        kwargs["on_query"](real(config, trace).queries[0])  # a row was written before the failure
        raise RuntimeError("boom")

    monkeypatch.setattr(diffsim.simulator, "simulate", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["simulate", "--quiet", "--no-plot", "--out", str(out)])
    assert out.is_dir() and list(out.iterdir()) == []

"""Sampled batch times: the log-normal fitted to a profile's percentiles reproduces them, draws are fixed
by the seed, and a simulation with sampled times is deterministic and differs from the p50 one only
where the profile has a spread."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from diffsim.config import SimConfig
from diffsim.profiles import GpuProfile, build_cascade, load_cascades
from diffsim.resources import profiles_dir
from diffsim.runtime.service_time import Z95, Z99, ServiceTimeModel, lognormal_sigma
from diffsim.simulator import simulate
from sim_helpers import a100_cascade
from test_worker_loss import poisson_trace


def spread_cascade(p95_factor=1.5, p99_factor=2.0):
    sizes = [1, 2, 4, 8]

    def table(ms, with_spread=True):
        t = {"batch_sizes": sizes, "p50_ms": ms}
        if with_spread:
            t["p95_ms"] = [round(v * p95_factor, 3) for v in ms]
            t["p99_ms"] = [round(v * p99_factor, 3) for v in ms]
        return t

    profile = GpuProfile.model_validate({
        "gpu": "spread", "provenance": {"source": "test", "gpu": "x", "date": "2024-01-01"},
        "models": {"sd-turbo": table([100, 150, 220, 410]), "sd-v1.5": table([1780, 2160, 3680, 6790])},
        "discriminator": table([20, 20, 20, 20], with_spread=False),
    })
    return build_cascade("sdturbo-sdv15", profile, load_cascades(profiles_dir() / "cascades.yaml"))


def test_sigma_fits_the_percentiles():
    assert lognormal_sigma(100.0, None, None) == 0.0
    assert lognormal_sigma(100.0, 100.0, 100.0) == 0.0  # equal percentiles (the A100 profile): no spread
    s = lognormal_sigma(100.0, 100 * np.exp(0.3 * Z95), 100 * np.exp(0.3 * Z99))
    assert s == pytest.approx(0.3)
    assert lognormal_sigma(100.0, 150.0, None) == pytest.approx(np.log(1.5) / Z95)


def heavy_draws(cascade, *, seed: int, n: int) -> np.ndarray:
    """n sampled times of a heavy batch of 4 (profile p50 3.68 s)."""
    model = ServiceTimeModel(cascade, "sampled", seed=seed)
    return np.array([model.draw("heavy", 4, False) for _ in range(n)])


def assert_percentiles(draws: np.ndarray, *, sigma: float, rel: tuple[float, float, float]) -> None:
    """The draws' p50 / p95 / p99 are a log-normal's around 3.68 s with this sigma, within ``rel``."""
    p50, p95, p99 = np.percentile(draws, [50, 95, 99])
    assert p50 == pytest.approx(3.68, rel=rel[0])
    assert p95 == pytest.approx(3.68 * np.exp(sigma * Z95), rel=rel[1])
    assert p99 == pytest.approx(3.68 * np.exp(sigma * Z99), rel=rel[2])


def test_draws_reproduce_the_profile_percentiles():
    cascade = spread_cascade(p95_factor=np.exp(0.25 * Z95), p99_factor=np.exp(0.25 * Z99))
    draws = heavy_draws(cascade, seed=1, n=40_000)
    assert_percentiles(draws, sigma=0.25, rel=(0.02, 0.03, 0.05))
    again = ServiceTimeModel(cascade, "sampled", seed=1)
    assert [again.draw("heavy", 4, False) for _ in range(5)] == list(draws[:5])
    # and a known value, not only a repeat within this process (the seed fixes the draws on any machine)
    assert list(draws[:3]) == pytest.approx([3.0450671171478976, 2.8552416947468466, 3.852917311421095], rel=1e-12)


def test_p50_mode_and_profiles_without_spread_draw_the_median():
    model = ServiceTimeModel(a100_cascade(), "sampled", seed=0)
    assert model.draw("heavy", 4, False) == pytest.approx(3.68)  # the A100 profile has no spread
    model = ServiceTimeModel(spread_cascade(), "p50", seed=0)
    assert model.draw("light", 2, True) == pytest.approx(0.17)  # 150 ms + the discriminator's 20 ms


def test_sampled_simulation_is_deterministic_and_slower_in_the_tail():
    cascade = spread_cascade()
    trace = poisson_trace(6.0, 120.0, seed=2)
    fixed = simulate(SimConfig(cascade=cascade, gpus=8, seed=3), trace)
    config = SimConfig(cascade=cascade, gpus=8, seed=3, service_time="sampled")
    a, b = simulate(config, trace), simulate(config, trace)
    key = lambda r: [(q.outcome, q.finished_s, q.stages) for q in r.queries]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(fixed)
    completed = [q.latency_s for q in a.queries if q.outcome == "completed"]  # known values for seed 3
    assert len(completed) == 793 and sum(completed) == pytest.approx(1616.96338712415, rel=1e-9)
    lat = lambda r: np.percentile([q.latency_s for q in r.queries if q.outcome == "completed"], 99)  # noqa: E731
    assert lat(a) > lat(fixed)


def test_sampling_leaves_the_router_s_choices_alone_without_spread():
    trace = poisson_trace(6.0, 60.0, seed=4)
    base = SimConfig(cascade=a100_cascade(), gpus=8, seed=5, routing="random")
    p50 = simulate(base, trace)
    sampled = simulate(replace(base, service_time="sampled"), trace)
    # no spread in the A100 profile: the same times, and the draws of times use a stream of their own
    assert [(q.outcome, q.finished_s) for q in p50.queries] == [(q.outcome, q.finished_s) for q in sampled.queries]


def test_profile_overheads_reach_the_simulated_latency():
    """request_ms is added to every completed query's latency; cold_start_s to each worker's first batch."""
    from diffsim.profiles import Overheads

    base = a100_cascade()
    trace = poisson_trace(2.0, 30.0, seed=6)
    plain = simulate(SimConfig(cascade=base, gpus=4, seed=0), trace)
    slow = replace(base, overheads=Overheads(request_ms=50.0))
    with_http = simulate(SimConfig(cascade=slow, gpus=4, seed=0), trace)
    for a, b in zip(plain.queries, with_http.queries):
        assert b.outcome == a.outcome == "completed"
        assert b.latency_s == pytest.approx(a.latency_s + 0.05)
    cold = replace(base, overheads=Overheads(cold_start_s=2.0))
    started = []
    simulate(SimConfig(cascade=cold, gpus=4, seed=0), trace, on_batch=started.append)
    firsts = {}
    for b in started:
        firsts.setdefault(b.worker, b)
    result = simulate(SimConfig(cascade=cold, gpus=4, seed=0), trace)
    first_query = min(firsts.values(), key=lambda b: b.start_s).queries[0]
    assert result.queries[first_query.id].service_s >= 2.0  # the first batch paid the cold start


def overhead_cascade(request_ms=35.0, sigma=0.8, **kw):
    from diffsim.profiles import Overheads

    spread = {} if sigma is None else {"request_p95_ms": request_ms * float(np.exp(sigma * Z95)),
                                       "request_p99_ms": request_ms * float(np.exp(sigma * Z99))}
    return replace(spread_cascade(), overheads=Overheads(request_ms=request_ms, **spread, **kw))


def test_request_overhead_draws_reproduce_the_measured_percentiles():
    from diffsim.runtime.service_time import request_overhead

    draw = request_overhead(overhead_cascade(35.0, 0.8), "sampled", seed=3)
    draws = np.array([draw() for _ in range(60_000)])
    p50, p95, p99 = np.percentile(draws, [50, 95, 99])
    assert p50 == pytest.approx(0.035, rel=0.03)
    assert p95 == pytest.approx(0.035 * np.exp(0.8 * Z95), rel=0.04)
    assert p99 == pytest.approx(0.035 * np.exp(0.8 * Z99), rel=0.07)
    assert draws.max() == pytest.approx(0.035 * np.exp(0.8 * 3.090232306167813))  # capped at the fitted p99.9
    again = request_overhead(overhead_cascade(35.0, 0.8), "sampled", seed=3)
    assert [again() for _ in range(5000)] == list(draws[:5000])  # across a block boundary (4096)
    other = request_overhead(overhead_cascade(35.0, 0.8), "sampled", seed=4)
    assert [other() for _ in range(5)] != list(draws[:5])


def test_request_overhead_is_the_median_in_p50_mode_or_without_spread():
    from diffsim.runtime.service_time import request_overhead

    assert request_overhead(overhead_cascade(35.0, 0.8), "p50", seed=3) == pytest.approx(0.035)
    assert request_overhead(overhead_cascade(35.0, None), "sampled", seed=3) == pytest.approx(0.035)
    assert request_overhead(a100_cascade(), "sampled", seed=3) == 0.0  # no overheads in the profile
    with pytest.raises(Exception, match="unknown service-time mode"):
        request_overhead(a100_cascade(), "p99")


def test_a_sampled_overhead_changes_only_the_answer_times():
    """The overhead's draws have a stream of their own: the router's choices and the batch-time draws (and
    so every query's batches, queueing and outcome) are those of the run with a constant overhead; only the
    completed queries' finish times move, by the drawn overhead in place of the median."""
    trace = poisson_trace(6.0, 120.0, seed=7)
    constant = simulate(SimConfig(cascade=overhead_cascade(35.0, None), gpus=8, seed=3, service_time="sampled",
                                  routing="random"), trace)
    sampled = simulate(SimConfig(cascade=overhead_cascade(35.0, 0.8), gpus=8, seed=3, service_time="sampled",
                                 routing="random"), trace)
    same = lambda r: [(q.outcome, q.stages, q.batch_sizes, q.queue_s, q.service_s) for q in r.queries]  # noqa: E731
    assert same(constant) == same(sampled)
    gaps = np.array([b.finished_s - a.finished_s + 0.035 for a, b in zip(constant.queries, sampled.queries)
                     if a.outcome == "completed"])
    assert len(gaps) > 500 and (gaps > 0).all() and len(set(gaps.round(9))) > 100  # one draw per query
    assert np.median(gaps) == pytest.approx(0.035, rel=0.15)


def test_p50_mode_ignores_the_overhead_spread():
    trace = poisson_trace(6.0, 60.0, seed=8)
    a = simulate(SimConfig(cascade=overhead_cascade(35.0, None), gpus=8, seed=1), trace)
    b = simulate(SimConfig(cascade=overhead_cascade(35.0, 0.8), gpus=8, seed=1), trace)
    assert [(q.outcome, q.finished_s) for q in a.queries] == [(q.outcome, q.finished_s) for q in b.queries]


def test_correlated_batch_times_keep_the_percentiles_and_come_in_spells():
    """With the profile's batch_time_correlation, each draw is still log-normal with the profile's p50 / p95
    / p99, but consecutive draws are correlated share x rho (slow batches come in runs); without it the
    draws are those of independent sampling, unchanged."""
    from diffsim.profiles import BatchTimeCorrelation

    plain = spread_cascade(p95_factor=np.exp(0.25 * Z95), p99_factor=np.exp(0.25 * Z99))
    cascade = replace(plain, batch_time_correlation=BatchTimeCorrelation(share=0.7, rho=0.9))
    draws = heavy_draws(cascade, seed=2, n=200_000)
    assert_percentiles(draws, sigma=0.25, rel=(0.03, 0.04, 0.06))
    z = np.log(draws / 3.68)
    assert np.corrcoef(z[:-1], z[1:])[0, 1] == pytest.approx(0.7 * 0.9, abs=0.02)
    assert np.corrcoef(z[:-10], z[10:])[0, 1] == pytest.approx(0.7 * 0.9 ** 10, abs=0.03)
    again = ServiceTimeModel(cascade, "sampled", seed=2)
    assert [again.draw("heavy", 4, False) for _ in range(5)] == list(draws[:5])
    independent = ServiceTimeModel(plain, "sampled", seed=2)
    z0 = np.log(np.array([independent.draw("heavy", 4, False) for _ in range(20_000)]) / 3.68)
    assert abs(np.corrcoef(z0[:-1], z0[1:])[0, 1]) < 0.03
    p50_mode = ServiceTimeModel(cascade, "p50", seed=2)
    assert p50_mode.draw("heavy", 4, False) == pytest.approx(3.68)  # p50 mode draws nothing


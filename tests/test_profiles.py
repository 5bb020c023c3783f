"""Profile loading: the shipped files load; malformed files give one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffsim.errors import InputError
from diffsim.profiles import LatencyTable, load_cascade, load_cascades, load_gpu_profile

PROFILES = Path(__file__).resolve().parent.parent / "profiles"


@pytest.mark.parametrize("name", ["a100", "h100-eager", "h100-graph"])
@pytest.mark.parametrize("cascade", ["sdturbo-sdv15", "sdxs-sdv15", "sdxlltn-sdxl"])
def test_shipped_profiles_load(name, cascade):
    c = load_cascade(cascade, PROFILES / f"{name}.yaml", PROFILES / "cascades.yaml")
    assert c.slo_s in (5, 15)
    assert c.light.latency_ms(1) > 0 and c.heavy.latency_ms(1) > 0


def test_a100_figures_match_the_artifact():
    p = load_gpu_profile(PROFILES / "a100.yaml")
    assert p.models["sd-v1.5"].latency_ms(4) == 3680
    assert p.models["sdxl"].latency_ms(32) is None  # does not fit
    assert p.discriminator.latency_ms(8) == 20
    assert "2411.15381" in p.provenance.source


def test_slos():
    cascades = load_cascades(PROFILES / "cascades.yaml").cascades
    assert {k: v.slo_s for k, v in cascades.items()} == {"sdturbo-sdv15": 5, "sdxs-sdv15": 5, "sdxlltn-sdxl": 15}


def test_overhead_percentiles_load_in_order(tmp_path):
    data = _good_gpu()
    data["overheads"] = {"request_ms": 30, "request_p95_ms": 30.0, "request_p99_ms": 400.5, "cold_start_s": 1.0}
    o = load_gpu_profile(_write(tmp_path, data)).overheads
    assert (o.request_ms, o.request_p95_ms, o.request_p99_ms, o.cold_start_s) == (30, 30.0, 400.5, 1.0)
    assert load_gpu_profile(PROFILES / "a100.yaml").overheads.request_p99_ms is None  # not measured


def test_interpolation_rule():
    t = LatencyTable(batch_sizes=[1, 4, 8, 16], p50_ms=[100, 220, 410, None], p99_ms=[110, 250, 450, None])
    assert t.latency_ms(1) == 100
    assert t.latency_ms(2) == pytest.approx(140)  # linear between 1 and 4
    assert t.latency_ms(6) == pytest.approx(315)
    assert t.latency_ms(12) is None  # next to a null: does not fit
    assert t.latency_ms(32) is None  # never extrapolated
    assert t.latency_ms(4, "p99") == 250
    assert t.latency_ms(4, "p95") == 220  # not measured: falls back to p50
    assert t.max_batch_size() == 8


def test_deferral_inverse_is_the_quantile():
    c = load_cascade("sdturbo-sdv15", PROFILES / "a100.yaml", PROFILES / "cascades.yaml")
    for u in (0.1, 0.26, 0.5, 0.9):
        t = c.deferral.inverse(u)
        assert c.deferral(t) >= u - 1e-9
        assert c.deferral(max(0.0, t - 1e-6)) <= u + 1e-6


def _write(tmp_path, data, name="p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _good_gpu():
    return yaml.safe_load((PROFILES / "a100.yaml").read_text())


def _good_cascades():
    return yaml.safe_load((PROFILES / "cascades.yaml").read_text())


def _bad(mutate, base):
    data = base()
    mutate(data)
    return data


GPU_CASES = [
    (lambda d: d["models"]["sdxs"].update(p50_ms=[1, 2]), "models.sdxs", "values but batch_sizes has"),
    (lambda d: d["models"]["sdxs"].update(batch_sizes=[1, 4, 2, 8, 16, 32]), "models.sdxs.batch_sizes", "increasing"),
    (lambda d: d["models"]["sdxs"].update(p50_ms=[-1, 2, 3, 4, 5, 6]), "models.sdxs", "positive"),
    (lambda d: d["models"]["sdxs"].update(p50_ms=["x", 2, 3, 4, 5, 6]), "models.sdxs.p50_ms.0", ""),
    (lambda d: d.pop("provenance"), "provenance", "missing"),
    (lambda d: d["provenance"].pop("source"), "provenance.source", "missing"),
    (lambda d: d.update(colour="blue"), "colour", "not permitted"),
    (lambda d: d.pop("discriminator"), "discriminator", "missing"),
    (lambda d: d.update(overheads={"request_ms": 30.0, "request_p95_ms": 20.0}), "overheads.request_p95_ms",
     "at least request_ms"),
    (lambda d: d.update(overheads={"request_ms": 30.0, "request_p95_ms": 50.0, "request_p99_ms": 40.0}),
     "overheads.request_p99_ms", "at least request_p95_ms"),
    (lambda d: d.update(overheads={"request_ms": 30.0, "request_p99_ms": 29.0}), "overheads.request_p99_ms",
     "at least request_ms"),
    (lambda d: d.update(overheads={"request_p95_ms": -1.0}), "overheads.request_p95_ms", "greater than or equal"),
    (lambda d: d.update(batch_time_correlation={"share": 1.5, "rho": 0.5}), "batch_time_correlation.share",
     "less than or equal"),
    (lambda d: d.update(batch_time_correlation={"share": 0.5, "rho": 1.0}), "batch_time_correlation.rho",
     "less than or equal"),
]


@pytest.mark.parametrize("mutate,field,words", GPU_CASES)
def test_malformed_gpu_profile(tmp_path, mutate, field, words):
    path = _write(tmp_path, _bad(mutate, _good_gpu))
    with pytest.raises(InputError) as e:
        load_gpu_profile(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}")
    assert words.lower() in msg.lower()


CASCADE_CASES = [
    (lambda d: d["cascades"]["sdxs-sdv15"]["deferral_curve"].update(f=[0.5] + [0.1] * 200), "deferral_curve",
     "non-decreasing"),
    (lambda d: d["cascades"]["sdxs-sdv15"]["deferral_curve"].update(t=[0, 1]), "deferral_curve", "values"),
    (lambda d: d["cascades"]["sdxs-sdv15"]["fid"].update(r=[0.1, 0.5, 0.9], fid=[1, 2, 3]), "fid", "from 0 to 1"),
    (lambda d: d["cascades"]["sdxs-sdv15"].update(slo_s=0), "cascades.sdxs-sdv15.slo_s", "greater than 0"),
    (lambda d: d["cascades"]["sdxs-sdv15"].pop("heavy"), "cascades.sdxs-sdv15.heavy", "missing"),
]


@pytest.mark.parametrize("mutate,field,words", CASCADE_CASES)
def test_malformed_cascades(tmp_path, mutate, field, words):
    path = _write(tmp_path, _bad(mutate, _good_cascades))
    with pytest.raises(InputError) as e:
        load_cascades(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and field in msg and words in msg


def test_not_yaml_names_line(tmp_path):
    path = _write(tmp_path, "gpu: a100\nmodels: [1, 2\n")
    with pytest.raises(InputError, match=r"p\.yaml: line \d+"):
        load_gpu_profile(path)


def test_not_a_mapping(tmp_path):
    path = _write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_gpu_profile(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_gpu_profile(tmp_path / "nope.yaml")


def test_cascade_model_missing_from_gpu_profile(tmp_path):
    data = _good_gpu()
    del data["models"]["sd-v1.5"]
    path = _write(tmp_path, data)
    with pytest.raises(InputError, match=r"models: no latency for 'sd-v1.5'"):
        load_cascade("sdturbo-sdv15", path, PROFILES / "cascades.yaml")


def test_unknown_cascade():
    with pytest.raises(InputError, match="no cascade 'x'"):
        load_cascade("x", PROFILES / "a100.yaml", PROFILES / "cascades.yaml")

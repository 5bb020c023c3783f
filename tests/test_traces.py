"""Traces: both file formats, every malformed case, the seeded generators, the `diffsim trace` commands,
and the shipped traces (re-generated from the commands recorded in traces/README.md)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffsim.cli import main
from diffsim.errors import DiffsimError, InputError
from diffsim.resources import traces_dir
from diffsim.workload.trace_generators import (
    builtin_shape,
    diurnal_shape,
    gamma_trace,
    poisson_trace,
    read_rates,
    scale_rates,
    shape_trace,
)
from diffsim.workload.traces import (
    DIFFSIM_MARKER,
    Trace,
    format_trace,
    parse_trace,
    read_trace,
    sorted_trace,
    window_counts,
    write_trace,
)


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def same(a: Trace, b: Trace) -> bool:
    return (
        np.array_equal(a.arrival_s, b.arrival_s)
        and np.array_equal(a.prompt_id, b.prompt_id)
        and a.prompt == b.prompt
        and ((a.seed is None and b.seed is None) or np.array_equal(a.seed, b.seed))
    )


# ------------------------------------------------------------------------------------------------ reading


def test_artifact_format_unsorted_rows_are_sorted_stably(tmp_path):
    text = "# from the artifact\n1500,7\n\n250.5,3\r\n  # indented comment\n1500,2\n0,9\n"
    trace = read_trace(write(tmp_path, text))
    assert trace.arrival_s.tolist() == [0.0, 0.2505, 1.5, 1.5]
    assert trace.prompt_id.tolist() == [9, 3, 7, 2]  # the two 1500 ms rows keep their file order
    assert trace.prompt is None and trace.seed is None
    assert trace.arrival_s.dtype == np.float64 and trace.prompt_id.dtype == np.int64
    assert len(trace) == 4 and trace.duration_s == 1.5
    assert trace.source.endswith("t.csv")


def test_diffsim_format_with_prompts_and_seeds(tmp_path):
    text = (
        f"{DIFFSIM_MARKER}\n"
        "# a comment\n"
        "arrival_s,prompt_id,prompt,seed\n"
        '2.5,11,"a bus, parked by a ""stop"" sign",3\n'
        '0.25,12,"two lines\n# not a comment: inside quotes",4\n'
        "\n"
        "1.0,13,,5\n"
    )
    trace = read_trace(write(tmp_path, text))
    assert trace.arrival_s.tolist() == [0.25, 1.0, 2.5]
    assert trace.prompt_id.tolist() == [12, 13, 11]
    assert trace.prompt == ("two lines\n# not a comment: inside quotes", "", 'a bus, parked by a "stop" sign')
    assert trace.seed.tolist() == [4, 5, 3]


def test_diffsim_format_without_marker_and_columns_in_other_order():
    trace = parse_trace("arrival_s,prompt_id,seed,prompt\n3,1,9,cat\n1,2,8,dog\n", "x.csv")
    assert trace.prompt == ("dog", "cat") and trace.seed.tolist() == [8, 9]
    assert parse_trace("arrival_s,prompt_id\n0.5,1\n").prompt is None


MALFORMED = [
    # (file text, line number in the message, fragment of the message)
    ("", 1, "the file is empty"),
    ("# only a comment\n\n", 2, "only comments and blank lines"),
    ("10,1\n20,x\n", 2, "prompt_id 'x' is not an integer"),
    ("10,1\nabc,2\n", 2, "arrival_ms 'abc' is not a number"),
    ("10,1\n# c\n-5,2\n", 3, "arrival_ms -5 is negative"),
    ("10,1\n20,-3\n", 2, "prompt_id -3 is negative"),
    ("10,1\n20,2.5\n", 2, "prompt_id '2.5' is not an integer"),
    ("10,1\ninf,2\n", 2, "not a finite number"),
    ("10,1\n20,2,3\n", 2, "expected 2 fields"),
    ("10,1\n\n20\n", 3, "expected 2 fields"),
    ("10,1\n20,99999999999999999999\n", 2, "too large"),
    ("arrival_s,prompt_id,colour\n1,2,red\n", 1, "unknown header column 'colour'"),
    ("arrival_ms,prompt_id\n1,2\n", 1, "an artifact trace has no header"),
    ("arrival_s,prompt\n1,cat\n", 1, "lacks the required column 'prompt_id'"),
    ("prompt_id,arrival_s\n1,2\n", 1, "must start with arrival_s,prompt_id"),
    ("arrival_s,prompt_id,prompt,prompt\n1,2,a,b\n", 1, "appears twice"),
    ("# c\narrival_s,prompt_id\n", 2, "no requests after the header"),
    ("arrival_s,prompt_id,prompt\n1,2,a\n2,3\n", 3, "expected 3 fields"),
    ("arrival_s,prompt_id\n1,2\n-0.5,3\n", 3, "arrival_s -0.5 is negative"),
    ("arrival_s,prompt_id,seed\n1,2,-1\n", 2, "seed -1 is negative"),
    ("arrival_s,prompt_id,prompt\n1,2,a\n2,3,\"open quote\nnever closed\n", 3, "bad CSV quoting"),
    ('arrival_s,prompt_id,prompt\n1,2,"a"b\n', 2, "bad CSV quoting"),
    (f"{DIFFSIM_MARKER}\n1,2\n", 2, "expected the header line"),
    ("# diffsim-trace v9\narrival_s,prompt_id\n1,2\n", 1, "unsupported format marker"),
    ("arrival_s,prompt_id\n0.5,1\n1e300,2\n", 3, "arrival_s 1e300 is beyond 10,000,000 s"),
    ("0.5,1\n1e11,2\n", 2, "arrival_ms 1e11 is beyond 10,000,000 s"),
]


@pytest.mark.parametrize("text,line,fragment", MALFORMED)
def test_malformed_trace_names_file_and_line(tmp_path, text, line, fragment):
    path = write(tmp_path, text, "bad.csv")
    with pytest.raises(InputError) as err:
        read_trace(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line {line}: "), message
    assert fragment in message
    assert "\n" not in message


def test_missing_directory_and_binary_files(tmp_path):
    with pytest.raises(InputError, match="no such trace file"):
        read_trace(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="is a directory"):
        read_trace(tmp_path)
    (tmp_path / "bin.csv").write_bytes(b"10,1\n20,2\n\xff\xfe,3\n")
    with pytest.raises(InputError, match=r"bin.csv: line 3: not UTF-8"):
        read_trace(tmp_path / "bin.csv")


# ------------------------------------------------------------------------------------------------ writing


def test_diffsim_round_trip_is_exact(tmp_path):
    trace = Trace(
        arrival_s=np.array([0.0, 1 / 3, 1 / 3, 2.000000000000001, 1e-9, 12345.678901234567])[[0, 4, 1, 2, 3, 5]],
        prompt_id=np.array([0, 5, 6, 4999, 2**62, 7]),
        prompt=("plain", 'quote " and, comma', "line\nbreak\r\nand cr", "", "# hash first", "ünïcödé ✓"),
        seed=np.array([1, 2, 3, 4, 5, 2**63 - 1]),
    )
    path = tmp_path / "rt.csv"
    write_trace(trace, path)
    back = read_trace(path)
    assert same(trace, back)
    assert path.read_text(encoding="utf-8").startswith(DIFFSIM_MARKER + "\narrival_s,prompt_id,prompt,seed\n")
    write_trace(back, tmp_path / "rt2.csv")
    assert (tmp_path / "rt2.csv").read_bytes() == path.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=1e7, allow_nan=False, allow_infinity=False),
            st.integers(min_value=0, max_value=2**63 - 1),
            st.text(max_size=20),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_round_trip_property(rows):
    times, ids, prompts = zip(*rows)
    trace = sorted_trace(times, ids, prompt=prompts)
    assert same(parse_trace(format_trace(trace), "p.csv"), trace)


def test_artifact_writer(tmp_path):
    trace = poisson_trace(5, 20, seed=3)
    path = tmp_path / "a.csv"
    write_trace(trace, path, fmt="artifact")
    first = path.read_text().splitlines()[0]
    assert re.fullmatch(r"\d+\.\d{3},\d+", first)
    back = read_trace(path)
    np.testing.assert_allclose(back.arrival_s, trace.arrival_s, rtol=0, atol=1e-9)
    assert np.array_equal(back.prompt_id, trace.prompt_id)


def test_artifact_milliseconds_become_the_nearest_seconds(tmp_path):
    # 304.706 / 1000 is 0.30470600000000003 in floating point; the reader moves the decimal point instead
    path = write(tmp_path, "304.706,4706\n1e3,3\n0.001,2\n", "a.csv")
    trace = read_trace(path)
    assert trace.arrival_s.tolist() == [0.000001, 0.304706, 1.0]
    out = tmp_path / "b.csv"
    write_trace(trace, out)
    assert out.read_text().splitlines()[2:] == ["1e-06,2", "0.304706,4706", "1.0,3"]


def test_artifact_writer_refuses_to_drop_prompts_silently(tmp_path):
    trace = sorted_trace([0.5], [1], prompt=["a cat"])
    with pytest.raises(DiffsimError, match="--drop-prompts"):
        write_trace(trace, tmp_path / "a.csv", fmt="artifact")
    write_trace(trace, tmp_path / "a.csv", fmt="artifact", drop_extra=True)
    assert (tmp_path / "a.csv").read_text() == "500.000,1\n"


def test_writer_refuses_empty_trace_and_unknown_format(tmp_path):
    with pytest.raises(DiffsimError, match="empty"):
        write_trace(Trace(np.zeros(0), np.zeros(0)), tmp_path / "e.csv")
    with pytest.raises(DiffsimError, match="unknown trace format"):
        write_trace(poisson_trace(5, 5, seed=0), tmp_path / "e.csv", fmt="json")


def test_trace_checks_its_arrays():
    with pytest.raises(ValueError, match="sorted"):
        Trace(np.array([1.0, 0.5]), np.array([1, 2]))
    with pytest.raises(ValueError, match="prompt ids"):
        Trace(np.array([1.0]), np.array([1, 2]))
    with pytest.raises(ValueError, match=">= 0"):
        Trace(np.array([-1.0]), np.array([1]))
    trace = Trace([0.0, 1.0], [1, 2])
    with pytest.raises(ValueError):
        trace.arrival_s[0] = 5.0  # read-only
    assert len(Trace(np.zeros(0), np.zeros(0))) == 0 and Trace(np.zeros(0), np.zeros(0)).duration_s == 0.0


def test_window_counts():
    trace = Trace([0.0, 0.5, 0.99, 1.0, 3.2], [1, 1, 1, 1, 1])
    assert window_counts(trace, 1.0).tolist() == [3, 1, 0, 1]
    assert window_counts(trace, 10.0).tolist() == [5]


# --------------------------------------------------------------------------------------------- generators


def test_poisson_mean_rate_and_gaps():
    trace = poisson_trace(20, 2000, seed=7)
    assert abs(len(trace) / 2000 - 20) < 20 * 0.03  # 40,000 expected; sd 200
    gaps = np.diff(trace.arrival_s)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.03
    assert trace.arrival_s[-1] < 2000
    assert same(trace, gamma_trace(20, 1.0, 2000, seed=7))  # cv = 1 is Poisson


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_rate_and_cv(cv):
    trace = gamma_trace(10, cv, 5000, seed=11)
    gaps = np.diff(trace.arrival_s)
    assert abs(len(trace) / 5000 - 10) < 10 * 0.1
    assert abs(gaps.std() / gaps.mean() - cv) < 0.1 * cv


def test_gamma_cv_zero_is_evenly_spaced():
    trace = gamma_trace(4, 0, 10, seed=0)
    np.testing.assert_allclose(np.diff(trace.arrival_s), 0.25, atol=2e-6)
    assert len(trace) == 39  # 0.25, 0.5, ..., 9.75


def test_scale_rates():
    scaled = scale_rates([3.0, 1.0, 2.0, 5.0], 10, 30)
    assert scaled.tolist() == [20.0, 10.0, 15.0, 30.0]
    assert scale_rates([4.0, 4.0], 10, 30).tolist() == [30.0, 30.0]
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(DiffsimError):
            scale_rates(bad, 1, 2)
    with pytest.raises(DiffsimError, match="lo <= hi"):
        scale_rates([1, 2], 5, 2)


def test_shape_trace_tracks_the_scaled_curve():
    curve = np.array([1, 4, 9, 16, 25, 16, 9, 4, 1, 0], dtype=float)
    lo, hi, interval = 5.0, 50.0, 200.0
    trace = shape_trace(curve, lo, hi, interval_s=interval, seed=2)
    expected = scale_rates(curve, lo, hi)
    measured = window_counts(trace, interval) / interval
    assert len(measured) == len(curve)
    # each interval's rate within 5 standard deviations of a Poisson count
    assert np.all(np.abs(measured - expected) < 5 * np.sqrt(expected / interval))
    assert abs(measured.min() - lo) < 1.0 and abs(measured.max() - hi) < 2.0
    assert np.argmax(measured) == np.argmax(curve) and np.argmin(measured) == np.argmin(curve)
    assert trace.arrival_s[-1] < len(curve) * interval


def test_diurnal_has_one_smooth_peak():
    curve = diurnal_shape(360)
    # 15:00 and 03:00 fall between two samples (224|225 and 44|45), which are equal by symmetry
    peaks = [i for i in range(360) if curve[i] >= curve[i - 1] and curve[i] > curve[(i + 1) % 360]]
    assert len(peaks) == 1 and peaks[0] in (224, 225)
    assert np.argmin(curve) in (44, 45)
    assert np.max(np.abs(np.diff(curve))) < 0.05 * (curve.max() - curve.min())
    assert 0.3 < scale_rates(curve, 0, 1).mean() < 0.37
    assert builtin_shape("ramp", 5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert builtin_shape("step", 4).tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(DiffsimError, match="unknown built-in shape"):
        builtin_shape("weekly", 10)


def test_same_seed_same_trace_other_seed_other_trace():
    for make in (
        lambda s: poisson_trace(10, 30, seed=s),
        lambda s: gamma_trace(10, 2.5, 30, seed=s),
        lambda s: shape_trace(diurnal_shape(30), 2, 20, seed=s),
    ):
        assert same(make(4), make(4))
        assert format_trace(make(4)) == format_trace(make(4))
        assert not np.array_equal(make(4).arrival_s, make(5).arrival_s)
        assert not np.array_equal(make(4).prompt_id, make(5).prompt_id)


def test_prompt_id_range_does_not_move_arrivals():
    a = poisson_trace(10, 30, seed=1, prompt_ids=(1, 4999))
    b = poisson_trace(10, 30, seed=1, prompt_ids=(100, 100))
    assert np.array_equal(a.arrival_s, b.arrival_s) and set(b.prompt_id.tolist()) == {100}
    with pytest.raises(DiffsimError, match="prompt_ids"):
        poisson_trace(10, 30, seed=1, prompt_ids=(5, 2))
    with pytest.raises(DiffsimError, match="rate_qps"):
        poisson_trace(0, 30, seed=1)
    with pytest.raises(DiffsimError, match="cv"):
        gamma_trace(1, -1, 30, seed=1)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["poisson", "gamma", "shape"]),
    rate=st.floats(min_value=0.05, max_value=50),
    cv=st.floats(min_value=0, max_value=5),
    duration=st.floats(min_value=0.1, max_value=60),
    curve=st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=30),
    first=st.integers(min_value=0, max_value=10_000),
    span=st.integers(min_value=0, max_value=10_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_generated_traces_are_well_formed(kind, rate, cv, duration, curve, first, span, seed):
    ids = (first, first + span)
    if kind == "poisson":
        trace, end = poisson_trace(rate, duration, seed=seed, prompt_ids=ids), duration
    elif kind == "gamma":
        trace, end = gamma_trace(rate, cv, duration, seed=seed, prompt_ids=ids), duration
    else:
        trace, end = shape_trace(curve, rate / 2, rate, interval_s=0.5, seed=seed, prompt_ids=ids), len(curve) * 0.5
    t = trace.arrival_s
    assert np.all(np.diff(t) >= 0) and np.all(t >= 0) and np.all(t < end)
    assert np.all(trace.prompt_id >= ids[0]) and np.all(trace.prompt_id <= ids[1])
    if len(trace):
        assert same(parse_trace(format_trace(trace)), trace)


# ------------------------------------------------------------------------------------------------- rates


def test_read_rates_formats(tmp_path):
    assert read_rates(write(tmp_path, "# hourly\n3\n\n1.5\n0\n")).tolist() == [3.0, 1.5, 0.0]
    csv_text = "hour,invocations,other\n0,120,x\n1,80.5,y\n"
    assert read_rates(write(tmp_path, csv_text), column="invocations").tolist() == [120.0, 80.5]
    assert read_rates(write(tmp_path, "1,10\n2,20\n"), column="2").tolist() == [10.0, 20.0]


@pytest.mark.parametrize(
    "text,column,line,fragment",
    [
        ("1\n2\nx\n", None, 3, "rate 'x' is not a number"),
        ("1\n-2\n", None, 2, "finite number >= 0"),
        ("1,2\n3,4\n", None, 1, "has 2 columns"),
        ("a,b\n1,2\n", "c", 1, "no column 'c'"),
        ("a,b\n1,2\n3\n", "b", 3, "expected 2 fields"),
        ("# nothing\n", None, 1, "no rates"),
    ],
)
def test_read_rates_errors(tmp_path, text, column, line, fragment):
    path = write(tmp_path, text, "rates.txt")
    with pytest.raises(InputError) as err:
        read_rates(path, column=column)
    assert str(err.value).startswith(f"{path}: line {line}: ") and fragment in str(err.value)


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_generators_and_info(tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["trace", "poisson", "--rate", "8", "--duration", "30", "--seed", "3", "--out", str(out)]) == 0
    assert same(read_trace(out), poisson_trace(8, 30, seed=3))
    assert "wrote" in capsys.readouterr().out

    out = tmp_path / "g.csv"
    args = ["trace", "gamma", "--rate", "8", "--cv", "2", "--duration", "30", "--seed", "3"]
    assert main([*args, "--prompt-ids", "10", "20", "--format", "artifact", "--out", str(out)]) == 0
    assert np.array_equal(read_trace(out).prompt_id, gamma_trace(8, 2, 30, seed=3, prompt_ids=(10, 20)).prompt_id)

    out = tmp_path / "s.csv"
    args = ["trace", "shape", "--builtin", "diurnal", "--lo", "2", "--hi", "9", "--intervals", "60", "--seed", "1"]
    assert main([*args, "--interval-s", "2", "--out", str(out)]) == 0
    assert same(read_trace(out), shape_trace(diurnal_shape(60), 2, 9, interval_s=2, seed=1))
    capsys.readouterr()

    assert main(["trace", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    trace = read_trace(out)
    assert info["requests"] == len(trace) and info["duration_s"] == pytest.approx(trace.duration_s)
    assert info["prompt_id_min"] == trace.prompt_id.min() and info["prompt_id_max"] == trace.prompt_id.max()
    assert info["windows_1s"]["peak_qps"] == window_counts(trace, 1).max()
    assert info["windows_10s"]["peak_qps"] == pytest.approx(window_counts(trace, 10).max() / 10)
    assert main(["trace", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"requests     {len(trace)}" in text and "10 s windows" in text


def test_cli_shape_from_rate_file(tmp_path, capsys):
    rates = write(tmp_path, "hour,count\n" + "".join(f"{h},{(h % 24) ** 2}\n" for h in range(48)), "az.csv")
    out = tmp_path / "o.csv"
    args = ["trace", "shape", "--rates", str(rates), "--column", "count", "--lo", "1", "--hi", "20"]
    assert main([*args, "--start", "24", "--intervals", "12", "--seed", "5", "--out", str(out)]) == 0
    expected = shape_trace(np.arange(12) ** 2, 1, 20, seed=5)
    assert same(read_trace(out), expected)
    assert main([*args, "--start", "40", "--intervals", "12", "--out", str(out)]) == 2
    assert "has 48 intervals" in capsys.readouterr().err


def test_cli_convert(tmp_path, capsys):
    src = write(tmp_path, "300,2\n100,1\n", "art.csv")
    mine = tmp_path / "mine.csv"
    assert main(["trace", "convert", str(src), "--out", str(mine)]) == 0
    assert mine.read_text() == f"{DIFFSIM_MARKER}\narrival_s,prompt_id\n0.1,1\n0.3,2\n"
    back = tmp_path / "back.csv"
    assert main(["trace", "convert", str(mine), "--out", str(back), "--format", "artifact"]) == 0
    assert back.read_text() == "100.000,1\n300.000,2\n"
    with_prompts = write(tmp_path, "arrival_s,prompt_id,prompt\n1,2,cat\n", "p.csv")
    capsys.readouterr()
    assert main(["trace", "convert", str(with_prompts), "--out", str(back), "--format", "artifact"]) == 2
    assert "--drop-prompts" in capsys.readouterr().err


def test_cli_malformed_file_exits_2_with_one_line(tmp_path, capsys):
    bad = write(tmp_path, "10,1\n20,2\noops,3\n", "bad.csv")
    assert main(["trace", "info", str(bad)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err == f"diffsim trace: error: {bad}: line 3: arrival_ms 'oops' is not a number"
    assert "\n" not in err and "Traceback" not in captured.err
    assert main(["trace", "convert", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "no such trace file" in capsys.readouterr().err


def test_cli_rejects_bad_flags(tmp_path, capsys):
    # argparse's refusals come back as exit 2 and one line naming the flag, like every other error
    assert main(["trace", "poisson", "--rate", "-1", "--duration", "5", "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffsim trace poisson: error: --rate: must be a number > 0") and err.count("\n") == 1
    assert main(["trace", "shape", "--builtin", "diurnal", "--rates", "f", "--lo", "1", "--hi", "2", "--out", "x"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["trace"]) == 2
    assert "required: ACTION" in capsys.readouterr().err
    assert main(["trace", "shape", "--builtin", "diurnal", "--lo", "5", "--hi", "2", "--out", "x"]) == 2
    # A generated trace is bounded: rate x duration at most MAX_TRACE_REQUESTS, nothing allocated before
    assert main(["trace", "poisson", "--rate", "1e7", "--duration", "1e7", "--out", str(tmp_path / "x.csv")]) == 2
    assert "more than the 10,000,000 a trace may hold" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


# --------------------------------------------------------------------------------------------- shipped


def _readme_commands() -> list[str]:
    readme = (traces_dir() / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("diffsim trace ")]


def test_shipped_traces_reproduce_from_the_recorded_commands(tmp_path, capsys):
    commands = _readme_commands()
    assert {re.search(r"--out traces/(\S+)", c).group(1) for c in commands} == {"static.csv", "dynamic.csv"}
    for command in commands:
        argv = shlex.split(command)[1:]
        shipped = traces_dir() / Path(argv[argv.index("--out") + 1]).name
        argv[argv.index("--out") + 1] = str(tmp_path / shipped.name)
        assert main(argv) == 0
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name


def test_shipped_traces_have_the_intended_scale():
    static = read_trace(traces_dir() / "static.csv")
    assert 50 <= static.duration_s <= 70 and 8 <= static.mean_rate_qps <= 10
    dynamic = read_trace(traces_dir() / "dynamic.csv")
    assert 6000 <= len(dynamic) <= 7500 and 340 <= dynamic.duration_s <= 370
    assert 17 <= dynamic.mean_rate_qps <= 21
    assert 28 <= window_counts(dynamic, 10).max() / 10 <= 36
    for path in (traces_dir() / "static.csv", traces_dir() / "dynamic.csv"):
        assert path.stat().st_size < 300_000


def test_trace_code_does_not_import_torch():
    code = (
        "import sys, diffsim.workload.traces, diffsim.workload.trace_generators, diffsim.commands.trace\n"
        "from diffsim.workload.trace_generators import poisson_trace; poisson_trace(1, 1, seed=0)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evenly_spaced_arrivals_stay_inside_the_duration():
    # cv = 0 puts the last arrival at 6 x (1/3) = 1.9999999999999998, which rounds to the end itself.
    from diffsim.workload.trace_generators import gamma_trace

    trace = gamma_trace(3.0, 0.0, 2.0, seed=0)
    assert len(trace) == 5 and trace.arrival_s.max() < 2.0

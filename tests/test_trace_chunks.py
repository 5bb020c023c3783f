"""Traces read, described and converted in chunks: the results equal those of reading the whole file, and
no step holds more than a chunk of records (``trace info`` / ``trace convert`` on a 10M-request trace)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_traces import MALFORMED, same, write

from diffsim.cli import main
from diffsim.commands.trace import convert, describe, file_stats
from diffsim.errors import DiffsimError, InputError
from diffsim.workload import traces
from diffsim.workload.traces import (
    DIFFSIM_MARKER,
    TraceStats,
    convert_trace,
    parse_trace,
    read_trace,
    trace_chunks,
    window_counts,
    write_trace,
)

CHUNK_SIZES = (1, 2, 3, 7)

# Prompts with everything CSV must quote, '#' at a line start inside quotes, and empty ones.
PROMPT = st.text(alphabet=st.sampled_from(list("ab ,\"#\n\r\té")), max_size=8)


@st.composite
def trace_texts(draw) -> tuple[str, str]:
    """(text of a trace file, its format): rows in any order with many equal times, comments and blank
    lines between records, in the artifact format or the project's with optional prompts and seeds."""
    n = draw(st.integers(1, 40))
    times = draw(st.lists(st.integers(0, 30), min_size=n, max_size=n))  # few distinct values: many ties
    ids = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    noise = draw(st.lists(st.sampled_from(["", "# comment\n", "\n", "  \n"]), min_size=n, max_size=n))
    if draw(st.booleans()):
        rows = [f"{t * 250.5},{pid}\n" for t, pid in zip(times, ids)]  # arrival_ms
        return "".join(x + r for x, r in zip(noise, rows)), "artifact"
    has_prompt, has_seed = draw(st.booleans()), draw(st.booleans())
    prompts = draw(st.lists(PROMPT, min_size=n, max_size=n))
    seeds = draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n))
    header = "arrival_s,prompt_id" + ",prompt" * has_prompt + ",seed" * has_seed + "\n"
    rows = []
    for i in range(n):
        fields = [repr(times[i] * 0.25), str(ids[i])]
        if has_prompt:
            fields.append('"' + prompts[i].replace('"', '""') + '"')
        if has_seed:
            fields.append(str(seeds[i]))
        rows.append(",".join(fields) + "\n")
    marker = DIFFSIM_MARKER + "\n" if draw(st.booleans()) else ""
    return marker + header + "".join(x + r for x, r in zip(noise, rows)), "diffsim"


def expected_info(trace) -> dict:
    """What trace info must say, computed from the whole trace in memory."""
    info = {
        "source": trace.source,
        "requests": len(trace),
        "duration_s": round(trace.duration_s, 6),
        "mean_rate_qps": round(trace.mean_rate_qps, 4),
        "has_prompts": trace.prompt is not None,
        "has_seeds": trace.seed is not None,
        "prompt_id_min": int(trace.prompt_id.min()),
        "prompt_id_max": int(trace.prompt_id.max()),
        "distinct_prompt_ids": len(set(trace.prompt_id.tolist())),
    }
    for w in (1.0, 10.0):
        counts = np.bincount(np.floor(trace.arrival_s / w).astype(np.int64))
        info[f"windows_{w:g}s"] = {"mean_qps": round(float(counts.mean()) / w, 4),
                                   "peak_qps": round(float(counts.max()) / w, 4),
                                   "min_qps": round(float(counts.min()) / w, 4)}
    return info


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=trace_texts(), chunk_rows=st.sampled_from(CHUNK_SIZES))
def test_chunked_reading_info_and_convert_equal_the_whole_file(tmp_path, case, chunk_rows):
    text, fmt = case
    path = write(tmp_path, text, "t.csv")
    whole = parse_trace(text, str(path))

    chunks = list(trace_chunks(path, chunk_rows))
    assert all(len(c) == chunk_rows for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= chunk_rows
    assert same(read_trace(path, chunk_rows), whole)
    assert describe(file_stats(path, chunk_rows), str(path)) == expected_info(whole)

    for out_fmt in ("diffsim", "artifact"):
        reference, converted = tmp_path / "reference.csv", tmp_path / "converted.csv"
        write_trace(whole, reference, out_fmt, drop_extra=True)
        assert convert_trace(path, converted, out_fmt, drop_extra=True, chunk_rows=chunk_rows) == len(whole)
        assert converted.read_bytes() == reference.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["converted.csv", "reference.csv", "t.csv"]  # no runs, no .part


def test_reading_pulls_lines_only_as_chunks_are_consumed():
    pulled = []

    def lines():
        yield "arrival_s,prompt_id\n"
        for i in range(1000):
            pulled.append(i)
            yield f"{i},1\n"

    chunks = traces._chunks_of(lines(), "gen.csv", 10)
    first = next(chunks)
    assert len(first) == 10 and len(pulled) == 10  # the 990 other lines are not read yet
    assert sum(len(c) for c in chunks) == 990


def test_unsorted_convert_merges_sorted_runs_and_cleans_up(tmp_path, monkeypatch):
    # 300 rows in chunks of 2: 150 sorted runs on disk, merged with a window of at least 1 row per run
    rng = np.random.default_rng(5)
    times = rng.integers(0, 40, 300)
    src = write(tmp_path, "".join(f"{t},{i}\n" for i, t in enumerate(times)), "art.csv")
    largest = []
    real = traces._merged_chunks

    def merged(runs, rows):
        assert len(runs) == 150
        for chunk in real(runs, rows):
            largest.append(len(chunk))
            yield chunk

    monkeypatch.setattr(traces, "_merged_chunks", merged)
    calls = []
    assert convert_trace(src, tmp_path / "out.csv", chunk_rows=2, progress=lambda *a: calls.append(a)) == 300
    assert max(largest) <= 150  # never more than a window (1 row) of each run at once
    expected = tmp_path / "expected.csv"
    write_trace(read_trace(src), expected)
    assert (tmp_path / "out.csv").read_bytes() == expected.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["art.csv", "expected.csv", "out.csv"]
    stages = [c[0] for c in calls]
    assert "sort" in stages and stages[-1] == "merge" and calls[-1][1:] == (300, 300)


def test_sorted_input_converts_in_one_pass(tmp_path, monkeypatch):
    src = write(tmp_path, "".join(f"{i},{i}\n" for i in range(50)), "sorted.csv")
    monkeypatch.setattr(traces, "_sorted_runs", lambda *a: pytest.fail("a sorted file needs no sort"))
    assert convert_trace(src, tmp_path / "out.csv", chunk_rows=3) == 50


@pytest.mark.parametrize("text,line,fragment", MALFORMED)
def test_errors_name_the_same_line_in_chunks(tmp_path, text, line, fragment):
    path = write(tmp_path, text, "bad.csv")
    for chunk_rows in (1, 2):
        with pytest.raises(InputError) as err:
            list(trace_chunks(path, chunk_rows))
        assert str(err.value).startswith(f"{path}: line {line}: ") and fragment in str(err.value)


def test_a_failed_conversion_leaves_no_file(tmp_path, capsys):
    # the error is found after the first chunks were written: no output, no .part, no sort runs are left
    src = write(tmp_path, "".join(f"{i},1\n" for i in range(20)) + "oops,2\n", "bad.csv")
    with pytest.raises(InputError, match="line 21: arrival_ms 'oops'"):
        convert_trace(src, tmp_path / "out.csv", chunk_rows=3)
    unsorted = write(tmp_path, "".join(f"{20 - i},1\n" for i in range(20)) + "-1,2\n", "unsorted.csv")
    with pytest.raises(InputError, match="line 21: arrival_ms -1 is negative"):
        convert_trace(unsorted, tmp_path / "out.csv", chunk_rows=3)
    assert sorted(os.listdir(tmp_path)) == ["bad.csv", "unsorted.csv"]
    # the artifact format cannot take prompts: refused before anything is written
    prompts = write(tmp_path, "arrival_s,prompt_id,prompt\n1,2,cat\n", "p.csv")
    with pytest.raises(DiffsimError, match="--drop-prompts"):
        convert_trace(prompts, tmp_path / "out.csv", "artifact")
    assert not (tmp_path / "out.csv").exists()


def test_convert_may_overwrite_its_input(tmp_path, capsys):
    src = write(tmp_path, "300,2\n100,1\n", "t.csv")
    assert main(["trace", "convert", str(src), "--out", str(src)]) == 0
    assert src.read_text() == f"{DIFFSIM_MARKER}\narrival_s,prompt_id\n0.1,1\n0.3,2\n"


def test_trace_stats_merge_distinct_ids_and_windows_over_chunks():
    stats = TraceStats((1.0,))
    for arrival, ids in (([5.5, 0.2], [3, 3]), ([2.0], [9]), ([0.0, 5.9], [1, 3])):
        stats.add(traces.TraceChunk(np.array(arrival), np.array(ids), None, None))
    assert (stats.requests, stats.prompt_id_min, stats.prompt_id_max, stats.distinct_prompt_ids) == (5, 1, 9, 3)
    assert stats.windows[1.0].counts.tolist() == [2, 0, 1, 0, 0, 2]
    assert stats.duration_s == 5.9


def test_window_counts_grow_from_chunks_in_any_order():
    whole = window_counts(traces.sorted_trace([0.5, 3.2, 3.9, 12.0], [1, 1, 1, 1]), 1.0)
    counter = traces.WindowCounts(1.0)
    for part in ([12.0], [3.9, 0.5], [3.2]):
        counter.add(np.array(part))
    assert counter.counts.tolist() == whole.tolist() == [1, 0, 0, 2] + [0] * 8 + [1]


def test_cli_info_prints_the_same_from_chunks(tmp_path, capsys, monkeypatch):
    text = "".join(f"{(i * 7919) % 1000},{i % 13}\n" for i in range(500))  # unsorted artifact rows
    path = write(tmp_path, text, "t.csv")
    monkeypatch.setattr(traces, "DEFAULT_CHUNK_ROWS", 16)
    assert main(["trace", "info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected_info(read_trace(path))


def test_convert_command_counts_what_it_wrote(tmp_path):
    src = write(tmp_path, "5,1\n1,2\n3,3\n", "t.csv")
    assert convert(src, tmp_path / "o.csv", "artifact", drop_extra=False, chunk_rows=1) == 3
    assert (tmp_path / "o.csv").read_text() == "1.000,2\n3.000,3\n5.000,1\n"


def test_converting_an_artifact_trace_writes_the_nearest_seconds(tmp_path, capsys):
    # issue 14: 304.706 ms was written 0.30470600000000003 (a division by 1000); chunks change nothing
    src = write(tmp_path, "304.706,4706\n0.001,2\n1000,3\n", "art.csv")
    out = tmp_path / "mine.csv"
    assert main(["trace", "convert", str(src), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[2:] == ["1e-06,2", "0.304706,4706", "1.0,3"]

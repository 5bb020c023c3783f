"""Fuzzing every kind of input a user gives diffsim: traces, GPU profiles, cascades files, config files,
confidences CSVs and command-line flags.

Whatever the input, a command ends in success (exit 0) or in exactly one line on stderr, ``diffsim ...:
error: ...``, with exit 2: never a traceback (an exception escaping ``diffsim.cli.main``), never a hang
(each test is guarded by pytest-timeout). Commands run in-process; inputs are kept to sizes that simulate
in a fraction of a second, so the file runs in well under a minute on 2 cores. Under ``CI=true`` the
examples are derandomised (tests/conftest.py). HTTP request bodies are fuzzed with the server's tests.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffsim import cli
from diffsim.config import ConfigFile
from diffsim.errors import UsageError
from diffsim.resources import profiles_dir

def fuzz(examples: int) -> settings:
    """``examples`` examples, no per-example deadline (a simulation takes what it takes)."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


GUARD = pytest.mark.timeout(120)  # a hang fails the test instead of stalling the run

SMALL_TRACE = "arrival_s,prompt_id\n0.1,1\n0.5,2\n1.0,3\n2.5,4\n3.0,5\n"
BINARY = b"\xff\xfe\x00\x80" + bytes(range(256))


def run(argv: list[str]) -> tuple[int, str, str]:
    """``diffsim ARGV`` in this process: (exit code, stdout, stderr). ``--help`` anywhere exits 0."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as done:  # argparse's --help / --version
            rc = done.code
    return rc, out.getvalue(), err.getvalue()


def assert_clean(argv: list[str]) -> int:
    """Run ``argv`` and check the outcome: exit 0, or exit 2 with one error line. Returns the exit code.
    Records which of the two it was as a hypothesis event (``--hypothesis-show-statistics``), per command."""
    rc, _, err = run(argv)
    command = " ".join(str(a) for a in argv[:2] if not str(a).startswith("-")) if argv and argv[0] == "trace" \
        else str(argv[0]) if argv else ""
    event(f"{command}: exit {rc}")
    assert "Traceback" not in err, (argv, err)
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("diffsim") and ": error: " in lines[0], (argv, err)
    return rc


def half_valid(valid: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` or ``odd``, each about half the time (``st.one_of`` would flatten ``odd``'s own branches
    beside ``valid`` and draw it rarely): both outcomes, exit 0 and exit 2, are reached."""
    return st.booleans().flatmap(lambda ok: valid if ok else odd)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A folder to run in (relative --out paths land here) with a small trace and a binary file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.csv").write_text(SMALL_TRACE)
    (tmp_path / "blob.yaml").write_bytes(BINARY)
    (tmp_path / "conf.csv").write_text("prompt_id,confidence\n" + "".join(f"{i},0.{i}\n" for i in range(1, 6)))
    return tmp_path


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return path


# ------------------------------------------------------------------------------------------ values

ODD_NUMBERS = st.sampled_from([0, 1, -1, 2, 16, 2**31, 2**32, 2**63, 10**30, 1e-300, 1e300, 0.5, 1e7, 1e-6,
                               float("inf"), float("-inf"), float("nan")])
NUMBERS = st.one_of(st.integers(-5, 50), ODD_NUMBERS, st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
ODD_TOKENS = st.sampled_from(["", " ", "-1", "-1,0", "0", "1", "1e300", "nan", "-inf", "inf", "x", ",", "1,,2",
                              "1e-6", "99999999999", "-", "--", "true", "0.5", "16", "1,2", "0,1", "100000",
                              "4294967296", "a100", "static.csv", "blob.yaml", "small.csv", "-h"])
TOKENS = st.one_of(ODD_TOKENS, st.text(max_size=6))


# ------------------------------------------------------------------------------------------ traces

TRACE_ATOMS = st.one_of(
    st.integers(0, 5000).map(str),
    st.floats(0, 100, allow_nan=False).map(repr),
    st.sampled_from(["", "#c", "nan", "inf", "-1", "1e300", "1e7", "10000001", "1e10", "x", '"', '"a,b"',
                     "arrival_s", "prompt_id", "prompt", "seed", "arrival_ms", "\x00", "\ufeff", "99999999999999999999",
                     " 1 ", "1_000", "0x10"]),
    st.text(max_size=6),
)
VALID_TRACE_ROW = st.tuples(st.floats(0, 1e7, allow_nan=False), st.integers(0, 2**63 - 1)).map(
    lambda r: f"{r[0]!r},{r[1]}")
TRACE_LINES = st.lists(st.one_of(VALID_TRACE_ROW, VALID_TRACE_ROW,
                                 st.lists(TRACE_ATOMS, min_size=1, max_size=4).map(",".join)), max_size=12)
TRACE_HEADERS = st.sampled_from(["", "", "arrival_s,prompt_id\n", "# diffsim-trace v1\narrival_s,prompt_id\n",
                                 "# diffsim-trace v1\n", "# diffsim-trace v2\n", "arrival_s,prompt_id\n",
                                 "# diffsim-trace v1\narrival_s,prompt_id,prompt,seed\n", "prompt_id,arrival_s\n"])
ODD_TRACES = st.one_of(st.tuples(TRACE_HEADERS, TRACE_LINES).map(lambda t: t[0] + "\n".join(t[1]) + "\n"),
                       st.lists(VALID_TRACE_ROW, min_size=1, max_size=20).map(lambda rows: "\n".join(rows) + "\n"),
                       st.binary(max_size=200))


@st.composite
def valid_traces(draw) -> str:
    """Well-formed but unusual traces (traces/README.md): either format, rows in any order, ties, comment and
    blank lines between records, optional prompt (quoted, with commas) and seed columns, CRLF line ends."""
    arrival = st.one_of(st.floats(0, 1e7, allow_nan=False), st.integers(0, 10**7), st.just(0.0))
    rows = draw(st.lists(st.tuples(arrival, st.integers(0, 2**63 - 1)), min_size=1, max_size=12))
    fillers = st.sampled_from(["", "# a comment", "#", "# , ,"])
    if draw(st.booleans()):  # artifact: arrival_ms,prompt_id, no header
        lines = [f"{int(t * 1000) if isinstance(t, int) else t * 1000!r},{pid}" for t, pid in rows]
        header: list[str] = []
    else:
        extra = draw(st.sampled_from(["", ",prompt", ",seed", ",prompt,seed"]))
        header = draw(st.sampled_from([[], ["# diffsim-trace v1"]])) + ["arrival_s,prompt_id" + extra]
        lines = []
        for t, pid in rows:
            line = f"{t!r},{pid}"
            if "prompt" in extra:
                line += "," + draw(st.sampled_from(['"a cat, on a mat"', "plain", '""', '"say ""hi"""', "ünï"]))
            if "seed" in extra:
                line += f",{draw(st.integers(0, 2**32 - 1))}"
            lines.append(line)
    body: list[str] = []
    for line in lines:
        if draw(st.integers(0, 3)) == 0:
            body.append(draw(fillers))
        body.append(line)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(header + body) + newline


TRACES = half_valid(valid_traces(), ODD_TRACES)


@GUARD
@fuzz(40)
@given(content=TRACES)
def test_fuzz_traces(workdir, content):
    path = write(workdir / "trace.csv", content)
    assert_clean(["trace", "info", path])
    assert_clean(["trace", "info", path, "--json"])
    for fmt in ("diffsim", "artifact"):
        assert_clean(["trace", "convert", path, "--out", workdir / "conv.csv", "--format", fmt])


SIM_TRACES = st.tuples(
    st.sampled_from(["arrival_s,prompt_id\n"] * 4 + ["", "# diffsim-trace v1\narrival_s,prompt_id,seed\n"]),
    st.lists(st.tuples(st.floats(0, 30, allow_nan=False), st.integers(0, 5000),
                       st.sampled_from([""] * 40 + [",x", ",3"])), min_size=1, max_size=15),
)


SIM_TEXTS = SIM_TRACES.map(lambda trace: trace[0] + "".join(f"{t!r},{pid}{extra}\n" for t, pid, extra in trace[1]))
VALID_SIM_TEXTS = st.lists(st.tuples(st.floats(0, 30, allow_nan=False), st.integers(0, 5000)), min_size=1,
                           max_size=15).map(lambda rows: "arrival_s,prompt_id\n" + "".join(f"{t!r},{p}\n" for t, p in rows))


@GUARD
@fuzz(15)
@given(text=half_valid(VALID_SIM_TEXTS, SIM_TEXTS))
def test_fuzz_traces_simulated(workdir, text):
    """Traces short enough to simulate (arrival times up to 30 s), with malformed rows among them."""
    path = write(workdir / "trace.csv", text)
    assert_clean(["simulate", "--trace", path, "--gpus", "4", "--out", workdir / "out", "--no-plot", "--quiet"])


# ------------------------------------------------------------------------------------------ YAML files


def yaml_mutations(base: dict) -> st.SearchStrategy:
    """``base`` (a parsed YAML file) with one field replaced, deleted or added, as YAML text; or its text with
    a line repeated (a duplicate key), cut short, or binary bytes in it."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + (k,))
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append(path + (i,))
                walk(v, path + (i,))

    walk(base, ())

    def mutate(args) -> str:
        path, action, value = args
        import copy

        data = copy.deepcopy(base)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if action == "set":
            parent[path[-1]] = value
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[f"extra_{len(path)}"] = value
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)

    text = yaml.safe_dump(base, sort_keys=False)
    lines = text.splitlines(keepends=True)
    values = st.one_of(VALUES, st.floats(0.001, 5000), st.integers(0, 64), st.floats(0, 1))  # odd, or plausible
    structured = st.tuples(st.sampled_from(paths), st.sampled_from(["set", "set", "delete", "add"]), values).map(mutate)
    repeated = st.integers(0, len(lines) - 1).map(lambda i: "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:]))
    cut = st.integers(0, len(text)).map(lambda i: text[:i])
    binary = st.integers(0, len(text)).map(lambda i: text[:i].encode() + BINARY + text[i:].encode())
    return st.one_of(structured, structured, repeated, cut, binary)


A100 = yaml.safe_load((profiles_dir() / "a100.yaml").read_text())
CASCADES = yaml.safe_load((profiles_dir() / "cascades.yaml").read_text())


def edited(base: dict, edit) -> st.SearchStrategy:
    """``base`` changed in place by ``edit(data, draw)`` on a deep copy, as YAML text: block or flow style."""
    import copy

    @st.composite
    def build(draw) -> str:
        data = copy.deepcopy(base)
        edit(data, draw)
        return yaml.safe_dump(data, sort_keys=draw(st.booleans()), default_flow_style=draw(st.booleans()),
                              allow_unicode=True)

    return build()


def _profile_edit(data: dict, draw) -> None:
    """Valid but unusual GPU profiles: each table scaled, thinned or cut short; extras the schema allows."""
    tables = [data["discriminator"]] + list(data["models"].values())
    for table in tables:
        kind = draw(st.sampled_from(["keep", "keep", "scale", "drop-column", "null-tail"]))
        measured = [i for i, v in enumerate(table["p50_ms"]) if v is not None]
        if kind == "scale":
            f = draw(st.floats(0.01, 100))
            table["p50_ms"] = [None if v is None else max(0.01, v * f) for v in table["p50_ms"]]
        elif kind == "drop-column" and len(measured) > 1:
            i = draw(st.sampled_from(measured[1:]))  # batches of 1 stay: a run needs them
            for key in ("batch_sizes", "p50_ms"):
                del table[key][i]
        elif kind == "null-tail" and len(measured) > 1:
            keep = draw(st.integers(1, len(measured)))
            table["p50_ms"] = [v if i < measured[keep - 1] + 1 else None for i, v in enumerate(table["p50_ms"])]
        if draw(st.booleans()) and all(v is not None for v in table["p50_ms"]):
            table["p95_ms"] = [v * draw(st.floats(1, 3)) for v in table["p50_ms"]]
    for name in draw(st.lists(st.sampled_from(["sdxs", "sdxl-lightning", "sdxl"]), unique=True)):
        del data["models"][name]  # models no cascade of the run uses
    if draw(st.booleans()):
        data["overheads"] = {"request_ms": draw(st.floats(0, 500)), "cold_start_s": draw(st.floats(0, 30))}
    if draw(st.booleans()):
        data["concurrency"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        data["batch_time_correlation"] = {"share": draw(st.floats(0, 1)), "rho": draw(st.floats(0, 0.999))}
    for key in draw(st.lists(st.sampled_from(["software", "method", "notes"]), unique=True)):
        del data["provenance"][key]


def _cascades_edit(data: dict, draw) -> None:
    """Valid but unusual cascades files: other SLOs, scaled FID curves, thinned deferral curves, fewer
    cascades (the run's own kept)."""
    for name, spec in data["cascades"].items():
        if draw(st.booleans()):
            spec["slo_s"] = draw(st.one_of(st.floats(0.05, 600), st.integers(1, 3600)))
        if draw(st.booleans()):
            f = draw(st.floats(0.01, 100))
            spec["fid"]["fid"] = [v * f for v in spec["fid"]["fid"]]
        if draw(st.booleans()):
            step = draw(st.integers(2, 60))
            curve = spec["deferral_curve"]
            keep = sorted(set(range(0, len(curve["t"]), step)) | {len(curve["t"]) - 1})
            curve["t"], curve["f"] = [curve["t"][i] for i in keep], [curve["f"][i] for i in keep]
        if draw(st.booleans()):
            spec["fid"].pop("sample_size", None)
        if draw(st.booleans()):
            spec["fid_random_mix"] = {"r": list(spec["fid"]["r"]), "fid": list(spec["fid"]["fid"])}
    for name in draw(st.lists(st.sampled_from(["sdxs-sdv15", "sdxlltn-sdxl"]), unique=True)):
        del data["cascades"][name]


VALID_A100 = edited(A100, _profile_edit)
VALID_CASCADES = edited(CASCADES, _cascades_edit)


PROFILES = half_valid(VALID_A100, yaml_mutations(A100))
CASCADE_FILES = half_valid(VALID_CASCADES, yaml_mutations(CASCADES))


@GUARD
@fuzz(40)
@given(content=PROFILES, demand=st.sampled_from(["0", "5", "30"]))
def test_fuzz_gpu_profiles(workdir, content, demand):
    path = write(workdir / "gpu.yaml", content)
    assert_clean(["plan", "--gpu", path, "--demand", demand, "--gpus", "8"])


@GUARD
@fuzz(10)
@given(content=PROFILES)
def test_fuzz_gpu_profiles_simulated(workdir, content):
    path = write(workdir / "gpu.yaml", content)
    assert_clean(["simulate", "--gpu", path, "--trace", "small.csv", "--gpus", "4", "--out", "out", "--no-plot",
                  "--quiet"])


@GUARD
@fuzz(40)
@given(content=CASCADE_FILES, cascade=st.sampled_from(["sdturbo-sdv15", "sdxs-sdv15", "nope"]))
def test_fuzz_cascades_files(workdir, content, cascade):
    path = write(workdir / "cascades.yaml", content)
    assert_clean(["plan", "--cascades", path, "--cascade", cascade, "--demand", "10", "--gpus", "8"])


@GUARD
@fuzz(10)
@given(content=CASCADE_FILES)
def test_fuzz_cascades_files_simulated(workdir, content):
    path = write(workdir / "cascades.yaml", content)
    assert_clean(["simulate", "--cascades", path, "--trace", "small.csv", "--gpus", "4", "--out", "out",
                  "--no-plot", "--quiet"])


# ------------------------------------------------------------------------------------------ config files

PLAUSIBLE = {
    "gpu": st.sampled_from(["a100", "h100-graph", "nope", "missing.yaml", "blob.yaml", ""]),
    "cascades": st.sampled_from(["missing.yaml", "blob.yaml", str(profiles_dir() / "cascades.yaml")]),
    "cascade": st.sampled_from(["sdturbo-sdv15", "sdxs-sdv15", "sdxlltn-sdxl", "nope"]),
    "trace": st.sampled_from(["small.csv", "missing.csv"]),
    "gpus": st.integers(-1, 24),
    "policy": st.sampled_from(["diffserve", "diffserve-maxt", "static", "clipper-light", "clipper-heavy", "proteus",
                               "nope"]),
    "seed": st.one_of(st.integers(0, 2**32 - 1), st.integers(-3, 3)),
    "routing": st.sampled_from(["random", "least-loaded", "round-robin"]),
    "max_utilization": st.floats(-0.5, 1.5),
    "batch_wait": st.floats(-0.5, 1.5),
    "drop_factor": st.floats(-1, 5),
    "batch_timeout_s": st.floats(-1, 2),
    "swap_s": st.floats(-1, 2),
    "batch_sizes": st.lists(st.integers(-1, 64), max_size=5),
    "confidences": st.sampled_from(["conf.csv", "missing.csv", "blob.yaml"]),
    "static_plan": st.fixed_dictionaries(
        {"threshold": st.floats(-0.5, 1.5), "light_workers": st.integers(-1, 30), "heavy_workers": st.integers(-1, 30),
         "light_batch": st.integers(0, 40), "heavy_batch": st.integers(0, 40)},
        optional={"gpus": st.integers(-1, 40)}),
    "window_s": st.floats(0.001, 50),
    "controller": st.fixed_dictionaries(
        {}, optional={"tick_s": st.floats(0.0, 5), "replan_s": st.floats(0.0, 20), "ewma_alpha": st.floats(-0.5, 1.5),
                      "ewma_window": st.integers(-1, 50), "headroom": st.floats(-1, 3),
                      "initial_demand_qps": st.floats(-1, 100), "stabilization_s": st.floats(-5, 100),
                      "speed": st.integers()}),
    "faults": st.lists(st.fixed_dictionaries({"at_s": st.floats(-1, 5), "workers": st.lists(st.integers(-1, 30),
                                                                                             max_size=3)},
                                             optional={"recover": st.booleans()}), max_size=3),
    "service_time": st.sampled_from(["p50", "sampled", "p99"]),
    "admission": st.booleans(),
    "deadline_sweep_s": st.floats(-1, 1),
}
KEYS = sorted(ConfigFile.model_fields) + ["colour"]
PLAUSIBLE_CONFIGS = st.lists(st.sampled_from(sorted(PLAUSIBLE)), unique=True, max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: PLAUSIBLE[k] for k in keys}))
CONFIGS = st.one_of(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4), PLAUSIBLE_CONFIGS, PLAUSIBLE_CONFIGS)


# Settings inside their bounds, to reach the simulator with unusual but valid combinations
VALID = {
    "gpus": st.integers(1, 24),
    "policy": st.sampled_from(["diffserve", "diffserve-maxt", "static", "clipper-light", "clipper-heavy", "proteus"]),
    "seed": st.integers(0, 2**32 - 1),
    "routing": st.sampled_from(["random", "least-loaded"]),
    "max_utilization": st.floats(0.05, 1),
    "batch_wait": st.floats(0, 1),
    "drop_factor": st.floats(0.2, 5),
    "batch_timeout_s": st.floats(0, 2),
    "swap_s": st.floats(0, 2),
    "batch_sizes": st.lists(st.sampled_from([1, 2, 3, 4, 8, 16, 32]), min_size=1, max_size=4),
    "static_plan": st.fixed_dictionaries({"threshold": st.floats(0, 1), "light_workers": st.integers(1, 8),
                                          "heavy_workers": st.integers(0, 8), "light_batch": st.sampled_from([1, 2, 4]),
                                          "heavy_batch": st.sampled_from([1, 2, 4])}),
    "window_s": st.floats(0.5, 50),
    "controller": st.fixed_dictionaries(
        {}, optional={"tick_s": st.floats(0.1, 5), "replan_s": st.floats(0.5, 20), "ewma_alpha": st.floats(0.01, 1),
                      "ewma_window": st.integers(1, 50), "headroom": st.floats(0.5, 3),
                      "initial_demand_qps": st.floats(0, 100), "stabilization_s": st.floats(0, 100)}),
    "faults": st.lists(st.fixed_dictionaries({"at_s": st.floats(0, 5), "workers": st.lists(st.integers(0, 3), min_size=1,
                                                                                            max_size=2)},
                                             optional={"recover": st.booleans()}), max_size=3),
    "service_time": st.sampled_from(["p50", "sampled"]),
    "admission": st.booleans(),
    "deadline_sweep_s": st.sampled_from([0, 0.1, 0.5]),
    "queue_model": st.sampled_from(["little", "mean", "tail"]),
    "fallback": st.sampled_from(["none", "light"]),
}


VALID_CONFIGS = st.lists(st.sampled_from(sorted(VALID)), unique=True, min_size=1, max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: VALID[k] for k in keys}))


@GUARD
@fuzz(30)
@given(config=half_valid(VALID_CONFIGS, st.one_of(CONFIGS, CONFIGS.map(lambda c: yaml.safe_dump(c) + "gpus: 3\n"),
                                                  VALUES)))
def test_fuzz_config_files(workdir, config):
    text = config if isinstance(config, str) else yaml.safe_dump(config, allow_unicode=True)
    path = write(workdir / "run.yaml", text)
    assert_clean(["simulate", "--config", path, "--trace", "small.csv", "--out", "out", "--no-plot", "--quiet"])


@GUARD
@fuzz(20)
@given(config=VALID_CONFIGS)
def test_fuzz_config_files_within_bounds(workdir, config):
    path = write(workdir / "run.yaml", yaml.safe_dump(config))
    assert_clean(["simulate", "--config", path, "--trace", "small.csv", "--out", "out", "--no-plot", "--quiet"])


# ------------------------------------------------------------------------------------------ confidences

ODD_CONFIDENCE_ROWS = st.one_of(
    st.tuples(st.integers(-1, 6), st.floats(-0.5, 1.5)).map(lambda r: f"{r[0]},{r[1]!r}"),
    st.sampled_from(["prompt_id,confidence", "#c", "", "1", "1,2,3", "x,0.5", "1,x", "1,nan", "1,inf",
                     "99999999999999999999,0.5", '"1",0.5']),
    st.text(max_size=8),
)
VALID_CONFIDENCE_ROWS = st.lists(st.floats(0, 1), min_size=5, max_size=5).map(
    lambda cs: [f"{i + 1},{c!r}" for i, c in enumerate(cs)])  # the small trace's prompt ids 1..5


def with_odd_rows(rows: list[str], odd: list[tuple[int, str]]) -> list[str]:
    """``rows`` with each odd row put in before the row at its index."""
    out = list(rows)
    for at, row in sorted(odd, reverse=True):
        out.insert(min(at, len(out)), row)
    return out


CONFIDENCE_ROWS = st.one_of(
    VALID_CONFIDENCE_ROWS,
    st.tuples(VALID_CONFIDENCE_ROWS, st.lists(st.tuples(st.integers(0, 5), ODD_CONFIDENCE_ROWS), min_size=1,
                                              max_size=2)).map(lambda t: with_odd_rows(*t)),
    st.lists(ODD_CONFIDENCE_ROWS, max_size=6),
)


@GUARD
@fuzz(20)
@given(rows=half_valid(
    st.tuples(st.sampled_from(["", "prompt_id,confidence\n", "# scores\n"]), VALID_CONFIDENCE_ROWS).map(
        lambda t: t[0] + "\n".join(t[1]) + "\n"),
    st.one_of(CONFIDENCE_ROWS.map(lambda rows: "\n".join(rows) + "\n"), st.binary(max_size=100))))
def test_fuzz_confidences(workdir, rows):
    path = write(workdir / "fuzzed-conf.csv", rows)
    write(workdir / "run.yaml", f"confidences: {path.name}\n")
    assert_clean(["simulate", "--config", "run.yaml", "--trace", "small.csv", "--gpus", "4", "--out", "out",
                  "--no-plot", "--quiet"])


# ------------------------------------------------------------------------------------------ flags


def flags(spec: dict) -> st.SearchStrategy:
    """Some of the flags of ``spec`` (flag -> strategy of plausible values), each with a plausible value or
    an odd token, as an argument list."""
    pairs = [st.tuples(st.just(flag), st.one_of(values, TOKENS)) for flag, values in spec.items()]
    return st.lists(st.one_of(*pairs), max_size=4).map(lambda ps: [x for p in ps for x in p])


NUM = lambda lo, hi: st.floats(lo, hi, allow_nan=False).map(lambda v: f"{v:g}")  # noqa: E731
INT = lambda lo, hi: st.integers(lo, hi).map(str)  # noqa: E731
SCENARIO = {
    "--gpus": INT(1, 16), "--seed": INT(0, 5), "--routing": st.sampled_from(["random", "least-loaded"]),
    "--max-utilization": NUM(0, 1), "--batch-wait": NUM(0, 1), "--window-s": NUM(0.01, 20),
    "--cascade": st.sampled_from(["sdturbo-sdv15", "sdxs-sdv15"]), "--gpu": st.sampled_from(["a100", "h100-eager"]),
    "--fail-worker": st.sampled_from(["1@1", "0,1@0.5", "3@x", "@", "1@1e300"]),
    "--recover-worker": st.sampled_from(["1@2", "9@1"]), "--service-time": st.sampled_from(["p50", "sampled"]),
    "--config": st.sampled_from(["blob.yaml", "missing.yaml"]),
}
COMMANDS = {
    "simulate": (["simulate", "--trace", "small.csv", "--out", "out", "--no-plot", "--quiet"],
                 {**SCENARIO, "--policy": st.sampled_from(["diffserve", "static", "proteus"]),
                  "--out": st.sampled_from(["out2", ""])}),
    "compare": (["compare", "--trace", "small.csv", "--out", "cmp", "--no-plot", "--jobs", "1",
                 "--policies", "diffserve,static"],
                {**SCENARIO, "--policies": st.sampled_from(["static", "diffserve,nope", ",", "proteus"]),
                 "--sweep-gpus": st.sampled_from(["2,4", "4", "0", "", "1,1"]),
                 "--sweep-thresholds": st.sampled_from(["0,0.5", "0.1", "2", "", "-0.1"]), "--jobs": INT(0, 2)}),
    "plan": (["plan", "--demand", "5"],
             {"--demand": NUM(0, 100), "--gpus": INT(1, 64), "--queue-delay-s": st.sampled_from(["0,0", "0.5,1", "1"]),
              "--batch-sizes": st.sampled_from(["1,2,4", "3", "0", "1.5"]), "--thresholds": st.sampled_from(["0,0.5,1", "0.2"]),
              "--objective": st.sampled_from(["quality", "max-threshold"]),
              "--mode": st.sampled_from(["cascade", "split", "light-only", "heavy-only"]),
              "--solver": st.sampled_from(["exact", "milp"]), "--max-utilization": NUM(0, 1),
              "--batch-wait": NUM(0, 1), "--cascade": st.sampled_from(["sdxlltn-sdxl", "nope"]),
              "--gpu": st.sampled_from(["h100-graph", "blob.yaml"])}),
    "trace poisson": (["trace", "poisson", "--rate", "2", "--duration", "5", "--out", "t.csv"],
                      {"--rate": NUM(0.1, 50), "--duration": NUM(0.1, 20), "--seed": INT(0, 9),
                       "--format": st.sampled_from(["diffsim", "artifact"]), "--out": st.sampled_from(["", "t2.csv"])}),
    "trace gamma": (["trace", "gamma", "--rate", "2", "--cv", "2", "--duration", "5", "--out", "t.csv"],
                    {"--rate": NUM(0.1, 50), "--cv": NUM(0, 10), "--duration": NUM(0.1, 20)}),
    "trace shape": (["trace", "shape", "--builtin", "diurnal", "--lo", "1", "--hi", "5", "--out", "t.csv"],
                    {"--builtin": st.sampled_from(["diurnal", "ramp", "step", "nope"]), "--intervals": INT(1, 50),
                     "--interval-s": NUM(0.1, 2), "--lo": NUM(0, 10), "--hi": NUM(0, 10), "--start": INT(0, 3),
                     "--rates": st.sampled_from(["small.csv", "blob.yaml"]), "--column": st.sampled_from(["1", "2", "x"])}),
    "trace convert": (["trace", "convert", "small.csv", "--out", "c.csv"],
                      {"--format": st.sampled_from(["diffsim", "artifact"]), "--out": st.sampled_from(["", "c2.csv"])}),
}


@GUARD
@fuzz(40)
@given(data=st.data())
def test_fuzz_flags(workdir, data):
    name = data.draw(st.sampled_from(sorted(COMMANDS)), label="command")
    base, spec = COMMANDS[name]
    extra = data.draw(flags(spec), label="flags")
    assert_clean(base + extra)


ALL_COMMANDS = ["plan", "simulate", "compare", "trace", "trace poisson", "trace shape", "trace info", "serve",
                "load", "profile", "discriminator train", "discriminator score", "quality fid", "quality kid",
                "calibrate"]
FLAG_NAMES = st.sampled_from(["--gpus", "--port", "--threads", "--seed", "--demand", "--rate", "--duration",
                              "--window-s", "--batch-sizes", "--iters", "--epochs", "--lr", "--subsets", "--max-n",
                              "--slo-s", "--out", "--images", "--backend", "--cascade", "--json", "--nope", "-h"])


@GUARD
@fuzz(150)
@given(command=st.sampled_from(ALL_COMMANDS), tokens=st.lists(st.one_of(FLAG_NAMES, TOKENS), max_size=8))
def test_fuzz_flags_parse_every_command(command, tokens):
    """Parse only (serve, load, profile and the torch commands would start servers or load models): any
    argument list is a namespace, --help, or a one-line UsageError; never another exception."""
    parser, _ = cli.build_parser()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parser.parse_args(command.split() + tokens)
        except UsageError as e:
            assert "\n" not in str(e) and e.prog.startswith("diffsim")
        except SystemExit as done:  # -h
            assert done.code == 0

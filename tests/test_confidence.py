"""Per-prompt confidences: inverse-CDF draws from f(t), stable hashing, the CSV source."""

from __future__ import annotations

import pytest
from sim_helpers import a100_cascade

from diffsim.runtime.confidence import Confidences, read_confidences, stable_uniform
from diffsim.errors import InputError


@pytest.fixture(scope="module")
def cascade():
    return a100_cascade()


def test_stable_uniform_is_deterministic_in_range_and_spread():
    xs = [stable_uniform(i, 3, 1) for i in range(20000)]
    # the same on every run and platform: known values (64-bit integer mixing, no platform hash)
    assert xs[:4] == [0.33357203146466263, 0.1588900759943681, 0.6912595630656752, 0.48289386518565147]
    assert stable_uniform(123, 0, 1) == 0.9464832328845073
    assert all(0 <= x < 1 for x in xs)
    assert abs(sum(xs) / len(xs) - 0.5) < 0.01
    assert sum(x < 0.1 for x in xs) / len(xs) == pytest.approx(0.1, abs=0.01)
    assert xs[:50] != [stable_uniform(i, 4, 1) for i in range(50)]  # seed matters
    assert xs[:50] != [stable_uniform(i, 3, 2) for i in range(50)]  # stream matters


@pytest.mark.parametrize("name", ["sdturbo-sdv15", "sdxs-sdv15"])
def test_fraction_below_t_matches_deferral_curve(name):
    cascade = a100_cascade(name)
    conf = Confidences.from_curve(cascade.deferral, seed=0)
    values = [conf.of(pid) for pid in range(1, 20001)]
    for t in (0.005, 0.02, 0.1, 0.25, 0.4, 0.6, 0.9):
        frac = sum(v < t for v in values) / len(values)
        assert frac == pytest.approx(cascade.deferral(t), abs=0.012), t


def test_same_prompt_same_confidence_and_seed_changes_it(cascade):
    a = Confidences.from_curve(cascade.deferral, seed=1)
    b = Confidences.from_curve(cascade.deferral, seed=1)
    c = Confidences.from_curve(cascade.deferral, seed=2)
    assert [a.of(p) for p in range(100)] == [b.of(p) for p in range(100)]
    # known values: the a100 curve's inverse CDF at stable_uniform draws
    assert [a.of(p) for p in range(5)] == pytest.approx(
        [0.042877103555597255, 0.09424058710245176, 0.021458004050544825, 0.10736397763625975, 0.004153482793896408],
        rel=1e-12)
    assert [a.of(p) for p in range(100)] != [c.of(p) for p in range(100)]


def test_csv_source(tmp_path):
    path = tmp_path / "conf.csv"
    path.write_text("prompt_id,confidence\n# a comment\n1,0.5\n\n2,0.01\n")
    conf = Confidences.from_csv(path)
    assert conf.of(1) == 0.5 and conf.of(2) == 0.01
    conf.check_covers([1, 2, 2])
    with pytest.raises(InputError, match=r"conf\.csv: no confidence for prompt id 3"):
        conf.check_covers([1, 3])
    with pytest.raises(InputError, match="prompt id 7"):
        conf.of(7)


def test_csv_without_header(tmp_path):
    path = tmp_path / "conf.csv"
    path.write_text("1,0.25\n2,1\n")
    assert read_confidences(path) == {1: 0.25, 2: 1.0}


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompt_id,confidence\n1,0.5\n2\n", "line 3: expected 2 fields"),
        ("1,0.5\nx,0.2\n", "line 2: prompt_id 'x' is not an integer"),
        ("1,abc\n", "line 1: confidence 'abc' is not a number"),
        ("1,1.5\n", r"line 1: confidence 1.5 is not in \[0, 1\]"),
        ("1,0.2\n1,0.3\n", "line 2: prompt id 1 appears twice"),
        ("prompt_id,confidence\n", "no confidences"),
    ],
)
def test_malformed_csv_names_the_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        read_confidences(path)
    assert "bad.csv" in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_confidences(tmp_path / "nope.csv")

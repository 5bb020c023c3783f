"""Progress bars: drawn on stderr only when it is a terminal, never into stdout's results. The tests check
the on/off decision and where bars go, not what a bar looks like."""

from __future__ import annotations

import asyncio
import io
import sys

import pytest
from test_engine import FakeExecutor
from test_loadgen import CASCADE, write_profile

from diffsim.cli import main
from diffsim.progress import progress_bar, progress_enabled
from diffsim.server import worker
from diffsim.server.startup import ServeOptions, StartupProgress, build_engine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def test_progress_only_on_a_terminal():
    assert progress_enabled(Terminal()) is True
    assert progress_enabled(io.StringIO()) is False  # a pipe or a log file
    assert progress_enabled(object()) is False  # no isatty at all
    assert progress_enabled(Closed()) is False
    assert progress_bar(stream=Terminal(), total=3).disable is False
    assert progress_bar(stream=io.StringIO(), total=3).disable is True
    assert progress_bar(stream=Terminal(), enabled=False, total=3).disable is True  # --no-progress
    assert progress_bar(stream=io.StringIO(), enabled=True, total=3).disable is True  # still a terminal only


def test_the_default_stream_is_stderr(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress_enabled() is True
    with progress_bar(total=2, desc="x") as bar:
        bar.update(2)
    assert "x" in terminal.getvalue()


def test_trace_info_prints_the_same_results_with_a_bar(tmp_path, capsys, monkeypatch):
    # a bar on a terminal goes to stderr only: stdout is byte for byte what it is without one
    from diffsim.workload import traces

    path = tmp_path / "t.csv"
    path.write_text("".join(f"{i * 10},{i % 7}\n" for i in range(300)))
    monkeypatch.setattr(traces, "DEFAULT_CHUNK_ROWS", 50)
    assert main(["trace", "info", str(path)]) == 0
    plain = capsys.readouterr().out
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    import diffsim.progress

    made = diffsim.progress.progress_bar  # the commands' bars wait 1 s before drawing: here they draw at once
    monkeypatch.setattr(diffsim.progress, "progress_bar", lambda **kw: made(**{**kw, "delay": 0}))
    assert main(["trace", "info", str(path)]) == 0
    assert "reading" in terminal.getvalue()  # a bar was drawn, on stderr
    assert main(["trace", "convert", str(path), "--out", str(tmp_path / "o.csv")]) == 0
    assert "converting" in terminal.getvalue()
    out = capsys.readouterr().out
    assert out.startswith(plain) and out[len(plain):].startswith("wrote 300 requests")


def test_startup_steps_run_their_awaitables_and_count(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, whatever pytest's capture is

    async def go():
        progress = StartupProgress(2)
        assert progress.bar.disable  # stderr is not a terminal: no bar

        async def value():
            return 7

        assert await progress.step("one", value()) == 7
        with pytest.raises(RuntimeError):
            await progress.step("two", _fail())
        progress.close()

    async def _fail():
        raise RuntimeError("boom")

    asyncio.run(go())


@pytest.mark.parametrize("measure,swap", [(False, False), (True, False), (False, True), (True, True)])
def test_startup_counts_its_steps(tmp_path, monkeypatch, measure, swap):
    steps = []
    real_step = StartupProgress.step

    async def counting(self, desc, awaitable):
        steps.append(desc)
        return await real_step(self, desc, awaitable)

    monkeypatch.setattr(StartupProgress, "step", counting)
    totals = []
    real_init = StartupProgress.__init__
    monkeypatch.setattr(StartupProgress, "__init__", lambda self, n: (totals.append(n), real_init(self, n))[1])
    def measured(executor_of, ensure, batch_sizes, *, warmup, iters):  # what a worker measures, without timing
        table = {"batch_sizes": list(batch_sizes), "p50_ms": [10.0, 15.0], "p95_ms": [11.0, 16.0],
                 "p99_ms": [12.0, 17.0]}
        return {"models": {"sd-turbo": table, "sd-v1.5": table}, "discriminator": table,
                "load_s": {"light": 0.0, "heavy": 0.0}}

    monkeypatch.setattr(worker, "measure_profile", measured)
    options = ServeOptions(backend="cpu-tiny", cascade=CASCADE, gpus=2, batch_sizes=(1, 2), swap=swap,
                           gpu_profile="measure" if measure else str(write_profile(tmp_path / "p.yaml")),
                           measure_warmup=0, measure_iters=1)

    async def go():
        engine = await build_engine(options, executor_factory=lambda w, role, model: FakeExecutor(model, worker=w))
        await engine.stop(0.0)

    asyncio.run(go())
    # measuring: building and measuring; a swap is timed only when nothing measured the loads
    assert totals == [len(steps)] and len(steps) == 1 + 2 * measure + (swap and not measure)
    assert steps[-1].startswith("loading the first plan's models")

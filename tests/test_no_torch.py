"""``diffsim simulate``, ``compare`` and ``plan`` work where torch cannot be imported, and never try to.

Each command runs in a fresh interpreter whose import system refuses ``torch`` (and its usual
companions) and records every attempt; the command must succeed and the record must stay empty.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "torchvision", "diffusers", "transformers", "timm")

RUNNER = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    BLOCKED = {blocked!r}
    attempts = []

    class NoTorch(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    from diffsim import cli

    rc = cli.main(sys.argv[1:])
    if attempts:
        print("tried to import: " + ", ".join(sorted(set(attempts))), file=sys.stderr)
        sys.exit(3)
    sys.exit(rc)
    """
).format(blocked=BLOCKED)


def run_blocked(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *args], cwd=cwd, capture_output=True, text=True, timeout=240
    )


def test_simulate_without_torch(tmp_path):
    res = run_blocked("simulate", "--trace", "static.csv", "--out", str(tmp_path / "sim"), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "sim" / "summary.json").exists()
    assert (tmp_path / "sim" / "timeline.png").exists()


def test_compare_without_torch(tmp_path):
    res = run_blocked(
        "compare", "--trace", "static.csv", "--policies", "diffserve,clipper-light", "--jobs", "1",
        "--out", str(tmp_path / "cmp"), cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cmp" / "comparison.csv").exists()


def test_plan_without_torch(tmp_path):
    res = run_blocked("plan", "--demand", "20", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert '"threshold"' in res.stdout

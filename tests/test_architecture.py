"""The import rules of docs/architecture.md, checked on the source (every import, lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "torchvision", "diffusers", "transformers", "timm"}
# Where the heavy libraries may be imported, and only inside functions (outside backends/).
HEAVY_LAZY_OK = ("diffsim/commands/", "diffsim/profiling/profiler.py", "diffsim/quality/features.py")
DRIVERS = ("diffsim.simulator", "diffsim.server", "diffsim.commands", "diffsim.cli")


def modules():
    for path in sorted([*(ROOT / "diffsim").rglob("*.py"), *(ROOT / "backends").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        name = rel[:-3].replace("/", ".").removesuffix(".__init__")
        yield rel, name, path.name == "__init__.py", ast.parse(path.read_text(), rel)


def imports(name: str, is_pkg: bool, tree: ast.Module):
    """(absolute module, at module level?) for every import in the file."""
    package = name if is_pkg else name.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            yield target, id(node) in top_level
            for alias in node.names:  # "from pkg import module"
                yield f"{target}.{alias.name}", id(node) in top_level


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_rules_see_every_package():
    names = {name for _, name, _, _ in modules()}
    for package in ("diffsim.runtime", "diffsim.workload", "diffsim.reports", "diffsim.profiling",
                    "diffsim.server", "diffsim.commands", "backends"):
        assert package in names


def test_runtime_imports_no_driver_no_clock_no_io_library():
    bad = []
    for rel, name, is_pkg, tree in modules():
        if not under(name, "diffsim.runtime"):
            continue
        for target, _ in imports(name, is_pkg, tree):
            root = target.split(".")[0]
            if (any(under(target, d) for d in DRIVERS)
                    or any(under(target, p) for p in ("diffsim.workload", "diffsim.reports", "diffsim.profiling",
                                                      "diffsim.quality", "backends"))
                    or root in HEAVY | {"simpy", "asyncio", "threading", "time", "fastapi", "ray", "httpx"}):
                bad.append(f"{rel}: {target}")
    assert not bad, "the runtime layer must stay pure:\n" + "\n".join(bad)


def test_heavy_libraries_only_in_backends_or_lazily_where_allowed():
    bad = []
    for rel, name, is_pkg, tree in modules():
        for target, at_top in imports(name, is_pkg, tree):
            if target.split(".")[0] not in HEAVY or rel.startswith("backends/"):
                continue
            if at_top or not rel.startswith(HEAVY_LAZY_OK):
                bad.append(f"{rel}: {target}{' (module level)' if at_top else ''}")
    assert not bad, "torch and friends belong to backends/ (or a lazy import in a command):\n" + "\n".join(bad)


def test_drivers_do_not_import_each_other_and_ray_stays_optional():
    bad = []
    for rel, name, is_pkg, tree in modules():
        for target, at_top in imports(name, is_pkg, tree):
            if under(name, "diffsim.simulator") and (under(target, "diffsim.server") or under(target, "backends")):
                bad.append(f"{rel}: {target}")
            if under(name, "diffsim.server") and under(target, "diffsim.simulator"):
                bad.append(f"{rel}: {target}")
            if target.split(".")[0] == "ray" and (at_top and not name.endswith("ray_worker")):
                bad.append(f"{rel}: {target} (Ray only in diffsim/server/ray_worker.py, or lazily)")
    assert not bad, "\n".join(bad)


def test_backends_know_nothing_of_the_policy():
    bad = []
    for rel, name, is_pkg, tree in modules():
        if not rel.startswith("backends/"):
            continue
        for target, _ in imports(name, is_pkg, tree):
            if under(target, "diffsim") and not (under(target, "diffsim.errors") or under(target, "diffsim.quality")):
                bad.append(f"{rel}: {target}")
    assert not bad, "backends/ may use diffsim.errors and diffsim.quality only:\n" + "\n".join(bad)

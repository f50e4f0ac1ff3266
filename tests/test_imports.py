"""The import graph of the dds package, read statically (ast) from every import statement, function-local
ones included: no circle, and no import against the design's layering (the shared core imports no
stage, the offline pipeline neither the selector nor the trainer, and the selector, which other
people's training loops import, never reaches the trainer or the CLI).
"""
from __future__ import annotations

import ast
import tomllib
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("dds.pipeline", "dds.selector", "dds.train", "dds.cli")
#: importer -> the packages it must not import, directly (core: the modules directly in ``dds/``)
FORBIDDEN = {"core": STAGES, "dds.pipeline": ("dds.selector", "dds.train", "dds.cli"),
             "dds.selector": ("dds.train", "dds.cli"), "dds.train": ("dds.cli",)}


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every package pyproject.toml installs."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup["package-dir"]
    modules = {}
    for pkg in setup["packages"]:
        base = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len)
        folder = REPO / dirs[base] / pkg[len(base) + 1:].replace(".", "/")
        for f in folder.glob("*.py"):
            modules[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (``from P import name`` imports
    ``P``, and ``P.name`` when that is a module)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def group(module: str, path: Path) -> str:
    """``core`` for a plain module directly in ``dds/`` (not the CLI and its shared options, not
    ``dds.distributed``, which serves the stages' torchrun jobs), else the stage package ``module``
    belongs to, else ``module`` itself."""
    if module == "dds._cli_shared":
        return "dds.cli"
    if path.parent == REPO / "dds" and path.name != "__init__.py" and module not in ("dds.cli", "dds.__main__",
                                                                                     "dds.distributed"):
        return "core"
    return next((p for p in STAGES if module == p or module.startswith(p + ".")), module)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return package_modules()


@pytest.fixture(scope="module")
def graph(modules) -> dict[str, set[str]]:
    return import_graph(modules)


def test_the_graph_is_read(graph):
    assert {"dds.tables", "dds.selector._base", "dds.pipeline.index", "dds.train.loop", "dds.cli"} <= set(graph)
    assert "dds.tables" in graph["dds.pipeline.index"] and "dds.selector" in graph["dds.train.loop"]


def test_no_import_circle(graph):
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import circle: {' -> '.join(e.args[1])}")


def test_no_import_against_the_layering(modules, graph):
    groups = {m: group(m, path) for m, path in modules.items()}
    assert [groups[m] for m in ("dds.tables", "dds.distributed", "dds.pipeline.index", "dds.selector._base")] == [
        "core", "dds.distributed", "dds.pipeline", "dds.selector"]
    wrong = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                   if groups[b] in FORBIDDEN.get(groups[a], ()))
    assert not wrong
    reached = {groups[m] for m in reachable(graph, "dds.selector")}
    assert not reached & {"dds.train", "dds.cli"}


def test_a_circle_is_seen(tmp_path):
    """Two modules importing each other, one of them inside a function, make a circle."""
    for name, text in (("a", "from pkg import b\n"), ("b", "def f():\n    import pkg.a\n")):
        (tmp_path / f"{name}.py").write_text(text)
    graph = import_graph({"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"})
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    with pytest.raises(CycleError):
        tuple(TopologicalSorter(graph).static_order())


def test_the_scores_vocabulary_has_one_owner():
    """The selector's public names are the table module's objects, not copies."""
    import dds.selector
    import dds.tables

    assert dds.selector.REGIONS is dds.tables.REGIONS and dds.selector.STATUSES is dds.tables.STATUSES
    assert dds.selector.encode_regions is dds.tables.encode_regions

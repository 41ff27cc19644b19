"""The import floors of docs/ARCHITECTURE.md, checked on every module of the package.

Every import (module level, inside a function or under ``TYPE_CHECKING``) is read with ``ast``;
one that reaches a higher floor fails with the importing module, the line and the imported
module. So does a loop of imports that run (module level or lazy; an import under
``if TYPE_CHECKING:`` never runs, so it cannot close a loop, but it must still respect the floors).
Every module must also import on its own.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import kdsearch

ROOT = Path(kdsearch.__file__).resolve().parent
DOC = ROOT.parent / "docs" / "ARCHITECTURE.md"

# Mirrors the "Floors" table of docs/ARCHITECTURE.md (test_the_table_mirrors_the_doc keeps them equal).
# Keys are modules or packages (a package covers everything under it); the longest key wins.
FLOORS: dict[str, int] = {
    "kdsearch": 9,  # the package root only (every other module has a longer key)
    "kdsearch.cli": 8,
    "kdsearch.__main__": 8,
    "kdsearch.commands": 7,
    "kdsearch.report": 6,
    "kdsearch.export": 6,
    "kdsearch.finetune": 6,
    "kdsearch.modelcard": 6,
    "kdsearch.dashboard": 6,
    "kdsearch.progress": 6,
    "kdsearch.search": 5,
    "kdsearch.storage": 4,
    "kdsearch.storage_faults": 4,
    "kdsearch.rdb_snapshot": 4,
    "kdsearch.measure": 3,
    "kdsearch.measure.device": 3,
    "kdsearch.distill": 3,
    "kdsearch.models": 2,
    "kdsearch.data": 2,
    "kdsearch.checkpoint": 2,
    "kdsearch.config": 1,
    "kdsearch.models.registry": 1,
    "kdsearch.models.families": 1,
    "kdsearch.models.suggest": 1,
    "kdsearch.models.backbone": 1,
    "kdsearch.models.spec": 1,
    "kdsearch.errors": 0,
    "kdsearch._version": 0,
    "kdsearch.metrics": 0,
    "kdsearch.trial_record": 0,
    "kdsearch.pareto": 0,
    "kdsearch.device_record": 0,
    "kdsearch.constants": 0,
}


def _all_modules() -> dict[str, Path]:
    """Every module of the package -> its source file (packages: their ``__init__.py``)."""
    out = {"kdsearch": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="kdsearch."):
        rel = info.name.removeprefix("kdsearch.").replace(".", "/")
        path = ROOT / rel / "__init__.py" if info.ispkg else ROOT / f"{rel}.py"
        out[info.name] = path
    return out


MODULES = _all_modules()


def floor_of(module: str) -> int | None:
    """The floor of ``module``: its longest key in FLOORS (the root key only for the root itself)."""
    if module == "kdsearch":
        return FLOORS["kdsearch"]
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        key = ".".join(parts[:n])
        if key in FLOORS:
            return FLOORS[key]
    return None


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    typing_only: bool = False  # under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        return f"{self.source} (line {self.line}) imports {self.target}"


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it sits under ``if TYPE_CHECKING:``."""
    out: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def walk(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append((node, typing_only))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                walk(child, True)
            for child in node.orelse:
                walk(child, typing_only)
            return
        for child in ast.iter_child_nodes(node):
            walk(child, typing_only)

    walk(tree, False)
    return out


def imports_of(module: str) -> list[Edge]:
    """Every kdsearch module that ``module``'s source imports, wherever the import statement is."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    edges: list[Edge] = []
    for node, typing_only in _import_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = _package_of(module).split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in MODULES else base)
        for target in targets:
            if target == "kdsearch" or target.startswith("kdsearch."):
                # ``import kdsearch.a.b`` names a module; an unknown name is checked by its package.
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                edges.append(Edge(module, target, node.lineno, typing_only))
    return edges


EDGES = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_floor() -> None:
    missing = [m for m in MODULES if floor_of(m) is None]
    assert not missing, f"add these modules to the Floors table (docs/ARCHITECTURE.md and FLOORS): {missing}"


def test_no_import_runs_up_a_floor() -> None:
    bad = [
        f"{e} (floor {floor_of(e.source)} -> {floor_of(e.target)})"
        for edges in EDGES.values()
        for e in edges
        if floor_of(e.source) is not None and floor_of(e.target) is not None
        and floor_of(e.target) > floor_of(e.source)  # type: ignore[operator]
    ]
    assert not bad, "imports that run up the floors:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """Strongly connected components of the imports that run, with more than one module (or a
    module importing itself)."""
    graph = {m: sorted({e.target for e in EDGES[m] if not e.typing_only}) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle() -> None:
    cycles = _cycles()
    detail = [
        " <-> ".join(c) + ": " + "; ".join(str(e) for m in c for e in EDGES[m] if e.target in c and not e.typing_only)
        for c in cycles
    ]
    assert not cycles, "import cycles (lazy imports count too):\n" + "\n".join(detail)


def _doc_table() -> dict[str, int]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
    table: dict[str, int] = {}
    for row in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.M):
        floor, cells = int(row[0]), row[1]
        for name in re.findall(r"`([^`]+)`", cells):
            name = name.rstrip("/")
            table["kdsearch" if name == "__init__" else f"kdsearch.{name.replace('/', '.')}"] = floor
    return table


def test_the_table_mirrors_the_doc() -> None:
    assert _doc_table() == FLOORS


def test_the_checker_sees_lazy_imports() -> None:
    """The checker is not vacuous: it finds the package root's lazy import of the checkpoint
    module, and the imports of a command module made inside its ``run``."""
    assert any(e.target == "kdsearch.checkpoint" for e in EDGES["kdsearch"])
    lazy = {e.target for e in EDGES["kdsearch.commands.export"]}
    assert {"kdsearch.export", "kdsearch.storage", "kdsearch.commands.arguments"} <= lazy


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_the_package_root_is_light() -> None:
    """``import kdsearch`` loads neither torch nor Optuna (load_student comes on first use)."""
    code = (
        "import sys, kdsearch; "
        "heavy = [m for m in ('torch', 'optuna', 'timm', 'plotly') if m in sys.modules]; "
        "assert not heavy, heavy; print(kdsearch.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kdsearch.__version__

"""The layout's promises, checked on the source tree: the remat core imports no torch, no module under ``src/`` is
past 800 lines, and no two modules import each other (docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = sorted(SRC.joinpath("memfit").rglob("*.py"))
MAX_LINES = 800


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {_module_name(p): p for p in MODULES}


def _fresh_modules(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, timeout=120, cwd=SRC.parent,
    )  # fmt: skip
    return list(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("code", ["import memfit.remat.core", "import memfit.remat", "import memfit"])
def test_the_remat_core_imports_no_torch(code):
    """The Graph/Schedule core and the solvers know nothing of torch: importing them (and the package that
    re-exports them) loads no torch."""
    core = sorted(n for n in NAMES if n == "memfit.remat.core" or n.startswith("memfit.remat.core."))
    assert len(core) >= 8, core  # graph, schedule, graphs, solve, errors, solvers ...
    if code == "import memfit.remat.core":
        code = "\n".join(f"import {n}" for n in core)  # every module of the core, not only what it imports
    loaded = _fresh_modules(code)
    assert not [m for m in loaded if m == "torch" or m.startswith("torch.")], code
    assert "memfit.remat.core.graph" in loaded or code == "import memfit"


def test_the_torch_front_ends_do_load_torch():
    """The check above can fail: the eager front-end, outside the core, imports torch."""
    assert "torch" in _fresh_modules("import memfit.remat.eager.capture")


def test_no_module_is_past_800_lines():
    lengths = {_module_name(p): len(p.read_text().splitlines()) for p in MODULES}
    assert len(lengths) > 40
    assert {n: k for n, k in lengths.items() if k > MAX_LINES} == {}


def _imports(name: str, source: str, package: bool = False) -> set[str]:
    """The memfit modules that module ``name`` (its text ``source``) imports, at its top or inside a function (a
    deferred import still ties the two modules together), except under ``if TYPE_CHECKING`` (never run)."""
    base_package = name if package else name.rpartition(".")[0]
    tree = ast.parse(source)
    typing_only = {
        id(x)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for x in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = base_package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in NAMES else base)  # a submodule, else the module that holds the name
    return {m for m in found if m in NAMES and m != name}


def _module_imports(name: str) -> set[str]:
    path = NAMES[name]
    return _imports(name, path.read_text(), package=path.name == "__init__.py")


def test_import_scanner_sees_deferred_relative_and_package_imports():
    """The scanner behind the cycle check resolves ``from package import module`` to the module, follows relative
    and deferred imports, and skips ``TYPE_CHECKING`` ones."""
    assert {"memfit.remat.compiled.choose", "memfit._compat"} <= _module_imports(
        "memfit.remat.compiled.backend"
    )
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import _common\n"
        "if TYPE_CHECKING:\n"
        "    from memfit.memory._tracker import Tracker\n"
        "def plot():\n"
        "    from memfit.memory._plot import plot_timeline\n"
    )
    assert _imports("memfit.memory._report", source) == {"memfit.memory._common", "memfit.memory._plot"}


def test_no_two_modules_import_each_other():
    graph = {name: _module_imports(name) for name in NAMES}
    assert sum(map(len, graph.values())) > 50
    pairs = sorted({tuple(sorted((a, b))) for a, bs in graph.items() for b in bs if a in graph.get(b, ())})
    assert pairs == []

"""Every self-contained ```python block of README.md and docs/*.md runs as written.

A block is *self-contained* when every name it reads is defined in it (assigned, imported, a def/class, a loop or
``with`` target, an argument) or is a builtin: those are meant to run. The others are fragments of a larger
program (``model``, ``loader`` defined by the reader) and are listed, not run. docs/remat.md's blocks run in the
fast suite; all of them in the slow one (some train or capture a model).
"""

import ast
import builtins
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        line = text[: m.start()].count("\n") + 1
        out.append((f"{path.relative_to(ROOT)}:{line}", m.group(1)))
    return out


def free_names(code: str) -> set[str]:
    """Names the block reads but never defines (builtins excluded)."""
    tree = ast.parse(code)
    loaded, defined = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                defined.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return loaded - defined - set(dir(builtins))


def _all_blocks() -> list[tuple[str, str]]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [b for f in files for b in _blocks(f)]


def _runnable(prefix: str = "") -> list[tuple[str, str]]:
    return [
        (where, code) for where, code in _all_blocks() if where.startswith(prefix) and not free_names(code)
    ]


def _run(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def test_free_names_tells_fragments_from_programs():
    assert free_names("import torch\nx = torch.ones(2)\nprint(x)") == set()
    assert free_names("loss = loss_fn(model(x), y)") == {"loss_fn", "model", "x", "y"}
    assert free_names("def f(a):\n    return a + b\n") == {"b"}


def test_the_readme_remat_snippet_is_self_contained():
    """The README's ``memfit.remat.compile`` snippet defines the model it runs on (the slow test runs it)."""
    blocks = [code for where, code in _blocks(ROOT / "README.md") if "memfit.remat.compile(" in code]
    assert blocks
    for code in blocks:
        assert free_names(code) == set()


@pytest.mark.parametrize(
    ("where", "code"), _runnable("docs/remat.md"), ids=lambda v: v if ":" in str(v) else ""
)
def test_remat_doc_snippets_run(where, code, tmp_path, monkeypatch):
    _run(code, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), _runnable(), ids=lambda v: v if ":" in str(v) else "")
def test_every_self_contained_doc_snippet_runs(where, code, tmp_path, monkeypatch):
    _run(code, tmp_path, monkeypatch)

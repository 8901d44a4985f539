"""The product's import graph: no cycles, the core never imports the WebUI side, storage never imports the backend
interface, and the core stays importable without A1111 (read from the source with ast, imports under
`if TYPE_CHECKING:` left out since they never run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "extension" / "sdtrt"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    """Import nodes outside `if TYPE_CHECKING:` blocks."""
    found: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sdtrt":
                for alias in node.names:
                    target = resolve(f"{node.module}.{alias.name}") or resolve(node.module)
                    if target:
                        deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(t for a in node.names if a.name.split(".")[0] == "sdtrt" and (t := resolve(a.name)))
        deps.discard(name)
        graph[name] = {d for d in deps if d != "sdtrt"}  # the package itself holds only __version__
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_and_a_layer_break() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_core_never_imports_the_webui_side() -> None:
    graph = import_graph()
    breaks = {m: sorted(d for d in deps if d.startswith("sdtrt.webui"))
              for m, deps in graph.items() if not m.startswith("sdtrt.webui")}
    assert {m: d for m, d in breaks.items() if d} == {}


def test_storage_does_not_import_the_backend_interface() -> None:
    graph = import_graph()
    cache = {"sdtrt.storage.registry", "sdtrt.storage.key", "sdtrt.storage.manifest", "sdtrt.storage.lease", "sdtrt.storage.cleanup"}
    storage = [m for m in graph if m in cache or m.startswith("sdtrt.storage")]
    assert storage
    assert {m: sorted(d for d in graph[m] if d.startswith("sdtrt.backends")) for m in storage} == {m: [] for m in storage}


def test_every_core_module_imports_without_a1111_or_a_gpu() -> None:
    names = sorted(m for m in import_graph() if not m.startswith("sdtrt.webui") and m != "sdtrt.__main__")
    code = ("import sys; " + "; ".join(f"import {n}" for n in names) +
            "; bad = [m for m in sys.modules if m.split('.')[0] in ('modules', 'gradio', 'fastapi')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, timeout=300)

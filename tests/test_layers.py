"""The product's shape: its import graph has no cycles (imports made only for annotations, under `if TYPE_CHECKING:`,
count too: a cycle there is a cycle in the design), the core never imports the WebUI side, storage never imports the
backend interface, the core stays importable without A1111, the core is grouped into packages by job (few modules
left at the top) and no product file grows past a size one can read (all read from the source with ast)."""

from __future__ import annotations

import ast
import re
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


def _imports(tree: ast.AST, *, annotations: bool = True) -> list[ast.AST]:
    """Import nodes; with annotations=False those under `if TYPE_CHECKING:` (which never run) are left out."""
    found: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        if not annotations and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(*, annotations: bool = True) -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), annotations=annotations):
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


def test_no_import_cycles_not_even_for_annotations() -> None:
    assert cycles(import_graph()) == []


def test_the_core_never_imports_the_webui_side() -> None:
    graph = import_graph()
    breaks = {m: sorted(d for d in deps if d.startswith(("sdtrt.webui", "sdtrt.hosts")))
              for m, deps in graph.items() if not m.startswith(("sdtrt.webui", "sdtrt.hosts"))}
    assert {m: d for m, d in breaks.items() if d} == {}


def test_storage_does_not_import_the_backend_interface() -> None:
    graph = import_graph()
    cache = {"sdtrt.storage.registry", "sdtrt.storage.key", "sdtrt.storage.manifest", "sdtrt.storage.lease", "sdtrt.storage.cleanup"}
    storage = [m for m in graph if m in cache or m.startswith("sdtrt.storage")]
    assert storage
    assert {m: sorted(d for d in graph[m] if d.startswith("sdtrt.backends")) for m in storage} == {m: [] for m in storage}


def test_every_core_module_imports_without_a1111_or_a_gpu() -> None:
    names = sorted(m for m in import_graph(annotations=False)
                   if not m.startswith(("sdtrt.webui", "sdtrt.hosts")) and m != "sdtrt.__main__")
    code = ("import sys; " + "; ".join(f"import {n}" for n in names) +
            "; bad = [m for m in sys.modules if m.split('.')[0] in ('modules', 'gradio', 'fastapi')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, timeout=300)


#: The core's packages, one job each; everything else at the top is a shared leaf (constants, errors, profiles...).
PACKAGES = {"backends", "hosts", "models", "pipeline", "serving", "storage", "tools", "webui"}


def test_the_core_is_grouped_by_job() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert set(packages) == PACKAGES, packages


def test_the_storage_layer_uses_no_private_name_of_another_module() -> None:
    """Cleanup, publishing and the registry talk through public calls (no `registry._probe()` from cleanup)."""
    storage = PACKAGE / "storage"
    found = []
    for path in storage.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert found == []


MAX_LINES = 400


def test_no_product_file_is_longer_than_one_can_read() -> None:
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parents[1] / "scripts").glob("*.py")]
    long = {str(p.relative_to(PACKAGE.parents[1])): n for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_only_host_adapters_know_a_hosts_modules() -> None:
    """`modules.*` (A1111's and Forge's), `backend.*` (Forge's) and `networks` appear in sdtrt.hosts only."""
    host_roots = {"modules", "backend", "networks", "ldm", "sgm"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "hosts" in path.relative_to(PACKAGE).parts:
            continue
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            found += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] in host_roots]
    assert found == []


def test_the_architecture_picture_names_every_package() -> None:
    """docs/architecture.dot (the source of docs/architecture.svg) keeps up with the packages."""
    docs = PACKAGE.parents[1] / "docs"
    source = (docs / "architecture.dot").read_text(encoding="utf-8")
    named = set(re.findall(r'label="([a-z_]+)[\\ "]', source)) | set(re.findall(r"\b([a-z_]+)\s*\[label=", source))
    assert PACKAGES <= named, sorted(PACKAGES - named)
    assert (docs / "architecture.svg").stat().st_mtime >= 0 and "<svg" in (docs / "architecture.svg").read_text()

"""Which TensorRT API names the backend uses, and whether a TensorRT release still defines them.

A TensorRT Python bindings wheel (`tensorrt-cu12-bindings`, installable from PyPI without its libraries) is read
without importing it: pybind11 registers every class, method, property and enum member under a NUL-terminated
name in the extension module, so the set of identifier strings in `tensorrt_bindings/tensorrt.so` holds every name
the release defines. The linker may store a name as the tail of a longer one ("REFIT" inside "INCLUDE_REFIT"), so a
name counts as defined when some string ends with it: a removed name can hide behind a longer one that survived,
never the other way round (no false alarms).

The backend's TensorRT names are the attribute names its modules use that tensorrt-stubs (10.13) defines, less
Python's own (list.append, ...) and the package's own; names only looked up by string (`hasattr`, `getattr`,
`enum_member`) are feature detection, allowed to be missing.
"""

from __future__ import annotations

import ast
import builtins
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_DETECTORS = {"hasattr", "getattr", "enum_member"}


def binding_names(wheel: Path) -> list[str]:
    """Every identifier string of the bindings' extension module in `wheel`."""
    with zipfile.ZipFile(wheel) as zf:
        [member] = [n for n in zf.namelist() if re.fullmatch(r"tensorrt[^/]*/tensorrt[^/]*\.so", n)]
        data = zf.read(member)
    return sorted({s.decode() for s in data.split(b"\0") if _IDENT.fullmatch(s)})


def defined(name: str, names: Iterable[str]) -> bool:
    return any(s == name or s.endswith(name) for s in names)


def _defined(files: Iterable[Path], assigned_attributes: bool) -> set[str]:
    """Classes, functions and module/class-level names the files define; with `assigned_attributes`, also the
    attributes they assign (`self.x = ...`)."""
    out: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                out.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                out.update(t.id for t in targets if isinstance(t, ast.Name))
                if assigned_attributes:
                    out.update(t.attr for t in targets if isinstance(t, ast.Attribute))
    return out


def stub_names(stubs: Path) -> set[str]:
    """Classes, functions, methods, properties and enum members that the .pyi files under `stubs` define."""
    return _defined(stubs.rglob("*.pyi"), assigned_attributes=False)


def _python_names() -> set[str]:
    names = set(dir(builtins))
    for kind in (list, dict, set, str, bytes, int, float, tuple, memoryview, Path, object):
        names.update(dir(kind))
    return names


def own_names(package: Path) -> set[str]:
    """Names the package defines itself (functions, classes, attributes assigned on self, dataclass fields)."""
    return _defined(package.rglob("*.py"), assigned_attributes=True)


def used_names(sources: Mapping[str, str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(attribute names used, names only looked up by string), each name -> the files using it."""
    used: dict[str, set[str]] = {}
    detected: dict[str, set[str]] = {}
    for where, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute):
                used.setdefault(node.attr, set()).add(where)
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in _DETECTORS:
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            detected.setdefault(arg.value, set()).add(where)
    return used, detected


def missing_names(sources: Mapping[str, str], trt_names: set[str], release: list[str],
                  ignore: set[str]) -> dict[str, set[str]]:
    """The TensorRT names `sources` use that `release` does not define: name -> files."""
    used, _ = used_names(sources)
    return {name: where for name, where in sorted(used.items())
            if name in trt_names and name not in ignore and name not in _python_names()
            and not defined(name, release)}

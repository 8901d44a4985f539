"""Fake-only plumbing of the fake Forge Neo (not part of Neo): how tests/fake_neo sits on top of tests/fake_forge
(which sits on top of tests/fake_a1111).

- `FAKE_NEO`, `FAKE_FORGE`, `FAKE_A1111`: the three fake trees.
- `extend(namespace, "backend/utils.py", root=FAKE_FORGE)`: runs the fake Forge's (or fake A1111's) file of that
  path in the namespace of the Neo file calling it, which then redefines what Neo does differently. The Neo module
  keeps its own name and identity (`backend.utils` is one module, Neo's); the other tree's module is not imported.
- Neo has no `modules/sd_hijack.py` and no `modules/sd_models_config.py`. `without_absent(path)` turns a folder into
  a `modules.__path__` entry whose finder does not see those two names (so `import modules.sd_hijack` raises
  ModuleNotFoundError and `importlib.util.find_spec` returns None, as in Neo), through a path hook installed once.
- `borrowing()`: the fake A1111 files that the fakes borrow (A1111's processing classes, A1111's API routes) import
  `sd_hijack`/`sd_models_config` at their top; Neo's own copies of those files do not. While such a file is loaded,
  private stand-ins satisfy that import, and they are taken out again afterwards (not importable by anyone else).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from pathlib import Path

FAKE_NEO = Path(__file__).resolve().parent
FAKE_FORGE = FAKE_NEO.parent / "fake_forge"
FAKE_A1111 = FAKE_NEO.parent / "fake_a1111"

#: `modules.<name>` files that Neo's tree does not have (N @f95f632: `webui/modules/` has neither)
ABSENT = ("sd_hijack", "sd_models_config")
_MARK = "::without-neo-absent"


def extend(namespace: dict, relative: str, root: Path = FAKE_FORGE) -> None:
    path = root / relative
    code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
    exec(code, namespace)  # noqa: S102


class _WithoutAbsent:
    def __init__(self, path: str) -> None:
        self.path = path
        self._inner = importlib.machinery.FileFinder(
            path, (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES))

    def find_spec(self, fullname, target=None):  # type: ignore[no-untyped-def]
        if fullname.rpartition(".")[2] in ABSENT:
            return None
        return self._inner.find_spec(fullname, target)

    def invalidate_caches(self) -> None:
        self._inner.invalidate_caches()


def _hook(entry: str):  # type: ignore[no-untyped-def]
    if isinstance(entry, str) and entry.endswith(_MARK):
        return _WithoutAbsent(entry[:-len(_MARK)])
    raise ImportError("not a fake Neo path entry")


_hook.fake_neo = True  # type: ignore[attr-defined]


def without_absent(path: Path) -> str:
    if not any(getattr(h, "fake_neo", False) for h in sys.path_hooks):
        sys.path_hooks.insert(0, _hook)
    return str(path) + _MARK


def remove_hook() -> None:
    sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "fake_neo", False)]
    for key in [k for k in sys.path_importer_cache if isinstance(k, str) and k.endswith(_MARK)]:
        del sys.path_importer_cache[key]


class _NoHijack:
    def __init__(self) -> None:
        self.comments: list = []
        self.extra_generation_params: dict = {}

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return lambda *a, **k: None


_borrowing_depth = 0


@contextlib.contextmanager
def borrowing():
    """Private stand-ins for `modules.sd_hijack` / `modules.sd_models_config` while a borrowed fake A1111 file runs
    (re-entrant: a borrowed file may import another one)."""
    global _borrowing_depth
    import modules

    names = ("modules.sd_hijack", "modules.sd_models_config")
    if _borrowing_depth == 0:
        hijack = types.ModuleType(names[0])
        hijack.model_hijack = _NoHijack()  # type: ignore[attr-defined]
        config = types.ModuleType(names[1])
        config.find_checkpoint_config_near_filename = lambda info: None  # type: ignore[attr-defined]
        for name, module in zip(names, (hijack, config)):
            sys.modules[name] = module
            setattr(modules, name.rpartition(".")[2], module)
    _borrowing_depth += 1
    try:
        yield
    finally:
        _borrowing_depth -= 1
        if _borrowing_depth == 0:
            for name in names:
                sys.modules.pop(name, None)
                with contextlib.suppress(AttributeError):
                    delattr(modules, name.rpartition(".")[2])

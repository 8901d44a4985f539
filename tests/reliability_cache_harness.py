"""Shared pieces of the engine-cache reliability tests (tests/test_reliability_cache.py): a fake backend whose
plans can be checked for being whole, a system-call fault injector, and figure reporting.

Nothing here needs a GPU or a backend: `produce` writes bytes. Every plan carries a nonce from which its body is
generated, so a plan stitched from two builds, or cut short, is detected even when its size happens to match.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXT = Path(__file__).resolve().parents[1] / "extension"
if str(EXT) not in sys.path:
    sys.path.insert(0, str(EXT))

from sdtrt.backends.base import BuildResult
from sdtrt.fsutil import write_all
from sdtrt.storage.key import EngineKey
from sdtrt.storage.manifest import Manifest
from sdtrt.storage.registry import Registry

#: Full trial counts when set (CI); small ones otherwise, so a local run stays under a minute.
LONG = os.environ.get("SDTRT_LONG") == "1"
#: The lease used in tests: a waiter stops waiting for a silent lock holder after this long.
LEASE_S = 2.0
SOURCE = {"name": "v1-5-pruned.safetensors", "sha256": "ab" * 32}
PLAN_BYTES = 48 * 1024
DATA_BYTES = 4 * 1024
_MAGIC = b"SDTRTPLAN"


def trials(long: int, short: int) -> int:
    return long if LONG else short


def make_key(**changes: Any) -> EngineKey:
    fields: dict[str, Any] = {
        "family": "sd1",
        "arch_hash": "0f" * 8,
        "io": {"in_channels": 4, "context_dim": 768, "y_dim": None},
        "profiles": ("1x512x512x75:2x768x768x150:4x1024x1024x225",),
        "backend": "tensorrt",
        "backend_version": "10.13.0",
        "device": "NVIDIA A100",
        "compute_capability": "8.0",
        "refit_mode": "refit",
        "weights": "stripped",
        "export": {"dtype": "float16", "opset": 17},
    }
    fields.update(changes)
    return EngineKey(**fields)


def plan_bytes(nonce: bytes, size: int = PLAN_BYTES) -> bytes:
    head = _MAGIC + nonce
    return head + random.Random(nonce).randbytes(size - len(head))


def plan_is_whole(data: bytes, size: int = PLAN_BYTES) -> bool:
    """True if `data` is exactly one build's complete plan (not truncated, not mixed from two builds)."""
    if len(data) != size or not data.startswith(_MAGIC):
        return False
    nonce = data[len(_MAGIC) : len(_MAGIC) + 16]
    return data == plan_bytes(nonce, size)


def _write_file(path: Path, data: bytes, chunks: int = 1, pause: float = 0.0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        step = -(-len(data) // chunks)
        for i in range(0, len(data), step):
            write_all(fd, data[i : i + step])
            if pause:
                time.sleep(pause)
    finally:
        os.close(fd)


def make_produce(
    *,
    counter: Path | None = None,
    sleep: float = 0.0,
    chunks: int = 1,
    pause: float = 0.0,
    scratch: bool = True,
    on_start: Callable[[], None] | None = None,
) -> Callable[[Path], BuildResult]:
    """A backend stand-in writing a plan (unique nonce per build) and a data file with os.write, optionally in
    `chunks` with a `pause` after each (so a kill can land mid-file), plus a scratch folder it removes itself,
    as the real pipeline does with its ONNX folder. Each call appends a line to `counter` (O_APPEND)."""

    def produce(out: Path) -> BuildResult:
        if counter is not None:
            fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{os.getpid()}-{threading.get_ident()}\n".encode())
            finally:
                os.close(fd)
        if on_start is not None:
            on_start()
        if scratch:
            os.mkdir(out / "onnx")
            _write_file(out / "onnx" / "model.onnx", b"onnx" * 64)
        _write_file(out / "unet.plan", plan_bytes(os.urandom(16)), chunks, pause)
        if sleep:
            time.sleep(sleep)
        _write_file(out / "unet.data", b"weights!" * (DATA_BYTES // 8))
        if scratch:
            os.unlink(out / "onnx" / "model.onnx")
            os.rmdir(out / "onnx")
        return BuildResult(files=["unet.plan", "unet.data"], weights="stripped", refit_mode="refit")

    return produce


# ---- checks ------------------------------------------------------------------------------------------------


@dataclass
class CacheAudit:
    """What a cache folder holds, judged from outside the registry."""

    engines: list[str] = field(default_factory=list)
    #: engine folders visible under a final name that fail the full check or hold a plan that is not whole
    partial: list[str] = field(default_factory=list)
    #: manifest.json files (under final names or quarantine) that do not parse
    unreadable_manifests: list[str] = field(default_factory=list)
    temps: list[str] = field(default_factory=list)
    temp_bytes: int = 0
    quarantined: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def audit(root: Path) -> CacheAudit:
    a = CacheAudit()
    if not root.exists():
        return a
    reg = Registry(root)
    for name in sorted(os.listdir(root)):
        path = root / name
        if name == ".locks":
            continue
        if name.startswith(".tmp-"):
            a.temps.append(name)
            a.temp_bytes += sum(p.lstat().st_size for p in path.rglob("*")) if path.is_dir() else path.lstat().st_size
            continue
        if name.startswith(".quarantine-"):
            a.quarantined.append(name)
            continue
        if name.startswith("."):
            a.other.append(name)
            continue
        a.engines.append(name)
        manifest_file = path / "manifest.json"
        try:
            Manifest.from_json(manifest_file.read_bytes())
        except Exception:  # noqa: BLE001 - any failure to read or parse counts
            a.unreadable_manifests.append(name)
        try:
            m = reg.verify(name)
            extra_entries = set(os.listdir(path)) - {f.name for f in m.files} - {"manifest.json"}
            if extra_entries or not plan_is_whole((path / m.files[0].name).read_bytes()):
                a.partial.append(name)  # a stray (temp) file in a published folder counts as partial too
        except Exception:  # noqa: BLE001
            a.partial.append(name)
    return a


def _qualname(frame: Any) -> str:
    """'Class.method' of a frame: co_qualname (Python 3.11+), else rebuilt from `self`/`cls` (Python 3.10, what
    A1111 1.10 runs on), so sites read the same on both."""
    code = frame.f_code
    if hasattr(code, "co_qualname"):
        return str(code.co_qualname)
    owner = frame.f_locals.get("self", frame.f_locals.get("cls"))
    if owner is None:
        return str(code.co_name)
    klass = owner if isinstance(owner, type) else type(owner)
    for base in klass.__mro__:  # the class that defines the method, as co_qualname names it
        if code in {getattr(v, "__code__", None) for v in vars(base).values()}:
            return f"{base.__name__}.{code.co_name}"
    return f"{klass.__name__}.{code.co_name}"


def where(frame: Any) -> str:
    """The chain of sdtrt and fake-backend functions on the stack at `frame`, from Publisher.build (or the
    outermost one) down: 'Publisher.build > Publisher._build_new > Publisher._seal'. Shows which phase of a build a
    fault or kill hit."""
    chain = []
    while frame is not None:
        file = frame.f_code.co_filename
        if os.sep + "sdtrt" + os.sep in file or file.endswith("reliability_cache_harness.py"):
            chain.append(_qualname(frame))
        frame = frame.f_back
    chain.reverse()
    if "Publisher.build" in chain:
        chain = chain[chain.index("Publisher.build") :]
    return " > ".join(chain) or "?"


# ---- fault injection ---------------------------------------------------------------------------------------

#: The os functions a build writes through, and how each names the file it acts on.
INJECTABLE = ("open", "write", "fsync", "mkdir", "rename", "replace", "link")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


@dataclass
class Call:
    op: str
    index: int
    path: str
    #: where it was made from: the sdtrt/test functions on the stack, outermost first (see `where`)
    site: str
    #: mkdir of a folder that already exists (pathlib's mkdir(exist_ok=True) tolerates any error then)
    existed: bool = False


@dataclass
class Injector:
    """Wraps os.open/write/fsync/mkdir/rename/replace/link. Calls acting on files under `root` are counted per
    operation and recorded; the `fail` call (op, index) raises OSError(errno) instead of running. `short_writes`
    makes every os.write under `root` write at most a third of what it is given (a legal short write)."""

    root: Path
    fail: tuple[str, int] | None = None
    error: int = errno.ENOSPC
    short_writes: bool = False
    calls: list[Call] = field(default_factory=list)
    injected: Call | None = None

    def _under_root(self, path: object) -> str | None:
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return None
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        text = os.path.abspath(text) if text else ""
        root = str(self.root)
        return text if text == root or text.startswith(root + os.sep) else None

    def _hit(self, op: str, path: str) -> None:
        index = sum(1 for c in self.calls if c.op == op)
        call = Call(op, index, path, where(sys._getframe(2)), op == "mkdir" and os.path.isdir(path))
        self.calls.append(call)
        if self.fail == (op, index):
            self.injected = call
            raise OSError(self.error, os.strerror(self.error), path)

    @contextmanager
    def installed(self) -> Iterator[Injector]:
        real = {op: getattr(os, op) for op in INJECTABLE}
        lock = threading.Lock()

        def wrap(op: str) -> Callable[..., Any]:
            fn = real[op]

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if threading.current_thread().name == "sdtrt-build-heartbeat":
                    return fn(*args, **kwargs)
                if op == "open" and not (args[1] if len(args) > 1 else kwargs.get("flags", 0)) & _WRITE_FLAGS:
                    return fn(*args, **kwargs)
                path = self._under_root(args[0])
                if op in ("rename", "replace", "link"):
                    path = path or self._under_root(args[1])
                if path is not None:
                    with lock:
                        self._hit(op, path)
                    if op == "write" and self.short_writes:
                        data = memoryview(args[1])
                        return fn(args[0], data[: max(1, len(data) // 3)])
                return fn(*args, **kwargs)

            return wrapper

        for op in INJECTABLE:
            setattr(os, op, wrap(op))
        try:
            yield self
        finally:
            for op, fn in real.items():
                setattr(os, op, fn)


# ---- figures -----------------------------------------------------------------------------------------------


def report_figure(capsys: Any, name: str, **figures: Any) -> None:
    """Print a figure line to the terminal even under capture, and append it as JSON to $SDTRT_FIGURES if set."""
    line = {"figure": name, "long": LONG, **figures}
    with capsys.disabled():
        print(f"\nFIGURE {name}: " + json.dumps(figures, sort_keys=True))
    target = os.environ.get("SDTRT_FIGURES")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


@contextmanager
def read_only(root: Path) -> Iterator[list[str]]:
    """Simulate a read-only mount of `root`: every write-type os call on a path under it raises EROFS, as the
    kernel would (tests may run as root, where chmod 0555 stops nothing). Yields the refused calls."""
    ops = ("mkdir", "rmdir", "unlink", "rename", "replace", "link", "symlink", "utime", "open", "chmod")
    real = {op: getattr(os, op) for op in ops}
    refused: list[str] = []
    prefix = str(root)

    def under(path: object) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        text = os.path.abspath(os.fsdecode(path))
        return text == prefix or text.startswith(prefix + os.sep)

    def wrap(op: str) -> Callable[..., Any]:
        fn = real[op]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if op == "open" and not (args[1] if len(args) > 1 else kwargs.get("flags", 0)) & _WRITE_FLAGS:
                return fn(*args, **kwargs)
            paths = args[:2] if op in ("rename", "replace", "link", "symlink") else args[:1]
            if any(under(p) for p in paths):
                refused.append(f"{op} {os.fsdecode(args[0])}")
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(args[0]))
            return fn(*args, **kwargs)

        return wrapper

    for op in ops:
        setattr(os, op, wrap(op))
    try:
        yield refused
    finally:
        for op, fn in real.items():
            setattr(os, op, fn)

"""Which TensorRT library, and what it can do here: import and check `tensorrt` or `tensorrt_rtx`, read its version,
find the GPU it would run on, look features up by name; the result is a `LibraryHandle` that every other module of
this package takes as a parameter.

Typing: a handle's `trt` is typed by the `TensorRTModule` protocol, whose members are the classes of tensorrt-stubs
10.13, so mypy checks every call made through a handle against the stubs (and the assignment under TYPE_CHECKING
below proves that the stubs' `tensorrt` module has every member the protocol names). Members the 10.13 stubs lack
(IRuntimeCache, CudaGraphStrategy, ComputeCapability, SerializationFlag.INCLUDE_REFIT, ...) are reached with
`enum_member` or ``hasattr`` after a name check: features are detected by attribute and enum *names*, never by
version numbers or literal flag integers (STRONGLY_TYPED is 1 in 10.x, 0 in 11.x and RTX; STRIP_PLAN 19 versus 18).

Nothing is imported at import time: the library and torch are imported inside functions.
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast

from sdtrt.errors import BackendUnavailable

if TYPE_CHECKING:
    import tensorrt


class TensorRTModule(Protocol):
    """The members of a TensorRT library module this package uses, as tensorrt-stubs 10.13 types them. The real
    `tensorrt` and `tensorrt_rtx` modules both have them (RTX-only members are looked up by name instead)."""

    __name__: str
    Builder: type[tensorrt.Builder]
    OnnxParser: type[tensorrt.OnnxParser]
    ILogger: type[tensorrt.ILogger]
    IProgressMonitor: type[tensorrt.IProgressMonitor]  # absent from old releases: check with hasattr first
    NetworkDefinitionCreationFlag: type[tensorrt.NetworkDefinitionCreationFlag]
    BuilderFlag: type[tensorrt.BuilderFlag]
    MemoryPoolType: type[tensorrt.MemoryPoolType]
    SerializationFlag: type[tensorrt.SerializationFlag]
    Dims: type[tensorrt.Dims]
    Runtime: type[tensorrt.Runtime]
    Refitter: type[tensorrt.Refitter]
    Weights: type[tensorrt.Weights]
    TensorLocation: type[tensorrt.TensorLocation]
    TensorIOMode: type[tensorrt.TensorIOMode]


if TYPE_CHECKING:
    _STUBS_HAVE_EVERY_MEMBER: TensorRTModule = tensorrt


@dataclass(frozen=True)
class Library:
    """One TensorRT library as a backend sees it before importing it."""

    backend: str  # backend name, used in messages: "tensorrt", "tensorrt-rtx"
    module: str  # Python module
    install: str  # how to install it
    #: TensorRT-RTX: JIT-compiled kernels for the current GPU, a runtime cache and built-in CUDA graphs, where full
    #: TensorRT has timing caches and graphs captured by our GraphCache.
    rtx: bool


TENSORRT = Library(
    "tensorrt",
    "tensorrt",
    "pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com (tensorrt-cu13 for CUDA 13)",
    rtx=False,
)
TENSORRT_RTX = Library(
    "tensorrt-rtx", "tensorrt_rtx", "pip install tensorrt-rtx-cu12 (tensorrt-rtx-cu13 for CUDA 13)", rtx=True
)
KNOWN: tuple[Library, ...] = (TENSORRT, TENSORRT_RTX)


def library_of_module(module_name: str) -> Library:
    """The Library for a Python module name (an unknown name gets a generic install hint)."""
    for known in KNOWN:
        if known.module == module_name:
            return known
    return Library(module_name, module_name, f"pip install {module_name}", rtx=False)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _cuda_device() -> tuple[str, int, int]:
    """(name, major, minor) of the current CUDA device; BackendUnavailable without one."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
            "TensorRT needs an NVIDIA GPU and its driver"
        )
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), major, minor


def _import_library(library: Library) -> ModuleType:
    """Import the real library or raise BackendUnavailable. A module without `Builder` (e.g. the namespace package
    that tensorrt-stubs leaves behind) does not count as installed."""
    try:
        module = importlib.import_module(library.module)
    except Exception as exc:  # ImportError, or OSError when the shared libraries are missing
        raise BackendUnavailable(
            f"Python module {library.module!r} cannot be imported ({exc}); {library.install}"
        ) from exc
    if not hasattr(module, "Builder"):
        raise BackendUnavailable(
            f"Python module {library.module!r} is only type stubs or a partial install (no Builder); {library.install}"
        )
    return module


def unavailable_reason(library: Library) -> str | None:
    """None when `library` imports and a CUDA GPU is visible, else what is missing and how to fix it."""
    try:
        _import_library(library)
        _cuda_device()
    except BackendUnavailable as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class LibraryHandle:
    """An imported TensorRT library: what build.py, runner.py and backend.py call instead of a global module."""

    trt: TensorRTModule
    library: Library

    @property
    def name(self) -> str:
        """The backend name, for messages."""
        return self.library.backend

    @property
    def module_name(self) -> str:
        return self.trt.__name__

    @property
    def rtx(self) -> bool:
        return self.library.rtx

    @property
    def version(self) -> str:
        return str(getattr(self.trt, "__version__", "unknown"))

    def device(self) -> tuple[str, int, int]:
        """(name, major, minor) of the GPU this library runs on; BackendUnavailable without one."""
        return _cuda_device()

    def gpu_target(self) -> str | None:
        """The build target name of the visible GPU ("sm89"), None without one. Builds that refit or strip weights
        check the fresh plan on it, so they need it among their targets."""
        try:
            _, major, minor = self.device()
        except BackendUnavailable:
            return None
        return f"sm{major}{minor}"

    def targets(self) -> tuple[str, ...]:
        """The ahead-of-time targets this library builds for, from its ComputeCapability enum ("sm75", ...)."""
        enum = getattr(self.trt, "ComputeCapability", None)
        names = [n for n in dir(enum) if re.fullmatch(r"SM\d+", n)] if enum is not None else []
        return tuple(sorted((n.lower() for n in names), key=lambda t: int(t[2:])))

    def enum_member(self, enum_name: str, member: str) -> Any | None:
        """trt.<enum_name>.<member> when this library has it, else None (feature detection by name)."""
        return getattr(getattr(self.trt, enum_name, None), member, None)

    def cache_file(self, cache_dir: Path, kind: str) -> Path:
        """Caches are only valid for one library version and GPU, so both are in the name."""
        gpu, major, minor = self.device()
        return cache_dir / f"{kind}-{self.module_name}-{self.version}-{_slug(gpu)}-sm{major}{minor}.cache"


#: Handles made so far, by module name: a library is imported and checked once per process.
_BOUND: dict[str, LibraryHandle] = {}
_BOUND_LOCK = threading.Lock()


def open_library(library: Library) -> LibraryHandle:
    """The handle of `library`, importing it on first use; BackendUnavailable when it is not installed."""
    with _BOUND_LOCK:
        handle = _BOUND.get(library.module)
        if handle is None:
            handle = LibraryHandle(cast(TensorRTModule, _import_library(library)), library)
            _BOUND[library.module] = handle
        return handle

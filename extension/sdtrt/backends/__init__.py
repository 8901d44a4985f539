"""Backends: `tensorrt` (10.x, 11.x), `tensorrt-rtx` (1.x) and `onnxruntime`, behind one interface (base.py)."""

from __future__ import annotations

from sdtrt.backends.base import Backend
from sdtrt.errors import BackendUnavailable

#: Preference order for "auto": the fastest backend that can run here wins.
AUTO_ORDER = ("tensorrt", "tensorrt-rtx", "onnxruntime")
NAMES = AUTO_ORDER


def backend_class(name: str) -> type[Backend]:
    if name == "onnxruntime":
        from sdtrt.backends.ort import OrtBackend

        return OrtBackend
    if name in ("tensorrt", "tensorrt-rtx"):
        from sdtrt.backends.tensorrt import backend_for

        return backend_for(name)
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of: auto, {', '.join(NAMES)}")


def get_backend(name: str = "auto") -> Backend:
    """Instantiate a backend by name; "auto" picks the first available of AUTO_ORDER."""
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            cls = backend_class(candidate)
            reason = cls.unavailable_reason()
            if reason is None:
                return cls()
            reasons.append(f"{candidate}: {reason}")
        raise BackendUnavailable("no backend can run here:\n  " + "\n  ".join(reasons))
    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
    return cls()

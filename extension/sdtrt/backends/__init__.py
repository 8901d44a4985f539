"""Backends: `tensorrt` (10.x, 11.x), `tensorrt-rtx` (1.x) and `onnxruntime`, behind one interface (base.py).

`BACKENDS` is the one table of them; everything that lists backends (AUTO_ORDER, the CLI's and the WebUI's choices)
derives from it. What a backend can do is declared on its class (`Backend.capabilities`), never inferred from its
name. Classes are imported on first use, so this package imports on machines without the libraries.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from sdtrt.backends.base import Backend
from sdtrt.errors import BackendUnavailable

#: name -> "module:class", in preference order for "auto": the fastest backend that can run here wins.
BACKENDS: dict[str, str] = {
    "tensorrt": "sdtrt.backends.tensorrt:TensorRTBackend",
    "tensorrt-rtx": "sdtrt.backends.tensorrt:TensorRTRTXBackend",
    "onnxruntime": "sdtrt.backends.ort:OrtBackend",
}
AUTO_ORDER = tuple(BACKENDS)
NAMES = AUTO_ORDER
#: What a user may choose: "auto" or a backend name.
CHOICES = ("auto", *NAMES)


def backend_class(name: str) -> type[Backend]:
    target = BACKENDS.get(name)
    if target is None:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of: auto, {', '.join(NAMES)}")
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend) and cls.name == name):
        raise TypeError(f"{target} is not the Backend named {name!r}")
    return cls


def get_backend(name: str = "auto", *, targets: Sequence[str] = ()) -> Backend:
    """Instantiate a backend by name; "auto" picks the first available of AUTO_ORDER. With `targets` (an
    ahead-of-time build) a backend only needs to build here, not run."""
    def reason_of(cls: type[Backend]) -> str | None:
        return cls.build_unavailable_reason(targets) if targets else cls.unavailable_reason()

    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            cls = backend_class(candidate)
            reason = reason_of(cls)
            if reason is None:
                return cls()
            reasons.append(f"{candidate}: {reason}")
        raise BackendUnavailable("no backend can run here:\n  " + "\n  ".join(reasons))
    cls = backend_class(name)
    reason = reason_of(cls)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
    return cls()

"""What a TensorRT library logs: collected by a logger instead of printed, so that build and load errors quote the
library's own reason."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorrt

    from sdtrt.backends.tensorrt.library import LibraryHandle

#: How many library messages an error text quotes (the last ones: they name the cause).
QUOTED_MESSAGES = 8


class Messages:
    """The errors and warnings one logger received."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def add(self, error: bool, warning: bool, msg: str) -> None:
        if error:
            self.errors.append(msg)
        elif warning:
            self.warnings.append(msg)

    def text(self, fallback: str = "no error message from the library") -> str:
        return "; ".join(self.errors[-QUOTED_MESSAGES:]) or fallback


def make_logger(lib: LibraryHandle, messages: Messages) -> tensorrt.ILogger:
    """An ILogger of `lib` that collects into `messages`. Keep it referenced while the library may call it."""
    if TYPE_CHECKING:
        from tensorrt import ILogger  # the base class as the stubs type it
    else:
        ILogger = lib.trt.ILogger  # the base class of this library
    error = int(ILogger.Severity.ERROR)
    warning = int(ILogger.Severity.WARNING)

    class _Logger(ILogger):
        def __init__(self) -> None:
            ILogger.__init__(self)

        def log(self, severity: tensorrt.ILogger.Severity, msg: str) -> None:
            level = int(severity)
            messages.add(level <= error, level == warning, msg)

    return _Logger()

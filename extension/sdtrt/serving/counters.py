"""What /sdtrt/v1/status counts of serving: engine and PyTorch calls with their reasons, refits, the last error.
Updated from the generation thread, read from the API thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

#: Distinct fallback reasons kept in the counters (a long-running server sees many sizes).
MAX_REASONS = 64


@dataclass
class Counters:
    """What /sdtrt/v1/status reports. Updated from the generation thread, read from the API thread."""

    engine_calls: int = 0
    fallback_calls: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    refits: int = 0
    last_refit: dict[str, Any] | None = None
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def engine_call(self) -> None:
        with self._lock:
            self.engine_calls += 1

    def fallback(self, reason: str) -> None:
        with self._lock:
            self.fallback_calls += 1
            if reason not in self.fallback_reasons and len(self.fallback_reasons) >= MAX_REASONS:
                reason = "other reasons"
            self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1

    def refit(self, names: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.refits += 1
            self.last_refit = {"weights": names, "seconds": round(seconds, 4)}

    def error(self, text: str) -> None:
        with self._lock:
            self.last_error = text

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "engine_calls": self.engine_calls,
                "fallback_calls": self.fallback_calls,
                "fallback_reasons": dict(self.fallback_reasons),
                "refits": self.refits,
                "last_refit": self.last_refit,
                "last_error": self.last_error,
            }

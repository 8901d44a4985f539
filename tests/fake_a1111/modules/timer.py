from __future__ import annotations

import time


class Timer:
    def __init__(self, print_log=False):  # type: ignore[no-untyped-def]
        self.start = time.time()
        self.records: dict[str, float] = {}

    def record(self, category, extra_time=0, disable_log=False):  # type: ignore[no-untyped-def]
        self.records[category] = self.records.get(category, 0) + time.time() - self.start + extra_time
        self.start = time.time()

    def subcategory(self, name):  # type: ignore[no-untyped-def]
        import contextlib

        return contextlib.nullcontext()

    def summary(self):  # type: ignore[no-untyped-def]
        return f"{sum(self.records.values()):.1f}s"

    def reset(self):  # type: ignore[no-untyped-def]
        self.__init__()


startup_timer = Timer()

"""Error reporting. Like A1111 it prints and never raises; the fake also keeps every report in `reported`
(message, exception) so tests can assert that an extension's callback failed or not."""

from __future__ import annotations

import sys
import traceback

reported: list[tuple[str, BaseException | None]] = []


def report(message: str, *, exc_info: bool = False) -> None:
    exc = sys.exc_info()[1] if exc_info else None
    reported.append((message, exc))
    print(message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def display(e: BaseException, task: str, *, full_traceback: bool = False) -> None:
    reported.append((f"{task or 'error'}: {type(e).__name__}", e))
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)


def display_once(e: BaseException, task: str) -> None:
    display(e, task)


def run(code, task: str) -> None:  # type: ignore[no-untyped-def]
    try:
        code()
    except Exception as e:  # noqa: BLE001
        display(e, task)


def print_error_explanation(message: str) -> None:
    print(message, file=sys.stderr)

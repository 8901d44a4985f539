"""Reading the fields of a /sdapi/v1/txt2img|img2img request body as A1111 reads them (defaults for missing or null
fields, lists of prompts), with a 400-worthy CoverageError for a field of the wrong type or range."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sdtrt.errors import SdtrtError


class CoverageError(SdtrtError):
    """The request cannot be predicted (bad field types, unknown checkpoint)."""


def int_field(body: Mapping[str, Any], key: str, default: int, lo: int = 0, hi: int = 1 << 20) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise CoverageError(f"{key} must be a number, got {value!r}") from None
    if not lo <= number <= hi:
        raise CoverageError(f"{key} must be between {lo} and {hi}, got {number}")
    return number


def float_field(body: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = body.get(key, default)
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CoverageError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise CoverageError(f"{key} must be finite")
    return number


def text_field(body: Mapping[str, Any], key: str, default: str = "") -> str:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, list):  # A1111 takes a list of prompts too: one per image; the longest decides
        return max((str(v) for v in value), key=len, default=default)
    return str(value)

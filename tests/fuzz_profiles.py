"""atheris (libFuzzer) target for the profile parser.

Run:  python tests/fuzz_profiles.py -max_total_time=600 -print_final_stats=1   (any libFuzzer flags)

Each input becomes text (and, for some inputs, a non-text object) handed to Shape.parse and Profile.parse.
Allowed outcomes: a parsed profile that round-trips, renders engine shapes and obeys the bounds; or the parser's
own error, ProfileError (a ValueError). Anything else escaping (TypeError, IndexError, OverflowError,
RecursionError, a plain ValueError...) or a broken property is a crash: atheris prints it with the input and exits
non-zero. tests/test_profile_fuzz.py runs this for a bounded time with SEEDS as the starting corpus. (The tab's
multi-line parser wraps this one; hypothesis covers it there: importing it here would pull in torch.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extension"))

import torch  # noqa: E402,F401  (sdtrt.models needs it; imported before the hooks, which break its import)

atheris.enabled_hooks.add("RegEx")  # guide inputs through the shape regex
atheris.enabled_hooks.add("str")

with atheris.instrument_imports(include=["sdtrt"]):
    from sdtrt.errors import ProfileError
    from sdtrt.models import SgmUNet, TensorIO
    from sdtrt.profiles import (
        MAX_BATCH,
        MAX_CHUNKS,
        MAX_PIXELS,
        MIN_PIXELS,
        Profile,
        Shape,
    )

CONTRACT = SgmUNet(TensorIO(in_channels=4, context_dim=768, y_dim=2816))
NOT_TEXT = [None, 0, -1, 10**9, 1e9, float("nan"), float("inf"), b"1x512x512x75", ["1x512x512x75"], {"a": 1}]


def check_shape(s: Shape) -> None:
    assert 1 <= s.batch <= MAX_BATCH, s
    assert MIN_PIXELS <= s.height <= MAX_PIXELS and MIN_PIXELS <= s.width <= MAX_PIXELS, s
    assert s.height % 8 == 0 and s.width % 8 == 0, s
    assert 1 <= s.chunks <= MAX_CHUNKS, s


def check_profile(p: Profile) -> None:
    for s in (p.min, p.opt, p.max):
        check_shape(s)
    for f in ("batch", "height", "width", "chunks"):
        assert getattr(p.min, f) <= getattr(p.opt, f) <= getattr(p.max, f), (p, f)
    again = Profile.parse(str(p))
    assert again == p, (str(p), again)
    assert p.covers(p.opt) and p.covers(p.min) and p.covers(p.max)
    ranges = CONTRACT.engine_ranges(p)
    assert all(r.contains(r.opt) and r.contains(r.min) and r.contains(r.max) for r in ranges.values()), ranges


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 15)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()) if kind else None
    subject: object = NOT_TEXT[fdp.ConsumeIntInRange(0, len(NOT_TEXT) - 1)] if text is None else text
    try:
        p = Profile.parse(subject)  # type: ignore[arg-type]
    except ProfileError:
        pass
    else:
        check_profile(p)
    try:
        s = Shape.parse(subject)  # type: ignore[arg-type]
    except ProfileError:
        pass
    else:
        check_shape(s)
        assert Shape.parse(str(s)) == s


#: Starting points for a corpus folder (pass it as an argument): valid profiles and near misses.
SEEDS = ["1x512x512x75", "1x256x256x75:1x512x512x75:4x768x768x150", "2X64X64X150", " 1 x 64 x 64 x 1 ",
         "64x8192x8192x2400", "0x512x512x75", "1x512x512x75:", "1e9x512x512x75", "nan", "1x512x512x75\n# hires",
         "4x64x64x75:2x64x64x75:1x64x64x75", "1x65x64x75", "-1x64x64x75", "1x64x64x75:1x64x64x75:1x64x64x2401"]


def seed_bytes(text: str) -> bytes:
    """An input that one_input reads as `text`: ASCII-mode byte, the text, then the selector (taken from the end)."""
    return b"\x01" + text.encode("ascii") + b"\x01"


def _planted_bug() -> None:
    """SDTRT_FUZZ_PLANTED_BUG=1: the parser raises TypeError for some inputs, so the test can show that the
    harness reports an escaping exception (and is not silently passing everything)."""
    real = Profile.parse.__func__  # type: ignore[attr-defined]

    def buggy(cls: type[Profile], spec: str) -> Profile:
        if isinstance(spec, str) and "x7" in spec:
            raise TypeError("planted bug: not the parser's own error")
        return real(cls, spec)

    Profile.parse = classmethod(buggy)  # type: ignore[assignment, method-assign]


def main(argv: list[str]) -> None:
    if os.environ.get("SDTRT_FUZZ_PLANTED_BUG") == "1":
        _planted_bug()
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

"""The profile parser under fuzzing: whatever text or object it is handed, it
returns a profile that obeys the bounds and round-trips, or raises its own error, ProfileError (a ValueError).

hypothesis: arbitrary text, profile-like text built from hostile tokens (min > max, negative, 0, 1e9, NaN,
unicode digits...), non-text objects, valid profiles round-tripping, and the tab's multi-line parser.
atheris: tests/fuzz_profiles.py runs for a bounded time in a subprocess (SDTRT_ATHERIS_SECONDS, default 120 s with
SDTRT_LONG=1, else 5 s); the test fails if anything but ProfileError escapes; a planted bug shows the harness
would notice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sdtrt.constants import TOKENS_PER_CHUNK
from sdtrt.errors import ProfileError, SdtrtError
from sdtrt.models import SgmUNet, TensorIO
from sdtrt.profiles import MAX_BATCH, MAX_CHUNKS, MAX_PIXELS, MIN_PIXELS, Profile, Shape

LONG = os.environ.get("SDTRT_LONG") == "1"
EXAMPLES = 1000 if LONG else 200
ATHERIS_SECONDS = int(os.environ.get("SDTRT_ATHERIS_SECONDS") or (120 if LONG else 5))
TARGET = Path(__file__).resolve().parent / "fuzz_profiles.py"
CONTRACT = SgmUNet(TensorIO(in_channels=4, context_dim=768, y_dim=2816))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_the_parsers_error_is_a_value_error() -> None:
    assert issubclass(ProfileError, ValueError) and issubclass(ProfileError, SdtrtError)


def check(profile: Profile) -> None:
    """What every successfully parsed profile must satisfy."""
    for s in (profile.min, profile.opt, profile.max):
        assert 1 <= s.batch <= MAX_BATCH
        assert MIN_PIXELS <= s.height <= MAX_PIXELS and MIN_PIXELS <= s.width <= MAX_PIXELS
        assert s.height % 8 == 0 and s.width % 8 == 0
        assert 1 <= s.tokens <= MAX_CHUNKS * TOKENS_PER_CHUNK
    for f in ("batch", "height", "width", "chunks"):
        assert getattr(profile.min, f) <= getattr(profile.opt, f) <= getattr(profile.max, f)
    assert Profile.parse(str(profile)) == profile
    assert profile.covers(profile.min) and profile.covers(profile.opt) and profile.covers(profile.max)
    for r in CONTRACT.engine_ranges(profile).values():
        assert r.contains(r.min) and r.contains(r.opt) and r.contains(r.max)


def parse_or_own_error(spec: object) -> Profile | None:
    try:
        profile = Profile.parse(spec)  # type: ignore[arg-type]
    except ProfileError as e:
        assert str(e)  # says what was wrong
        return None
    check(profile)
    return profile


def shape_or_own_error(spec: object) -> Shape | None:
    try:
        shape = Shape.parse(spec)  # type: ignore[arg-type]
    except ProfileError:
        return None
    assert Shape.parse(str(shape)) == shape
    return shape


# ---- hostile input -------------------------------------------------------------------------------------------
@FUZZ
@given(st.text())
@example("")
@example("\x00")
@example("1x512x512x75\x00")
@example("x" * 100_000)
@example(" " * 100_000 + "1")
@example("1:" * 50_000)
def test_arbitrary_text_gives_a_profile_or_profile_error(text: str) -> None:
    parse_or_own_error(text)
    shape_or_own_error(text)


NUMBERS = st.one_of(
    st.integers(-10, 10_000).map(str), st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["0", "-0", "00", "000064", "1e9", "1E9", "1000000000", "999999", "9" * 7, "NaN", "nan", "inf",
                     "-inf", "Infinity", "1.5", "64.0", "0x40", "0b1", "1_000", "+1", "٥١٢", "５１２", "²", "Ⅻ", "",
                     "8192", "8200", "2400", "2401", "64", "65"]),
)
SEPARATORS = st.sampled_from(["x", "X", "x", "x", "×", "*", " x ", "\tx\t", "xx", ",", ""])


@st.composite
def profile_like(draw: st.DrawFn) -> str:
    def shape() -> str:
        parts = [draw(NUMBERS) for _ in range(draw(st.sampled_from([4, 4, 4, 3, 5])))]
        return "".join(p + (draw(SEPARATORS) if i < len(parts) - 1 else "") for i, p in enumerate(parts))

    n = draw(st.sampled_from([1, 3, 3, 2, 4]))
    return draw(st.sampled_from([":", ":", "::", " : ", ";"])).join(shape() for _ in range(n))


@FUZZ
@given(profile_like())
@example("4x64x64x75:2x64x64x75:1x64x64x75")  # min > max
@example("1x64x64x75:1x64x64x150:1x64x64x75")  # opt > max (chunks)
@example("0x512x512x75")
@example("-1x512x512x75")
@example("1000000000x512x512x75")
@example("1x1000000000x512x75")
@example("1x512x512x1000000000")
@example("NaNx512x512x75")
@example("1x512.5x512x75")
def test_profile_like_text_gives_a_profile_or_profile_error(text: str) -> None:
    parse_or_own_error(text)
    shape_or_own_error(text)


@FUZZ
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                 st.binary(), st.lists(st.text(), max_size=3), st.dictionaries(st.text(), st.integers(), max_size=2),
                 st.tuples(st.integers())))
def test_non_text_raises_profile_error(value: object) -> None:
    with pytest.raises(ProfileError):
        Profile.parse(value)  # type: ignore[arg-type]
    with pytest.raises(ProfileError):
        Shape.parse(value)  # type: ignore[arg-type]


# ---- valid profiles round-trip -------------------------------------------------------------------------------
PIXELS = st.integers(MIN_PIXELS // 8, MAX_PIXELS // 8).map(lambda n: n * 8)
SHAPES = st.builds(Shape, st.integers(1, MAX_BATCH), PIXELS, PIXELS, st.integers(1, MAX_CHUNKS * TOKENS_PER_CHUNK))


@st.composite
def valid_profiles(draw: st.DrawFn) -> Profile:
    """Three random shapes, each field sorted across them: min <= opt <= max holds field by field."""
    a, b, c = draw(SHAPES), draw(SHAPES), draw(SHAPES)
    fields = [sorted(getattr(s, f) for s in (a, b, c)) for f in ("batch", "height", "width", "tokens")]
    shapes = [Shape(*(fields[f][i] for f in range(4))) for i in range(3)]
    return Profile(*shapes) if not draw(st.booleans()) else Profile.static(shapes[1])


def spaced(text: str, draw: Callable[[st.SearchStrategy[str]], str]) -> str:
    """The same profile as a user might type it: spaces around numbers, upper-case X."""
    out = []
    for ch in text:
        if ch == "x":
            ch = draw(st.sampled_from(["x", "X", " x ", "x "]))
        out.append(ch)
    return draw(st.sampled_from(["", " ", "\t"])) + "".join(out) + draw(st.sampled_from(["", " ", "\n"]))


@FUZZ
@given(valid_profiles(), st.data())
def test_valid_profiles_round_trip(profile: Profile, data: st.DataObject) -> None:
    check(profile)
    text = str(profile)
    assert Profile.parse(text) == profile
    assert Profile.parse(spaced(text, data.draw)) == profile
    assert profile.is_static == (":" not in text)


@FUZZ
@given(valid_profiles(), st.sampled_from(["batch", "height", "width", "tokens"]))
def test_min_above_max_is_refused(profile: Profile, field: str) -> None:
    lo, hi = getattr(profile.min, field), getattr(profile.max, field)
    if field == "tokens":  # only the chunk count is ordered; tokens within one chunk are not
        if profile.min.chunks == profile.max.chunks:
            return
    elif lo == hi:
        return
    swap = {"min": profile.max, "opt": profile.opt, "max": profile.min}
    text = ":".join(str(swap[k]) for k in ("min", "opt", "max"))
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        Profile.parse(text)


@pytest.mark.parametrize("text", [
    "0x512x512x75", "65x512x512x75", "1x0x512x75", "1x56x512x75", "1x8200x512x75", "1x512x513x75", "1x512x512x0",
    "1x512x512x2401", "1x512x512x75:1x512x512x75", "1x512x512x75::1x512x512x75", "1x512x512", "1x512x512x75x1",
    "1e9x512x512x75", "1000000000x512x512x75", "nanx512x512x75", "1x512x512x75;1x512x512x75", "",
])
def test_out_of_range_and_malformed_profiles_say_why(text: str) -> None:
    with pytest.raises(ProfileError) as e:
        Profile.parse(text)
    assert len(str(e.value)) < 500 and "Traceback" not in str(e.value)


# ---- the tab's multi-line parser ------------------------------------------------------------------------------
@FUZZ
@given(st.lists(st.one_of(profile_like(), st.text(max_size=40), st.just("# comment"),
                          valid_profiles().map(str)), max_size=6).map("\n".join))
def test_tab_text_parser_gives_profiles_or_its_own_error(text: str) -> None:
    from sdtrt.webui.tab import profiles_from_text

    try:
        specs = profiles_from_text(text)
    except SdtrtError:  # ProfileError naming the line, or "no profiles"
        return
    for spec in specs:
        parse_or_own_error(spec)


# ---- atheris --------------------------------------------------------------------------------------------------
def run_atheris(seconds: int, tmp_path: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the target for `seconds` from the SEEDS corpus (written by the target's own seed_bytes)."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('t', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "[open(f'{sys.argv[2]}/seed{i}', 'wb').write(m.seed_bytes(t)) for i, t in enumerate(m.SEEDS)]")
    subprocess.run([sys.executable, "-c", code, str(TARGET), str(corpus)], check=True, capture_output=True)
    proc = subprocess.run(
        [sys.executable, str(TARGET), f"-max_total_time={seconds}", "-print_final_stats=1", "-rss_limit_mb=4096",
         "-timeout=10", str(corpus)],
        check=False, capture_output=True, text=True, timeout=seconds + 120, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(ATHERIS_SECONDS + 180)
def test_atheris_finds_nothing_but_profile_error(tmp_path: Path) -> None:
    rc, out = run_atheris(ATHERIS_SECONDS, tmp_path)
    assert rc == 0 and "Uncaught Python exception" not in out, out[-4000:]
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    rate = re.search(r"stat::average_exec_per_sec:\s*(\d+)", out)
    assert runs and int(runs.group(1)) > 0, out[-2000:]
    print(f"profile parser fuzzing (atheris): {ATHERIS_SECONDS} s, {int(runs.group(1))} executions "
          f"({rate.group(1) if rate else '?'} per s), only ProfileError raised")


@pytest.mark.timeout(240)
def test_atheris_harness_reports_an_escaping_exception(tmp_path: Path) -> None:
    rc, out = run_atheris(60, tmp_path, {"SDTRT_FUZZ_PLANTED_BUG": "1"})
    assert rc != 0 and "Uncaught Python exception" in out and "planted bug" in out, out[-3000:]

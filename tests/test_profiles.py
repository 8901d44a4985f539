"""Profiles in user units and their engine shapes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdtrt.errors import ProfileError
from sdtrt.models import LdmUNet, SgmUNet, TensorIO
from sdtrt.profiles import Profile, Shape, select_profile, token_chunks


def test_static_is_min_equals_opt_equals_max() -> None:
    p = Profile.parse("2x512x768x150")
    assert p.is_static and p.min == p.opt == p.max == Shape(2, 512, 768, 150)
    assert str(p) == "2x512x768x150"


def test_engine_units_double_the_batch_for_cfg_and_count_77_rows_per_chunk() -> None:
    p = Profile.parse("1x512x512x75:2x768x768x150:4x1024x1024x225")
    r = LdmUNet(TensorIO(4, 768, None)).engine_ranges(p)
    assert r["sample"].min == (1, 4, 64, 64)  # cond and uncond called separately
    assert r["sample"].opt == (4, 4, 96, 96)
    assert r["sample"].max == (8, 4, 128, 128)
    assert r["encoder_hidden_states"].min == (1, 77, 768)
    assert r["encoder_hidden_states"].max == (8, 231, 768)
    assert "y" not in r
    rx = SgmUNet(TensorIO(4, 2048, 2816)).engine_ranges(p)
    assert rx["y"].max == (8, 2816)


def test_a_call_outside_every_profile_selects_none() -> None:
    c = LdmUNet(TensorIO(4, 768, None))
    ranges = [c.engine_ranges(Profile.parse("1x512x512x75")), c.engine_ranges(Profile.parse("1x768x768x75"))]
    assert select_profile(ranges, c.call_dims(Shape(1, 768, 768, 75))) == 1
    assert select_profile(ranges, c.call_dims(Shape(1, 512, 512, 75), cfg=False)) == 0
    assert select_profile(ranges, c.call_dims(Shape(1, 512, 512, 150))) is None
    assert select_profile(ranges, c.call_dims(Shape(2, 512, 512, 75))) is None


@pytest.mark.parametrize("spec, message", [
    ("4x512x512x75:2x512x512x75:1x512x512x75", "min <= opt <= max"),
    ("1x512x512x75:1x1024x512x75:1x768x512x75", "height must satisfy"),
    ("1x513x512x75", "not a multiple of 8"),
    ("1x512x500x75", "use 496 or 504"),
    ("0x512x512x75", "batch 0"),
    ("1x512x512x0", "tokens 0"),
    ("1x32x512x75", "between 64"),
    ("1x512x512", "BxHxWxT"),
    ("1x512x512x75:1x512x512x75", "min:opt:max"),
    ("nan", "BxHxWxT"),
    ("", "BxHxWxT"),
    ("1e9x512x512x75", "BxHxWxT"),
])
def test_bad_profiles_give_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        Profile.parse(spec)


@given(st.text(max_size=60))
def test_parser_raises_only_its_own_error(text: str) -> None:
    try:
        p = Profile.parse(text)
    except ProfileError:
        return
    assert Profile.parse(str(p)) == p


@given(st.integers(1, 64), st.integers(8, 1024), st.integers(8, 1024), st.integers(1, 2400))
def test_round_trip_and_chunks(b: int, h8: int, w8: int, t: int) -> None:
    shape = Shape(b, h8 * 8, w8 * 8, t)
    try:
        shape.validate()
    except ProfileError:
        return
    assert Shape.parse(str(shape)) == shape
    assert token_chunks(t) == math.ceil(t / 75)

"""Optimization profiles in the units WebUI users see, and their translation into engine tensor shapes.

User units: batch = images per batch, height/width in pixels (multiples of 8), tokens as A1111 counts them
(75 per chunk). A profile is ``BxHxWxT`` (static: min = opt = max) or ``min:opt:max`` of those.

Engine units (the shape ranges of each engine input) belong to the model contract of the architecture
(`sdtrt.models`): a UNet sees batch N = B (cond and uncond in separate calls) up to 2B (batched with CFG), latents
of H/8 x W/8 and 77 context rows per chunk.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sdtrt.constants import LATENT_FACTOR, TOKENS_PER_CHUNK
from sdtrt.errors import ProfileError

#: Bounds that keep a typo (1e9) from reaching the builder. Pixel limits match what A1111's sliders allow.
MAX_BATCH = 64
MIN_PIXELS = 64
MAX_PIXELS = 8192
MAX_CHUNKS = 32

_SHAPE_RE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$", re.ASCII)

Dims = tuple[int, ...]


def token_chunks(tokens: int) -> int:
    """Number of 77-row context chunks A1111 makes for a prompt of `tokens` tokens (at least one)."""
    return max(1, math.ceil(tokens / TOKENS_PER_CHUNK))


@dataclass(frozen=True, order=True)
class Shape:
    """One point of a profile: images per batch, pixel height and width, prompt tokens."""

    batch: int
    height: int
    width: int
    tokens: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        if not isinstance(text, str):
            raise ProfileError(f"a shape must be text like '1x512x512x75', got {text!r}")
        m = _SHAPE_RE.match(text)
        if not m:
            raise ProfileError(
                f"shape {text!r} is not BxHxWxT (batch x height x width x tokens), e.g. '1x512x768x75'"
            )
        shape = cls(*(int(g) for g in m.groups()))
        shape.validate()
        return shape

    def validate(self) -> None:
        if not 1 <= self.batch <= MAX_BATCH:
            raise ProfileError(f"batch {self.batch} must be between 1 and {MAX_BATCH}")
        for name, px in (("height", self.height), ("width", self.width)):
            if px % LATENT_FACTOR:
                raise ProfileError(
                    f"{name} {px} is not a multiple of {LATENT_FACTOR}; "
                    f"use {px - px % LATENT_FACTOR} or {px - px % LATENT_FACTOR + LATENT_FACTOR}"
                )
            if not MIN_PIXELS <= px <= MAX_PIXELS:
                raise ProfileError(f"{name} {px} must be between {MIN_PIXELS} and {MAX_PIXELS} pixels")
        if not 1 <= self.tokens <= MAX_CHUNKS * TOKENS_PER_CHUNK:
            raise ProfileError(f"tokens {self.tokens} must be between 1 and {MAX_CHUNKS * TOKENS_PER_CHUNK}")

    @property
    def chunks(self) -> int:
        return token_chunks(self.tokens)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // LATENT_FACTOR, self.width // LATENT_FACTOR

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}x{self.tokens}"


@dataclass(frozen=True)
class Profile:
    """min/opt/max in user units. Static is min = opt = max."""

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        for field in ("batch", "height", "width", "chunks"):
            lo, mid, hi = (getattr(s, field) for s in (self.min, self.opt, self.max))
            if not lo <= mid <= hi:
                raise ProfileError(
                    f"profile {self}: {field} must satisfy min <= opt <= max, got {lo}, {mid}, {hi}"
                )

    @classmethod
    def static(cls, shape: Shape) -> Profile:
        return cls(shape, shape, shape)

    @classmethod
    def parse(cls, spec: str) -> Profile:
        if not isinstance(spec, str):
            raise ProfileError(f"a profile must be text like '1x512x512x75', got {spec!r}")
        parts = spec.split(":")
        if len(parts) == 1:
            return cls.static(Shape.parse(parts[0]))
        if len(parts) == 3:
            return cls(*(Shape.parse(p) for p in parts))
        raise ProfileError(f"profile {spec!r} must be BxHxWxT or min:opt:max, each BxHxWxT")

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max

    def covers(self, shape: Shape) -> bool:
        """Whether a generation of `shape` (images per batch, pixels, tokens) fits in this profile."""
        return all(
            getattr(self.min, f) <= getattr(shape, f) <= getattr(self.max, f)
            for f in ("batch", "height", "width", "chunks")
        )

    def __str__(self) -> str:
        if self.is_static:
            return str(self.min)
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class TensorRange:
    """min/opt/max shape of one engine input."""

    name: str
    min: Dims
    opt: Dims
    max: Dims

    def contains(self, dims: Dims) -> bool:
        return len(dims) == len(self.min) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min, dims, self.max)
        )


def select_profile(ranges: list[dict[str, TensorRange]], dims: dict[str, Dims]) -> int | None:
    """Index of the first profile whose ranges contain every given input shape, or None."""
    for i, profile in enumerate(ranges):
        if all(name in profile and profile[name].contains(d) for name, d in dims.items()):
            return i
    return None

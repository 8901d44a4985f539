"""Forge's copy of k-diffusion: `external.ForgeScheduleLinker` here, the samplers (`sampling`) are the fake A1111's
(tests/fake_a1111/k_diffusion/sampling.py: Euler and Euler a, as k-diffusion computes them)."""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "fake_a1111" / "k_diffusion"))  # type: ignore[name-defined]

from k_diffusion import external, sampling  # noqa: F401

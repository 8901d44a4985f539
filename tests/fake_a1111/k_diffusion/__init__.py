"""Minimal stand-in for crowsonkb/k-diffusion: `external.CompVisDenoiser`/`CompVisVDenoiser` and the Euler samplers."""

from k_diffusion import external, sampling  # noqa: F401

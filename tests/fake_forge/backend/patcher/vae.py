"""Fake `backend/patcher/vae.py` VAE: 4 latent channels, encode/decode by the fake A1111's deterministic VAE
(`fake_vae`: no weights)."""

from __future__ import annotations

import a1111_fakes


class VAE:
    latent_channels = 4

    def __init__(self, model=None):  # type: ignore[no-untyped-def]
        self.first_stage_model = model

    def encode(self, images):  # type: ignore[no-untyped-def]
        return a1111_fakes.module("fake_vae").encode(images)

    def decode(self, latents):  # type: ignore[no-untyped-def]
        return a1111_fakes.module("fake_vae").decode(latents)

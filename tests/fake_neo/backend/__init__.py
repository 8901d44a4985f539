"""Fake Forge Neo `backend` package (see tests/fake_neo/README.md): this folder first (Neo's ComfyUI-style patcher,
memory management, utils, args, the engine base, the sampling's model loading, the UNet's inner modifiers), then the
fake Forge's `backend/` for what Neo kept (KModel, k_prediction, the UNet, ControlNet, CLIP/VAE patchers, loader)."""

import fake_neo_overlay as _overlay

__path__.append(str(_overlay.FAKE_FORGE / "backend"))  # type: ignore[name-defined]

"""Neo's `backend.diffusion_engine`: this folder first, then the fake Forge's `backend/diffusion_engine/`."""

import fake_neo_overlay as _overlay

__path__.append(str(_overlay.FAKE_FORGE / "backend" / "diffusion_engine"))  # type: ignore[name-defined]

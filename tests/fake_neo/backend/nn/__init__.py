"""Neo's `backend.nn`: this folder first, then the fake Forge's `backend/nn/`."""

import fake_neo_overlay as _overlay

__path__.append(str(_overlay.FAKE_FORGE / "backend" / "nn"))  # type: ignore[name-defined]

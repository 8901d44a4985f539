"""Neo's `backend.sampling`: this folder first, then the fake Forge's `backend/sampling/`."""

import fake_neo_overlay as _overlay

__path__.append(str(_overlay.FAKE_FORGE / "backend" / "sampling"))  # type: ignore[name-defined]

"""Neo's `backend.patcher`: this folder first, then the fake Forge's `backend/patcher/`."""

import fake_neo_overlay as _overlay

__path__.append(str(_overlay.FAKE_FORGE / "backend" / "patcher"))  # type: ignore[name-defined]

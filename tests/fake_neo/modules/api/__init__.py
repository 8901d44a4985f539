"""Neo's `modules.api` package: this folder first (`api.py`), then the fake A1111's (`models.py`, ...)."""

import fake_neo_overlay as _overlay

__path__.append(str(_overlay.FAKE_A1111 / "modules" / "api"))  # type: ignore[name-defined]

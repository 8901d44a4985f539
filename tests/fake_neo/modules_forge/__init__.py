"""Fake Neo `modules_forge`: this folder first (`forge_version`, `packages/comfy`), then the fake Forge's
(`main_entry`, `shared_options`)."""

import fake_neo_overlay as _overlay

__path__.append(str(_overlay.FAKE_FORGE / "modules_forge"))  # type: ignore[name-defined]

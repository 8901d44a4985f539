"""Neo's sd_forge_lora `network.py`: as the fake Forge's stand-in (the fake Forge's file, run here)."""

import fake_neo_overlay as _overlay

_overlay.extend(globals(), "extensions-builtin/sd_forge_lora/network.py")

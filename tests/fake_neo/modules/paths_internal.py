"""Neo's install/data paths: the fake Forge's file run here, so the install folder (`script_path`) is tests/fake_neo
and the built-in extensions are Neo's (`extensions-builtin/sd_forge_lora` with Neo's LoRA flow, `sd_forge_controlnet`,
`sd_forge_compile`)."""

import fake_neo_overlay as _overlay

_overlay.extend(globals(), "modules/paths_internal.py")

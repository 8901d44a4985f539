"""A1111's options (the fake A1111's `shared_options`) plus what Forge registers from `modules_forge/shared_options.py`
(`forge_unet_storage_dtype`, `forge_additional_modules`, `forge_preset`, ...), as Forge's shared_options.py does at
its end."""

from __future__ import annotations

from modules import a1111

_base = a1111("shared_options")
globals().update({k: v for k, v in vars(_base).items() if not k.startswith("__")})

from modules_forge import shared_options as forge_shared_options

forge_shared_options.register(_base.options_templates, _base.options_section, _base.OptionInfo)

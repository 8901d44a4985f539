"""Forge's hidden options (`modules_forge/shared_options.py`), registered by modules/shared_options.py."""

from __future__ import annotations


def register(options_templates, options_section, OptionInfo):  # type: ignore[no-untyped-def]
    options_templates.update(options_section((None, "Forge Hidden options"), {
        "forge_unet_storage_dtype": OptionInfo("Automatic"),
        "forge_inference_memory": OptionInfo(1024),
        "forge_async_loading": OptionInfo("Queue"),
        "forge_pin_shared_memory": OptionInfo("CPU"),
        "forge_preset": OptionInfo("sd"),
        "forge_additional_modules": OptionInfo([]),
    }))

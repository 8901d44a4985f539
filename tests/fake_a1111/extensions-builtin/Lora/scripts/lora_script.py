"""The built-in Lora extension's script: patches torch layers at import (LoraPatches), assigns layer names on model
load, registers the 'lora' extra network (alias 'lyco') in on_before_ui, undoes the patches on script unload, adds
its settings at import time and GET /sdapi/v1/loras + POST /sdapi/v1/refresh-loras (no --api-auth) on app start."""

from __future__ import annotations

import extra_networks_lora
import lora_patches
import networks
from modules import extra_networks, script_callbacks, shared


def unload():  # type: ignore[no-untyped-def]
    networks.originals.undo()


def before_ui():  # type: ignore[no-untyped-def]
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")


networks.originals = lora_patches.LoraPatches()

script_callbacks.on_model_loaded(networks.assign_network_names_to_compvis_modules)
script_callbacks.on_script_unloaded(unload)
script_callbacks.on_before_ui(before_ui)

shared.options_templates.update(shared.options_section(("extra_networks", "Extra Networks"), {
    "sd_lora": shared.OptionInfo("None", "Add network to prompt", refresh=networks.list_available_networks),
    "lora_preferred_name": shared.OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
    "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext"),
    "lora_show_all": shared.OptionInfo(False, "Always show all networks on the Lora page"),
    "lora_hide_unknown_for_versions": shared.OptionInfo([], "Hide networks of unknown versions for model versions"),
    "lora_in_memory_limit": shared.OptionInfo(0, "Number of Lora networks to keep cached in memory"),
    "lora_not_found_warning_console": shared.OptionInfo(False, "Lora not found warning in console"),
    "lora_not_found_gradio_warning": shared.OptionInfo(False, "Lora not found warning popup in webui"),
}))
shared.options_templates.update(shared.options_section(("compatibility", "Compatibility"), {
    "lora_functional": shared.OptionInfo(False, "Lora/Networks: use old method that takes longer when you have "
                                                "multiple Loras active and produces same results as kohya-ss/sd-webui-"
                                                "additional-networks extension"),
}))


def create_lora_json(obj):  # type: ignore[no-untyped-def]
    return {"name": obj.name, "alias": obj.alias, "path": obj.filename, "metadata": obj.metadata}


def api_networks(_, app):  # type: ignore[no-untyped-def]
    @app.get("/sdapi/v1/loras")
    async def get_loras():  # type: ignore[no-untyped-def]
        return [create_lora_json(obj) for obj in networks.available_networks.values()]

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():  # type: ignore[no-untyped-def]
        return networks.list_available_networks()


script_callbacks.on_app_started(api_networks)

if networks.extra_network_lora is None:
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
networks.list_available_networks()

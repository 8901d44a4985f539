"""Stand-in of Forge's sd_forge_lora `scripts/lora_script.py`: registers the 'lora' extra network in on_before_ui and
adds its settings at import."""

from __future__ import annotations

import extra_networks_lora
import networks
from modules import extra_networks, script_callbacks, shared


def before_ui():  # type: ignore[no-untyped-def]
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)


script_callbacks.on_before_ui(before_ui)

shared.options_templates.update(shared.options_section(("extra_networks", "Extra Networks"), {
    "sd_lora": shared.OptionInfo("None", "Add network to prompt", refresh=networks.list_available_networks),
    "lora_preferred_name": shared.OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
    "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext"),
}))

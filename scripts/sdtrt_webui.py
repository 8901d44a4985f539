"""WebUI glue for sd-webui-trt: SD Unet options, the always-on script that brackets each generation, settings, the
TensorRT tab and the /sdtrt/v1 routes. The Host adapter over the host's modules is sdtrt.hosts.a1111 in A1111 and
sdtrt.hosts.forge in Forge (which never calls an SdUnet: the adapter patches the UNet for each sampling pass); the
logic lives in sdtrt.webui."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT / "extension") not in sys.path:
    sys.path.insert(0, str(_ROOT / "extension"))

import torch
from modules import script_callbacks, scripts, sd_unet, shared

from sdtrt.errors import SdtrtError
from sdtrt.hosts import FORGE, running_host
from sdtrt.hosts.a1111 import A1111Host, loaded_model
from sdtrt.webui import host as H
from sdtrt.webui.service import OptionSpec, service

log = logging.getLogger("sdtrt")

ON_FORGE = running_host() == FORGE
if ON_FORGE:
    from sdtrt.hosts.forge import ForgeHost

    HOST: A1111Host = ForgeHost()
else:
    HOST = A1111Host()


class _SdUnetModule(torch.nn.Module):
    """A1111's `sd_unet.SdUnet` for hosts that dropped it (Forge Neo keeps the SD Unet options but never calls one)."""

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass


class TrtUnet(getattr(sd_unet, "SdUnet", None) or _SdUnetModule):  # type: ignore[misc]
    """What A1111 routes every UNet forward to while one of our options is selected."""

    def __init__(self, spec: OptionSpec):
        super().__init__()
        self.spec = spec
        self.server: Any = None
        self.model: Any = None  # the WebUI model the server was made for

    def activate(self) -> None:
        svc = service()
        self.model = loaded_model()
        self.server = svc.make_server(self.spec)  # never raises: problems become PyTorch fallback
        try:
            svc.activate(self.server, self.spec.label)
        except Exception as e:
            log.exception("sdtrt: activating %s failed", self.spec.label)
            self.server.unusable = f"activation failed: {e}"

    def forward(self, x: Any, timesteps: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
        if self.server is None:  # a host that forgot activate()
            self.activate()
        if loaded_model() is not self.model:
            return self._after_model_change(x, timesteps, context, *args, **kwargs)
        return self.server(x, timesteps, context, *args, **kwargs)

    def _after_model_change(self, *args: Any, **kwargs: Any) -> Any:
        """Another model is loaded than the one this server was made for, and A1111 did not say so: with
        sd_checkpoints_limit > 1 it brings back a model kept in memory (refiner, hires checkpoint) without the
        load callbacks. Apply the SD Unet A1111 picks for that model now, and run the call there."""
        try:
            _reapply_unet()
        except Exception:
            log.exception("sdtrt: re-applying SD Unet for the model brought back from memory failed")
        current = sd_unet.current_unet
        if current is self:  # the same option stays: a server for the model loaded now
            self.activate()
            return self.server(*args, **kwargs)
        if current is not None:
            return current.forward(*args, **kwargs)
        host = HOST
        unet = host.torch_unet()
        if unet is None:
            raise SdtrtError("no model is loaded to run the UNet call")
        return host.torch_forward(unet)(*args, **kwargs)

    def deactivate(self) -> None:
        if self.server is not None:
            service().deactivate(self.server)


class TrtOption(sd_unet.SdUnetOption):
    def __init__(self, spec: OptionSpec):
        self.spec = spec
        self.label = spec.label
        self.model_name = spec.model_name

    def create_unet(self) -> TrtUnet:
        return TrtUnet(self.spec)


class TrtScript(scripts.Script):
    """Always on: brackets each generation so settings are read once per generation (override_settings apply)
    and fallback notices reach that generation's result."""

    def title(self) -> str:
        return "TensorRT"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        return []

    def process(self, p: Any, *args: Any) -> None:
        if ON_FORGE:  # a generation that failed before its postprocess may have left its patch in
            HOST.stop_serving()  # type: ignore[attr-defined]
        service().begin(p)

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        """Fired right after A1111 loaded this pass's LoRAs (again for the hires pass): refit before sampling."""
        service().apply_networks()

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        service().before_sampling()
        if ON_FORGE:
            _serve_forge_pass(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        try:
            service().end(p)
        finally:
            if ON_FORGE:
                HOST.stop_serving()  # type: ignore[attr-defined]


def _serve_forge_pass(p: Any, reload_for: Any = None) -> None:
    """Forge: this sampling pass's UNet calls to the active engine (`reload_for`: see ForgeHost.serve_with)."""
    current = sd_unet.current_unet
    if isinstance(current, TrtUnet) and current.server is not None and current.server.enabled():
        unserved = HOST.serve_with(p, current, reload_for)  # type: ignore[attr-defined]
        if unserved is not None:
            service().activation.notify(unserved)


def on_cfg_denoiser(params: Any) -> None:
    """Forge: after a refiner switch in the middle of sampling, the rest of the pass on the refiner's engine (the
    SD Unet the WebUI picks for the refiner, its LoRAs refitted), as a new pass would be."""
    p = getattr(getattr(params, "denoiser", None), "p", None)
    svc = service()
    if p is None or svc.generation is None or not HOST.model_changed_mid_pass():  # type: ignore[attr-defined]
        return
    try:
        current = sd_unet.current_unet
        if not isinstance(current, TrtUnet) or current.model is not loaded_model():
            _reapply_unet()
        svc.apply_networks()
        svc.before_sampling()
        _serve_forge_pass(p, params.x)
    except Exception:
        log.exception("sdtrt: serving the refiner after Forge's switch failed; it runs on PyTorch")


# ---- callbacks ----------------------------------------------------------------------------------------------
def on_list_unets(unet_list: list[Any]) -> None:
    try:
        unet_list.extend(TrtOption(spec) for spec in service().unet_options())
    except Exception:
        log.exception("sdtrt: cannot list engines")


def on_model_loaded(sd_model: Any) -> None:
    """Offer the engines of the new checkpoint. Mid-generation (SDXL refiner, hires checkpoint) A1111 reloads
    with another config and does not re-apply the SD Unet; we do, so that model runs on its engine too."""
    svc = service()
    if svc.generation is not None:
        try:
            _reapply_unet()
        except Exception:
            log.exception("sdtrt: re-applying SD Unet after a model load failed")
    else:
        svc.refresh_list()


def _reapply_unet() -> None:
    """List the engines of the model loaded now and apply the SD Unet A1111 picks for it (a new option object,
    so A1111 activates it even when the label is the same)."""
    service().refresh_list()
    sd_unet.apply_unet()


SECTION = ("sdtrt", "TensorRT")


def setting_infos() -> dict[str, Any]:
    try:
        import gradio as gr

        dropdown, radio = gr.Dropdown, gr.Radio
    except ImportError:  # API-only hosts without gradio: the settings still exist, with default components
        dropdown = radio = None
    return {
        H.OPT_ENABLED: shared.OptionInfo(True, "Run the UNet on TensorRT engines when an engine is selected in "
                                         "SD Unet (off: PyTorch, as without this extension)", section=SECTION),
        H.OPT_BACKEND: shared.OptionInfo("auto", "Engine backend", dropdown,
                                         {"choices": list(H.BACKEND_CHOICES)}, section=SECTION),
        H.OPT_CACHE_DIR: shared.OptionInfo("", "Engine cache folder (empty: models/Unet-sdtrt or $SDTRT_CACHE); "
                                           "may be shared between machines", section=SECTION,
                                           onchange=service().refresh_list),
        H.OPT_FALLBACK: shared.OptionInfo("pytorch", "When no engine profile covers a UNet call", radio,
                                          {"choices": list(H.FALLBACK_CHOICES)}, section=SECTION),
        H.OPT_CUDA_GRAPHS: shared.OptionInfo(True, "CUDA graphs: replay each engine call as one captured graph "
                                             "(faster; turn off if a driver misbehaves). Engines are reloaded "
                                             "at the next generation", section=SECTION),
    }


def on_ui_settings() -> None:
    """Registered here (always seen, also after Reload UI) and at import below (so that `GET /sdapi/v1/options`
    lists them in --nowebui too: A1111 builds its options model before on_ui_settings runs there)."""
    for key, info in setting_infos().items():
        shared.opts.add_option(key, info)


def on_ui_tabs() -> list[Any]:
    from modules import sd_models

    from sdtrt.webui.tab import create_tab

    def titles() -> list[str]:
        return sorted(i.title for i in sd_models.checkpoints_list.values())

    def current() -> str | None:
        """The loaded checkpoint, or the one the WebUI is about to load (the UI is built before the model)."""
        ref = HOST.loaded_checkpoint()
        if ref is not None:
            return ref.title
        info = sd_models.checkpoint_aliases.get(shared.opts.data.get("sd_model_checkpoint", ""))
        return info.title if info is not None else None

    return [(create_tab(service(), titles, current), "TensorRT", "sdtrt")]


def on_app_started(demo: Any, app: Any) -> None:
    from sdtrt.webui.api import mount, parse_api_auth, webui_exposed

    # exposed: listening beyond localhost without --api-auth refuses the routes that change the cache (403)
    mount(app, service(), parse_api_auth(getattr(shared.cmd_opts, "api_auth", None)),
          exposed=webui_exposed(shared.cmd_opts))
    # what builds killed with an earlier WebUI left in the cache; in the background (a slow network share)
    threading.Thread(target=service().collect_garbage, name="sdtrt-gc", daemon=True).start()


def on_script_unloaded() -> None:
    """Reload UI re-executes this file: hand the UNet back to PyTorch so no instance of the old classes stays."""
    if isinstance(sd_unet.current_unet, TrtUnet):
        try:
            sd_unet.apply_unet("None")
        except Exception:
            log.exception("sdtrt: deactivating before reload failed")


service().attach(HOST)
if getattr(shared, "options_templates", None) is not None and hasattr(shared, "options_section"):
    shared.options_templates.update(shared.options_section(SECTION, setting_infos()))
script_callbacks.on_list_unets(on_list_unets)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(on_script_unloaded)
if ON_FORGE:
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser)

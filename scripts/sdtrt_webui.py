"""A1111 glue for sd-webui-trt: the Host adapter over `modules.*`, SD Unet options, the always-on script that
brackets each generation, settings, the TensorRT tab and the /sdtrt/v1 routes. The logic lives in sdtrt.webui."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT / "extension") not in sys.path:
    sys.path.insert(0, str(_ROOT / "extension"))

from modules import script_callbacks, scripts, sd_unet, shared

from sdtrt.constants import TOKENS_PER_CHUNK
from sdtrt.errors import SdtrtError
from sdtrt.webui import host as H
from sdtrt.webui.service import OptionSpec, service

log = logging.getLogger("sdtrt")


def _loaded_model() -> Any:
    """The loaded model without triggering A1111's lazy load (None while none is loaded)."""
    from modules import sd_models

    return getattr(sd_models.model_data, "sd_model", None)


def _ref(info: Any) -> H.CheckpointRef:
    from modules import sd_models_config

    config = sd_models_config.find_checkpoint_config_near_filename(info)
    return H.CheckpointRef(title=info.title, model_name=info.model_name, filename=info.filename,
                           sha256=getattr(info, "sha256", None), config=config)


class A1111Host(H.HostDefaults):
    def settings(self) -> H.Settings:
        data = shared.opts.data
        return H.Settings.from_options(lambda key, default: data.get(key, default))

    def models_dir(self) -> Path:
        from modules import paths

        return Path(paths.models_path)

    def device(self) -> Any:
        from modules import devices

        return devices.device

    def torch_unet(self) -> Any:
        model = _loaded_model()
        return None if model is None else model.model.diffusion_model

    def torch_forward(self, unet: Any) -> Any:
        from modules import sd_hijack

        original = sd_hijack.ldm_original_forward
        try:
            import sgm.modules.diffusionmodules.openaimodel as sgm_openaimodel

            if isinstance(unet, sgm_openaimodel.UNetModel):
                original = sd_hijack.sgm_original_forward
        except ImportError:
            pass
        return functools.partial(original, unet)

    def lowvram(self) -> bool:
        model = _loaded_model()
        return bool(getattr(model, "lowvram", False))

    def loaded_checkpoint(self) -> H.CheckpointRef | None:
        model = _loaded_model()
        info = getattr(model, "sd_checkpoint_info", None)
        return None if info is None else _ref(info)

    def checkpoints(self) -> list[H.CheckpointRef]:
        from modules import sd_models

        return [_ref(info) for info in list(sd_models.checkpoints_list.values())]

    def resolve_checkpoint(self, name: str) -> H.CheckpointRef:
        from modules import sd_models

        info = sd_models.checkpoint_aliases.get(name)
        if info is None:
            info = next((i for i in sd_models.checkpoints_list.values() if name in (i.model_name, i.name_for_extra)),
                        None)
        if info is None:
            known = ", ".join(sorted(i.title for i in sd_models.checkpoints_list.values())) or "none"
            raise SdtrtError(f"unknown checkpoint {name!r}; the WebUI lists: {known}")
        return _ref(info)

    def refresh_unet_list(self) -> None:
        sd_unet.list_unets()

    @contextlib.contextmanager
    def quiet_torch(self, waiting: Any) -> Any:
        """A1111's queue lock (generations, checkpoint switches) and its model-load lock (the first load, which
        runs in a thread at startup with torch patched) together. Always queue lock first, and never wait for the
        queue lock while holding the model lock, so no A1111 thread can deadlock with us."""
        from modules import call_queue, sd_models

        queue = call_queue.queue_lock
        loading = getattr(getattr(sd_models, "model_data", None), "lock", None) or contextlib.nullcontext()
        said = None
        while True:
            if not queue.acquire(blocking=False):
                said = _say(waiting, said, "waiting for the generation in progress to finish")
                queue.acquire()
            if _try_acquire(loading):
                break
            queue.release()
            said = _say(waiting, said, "waiting for the WebUI to finish loading the model")
            with loading:  # until the load is done; then take both again
                pass
        try:
            yield
        finally:
            _release(loading)
            queue.release()

    def option(self, key: str, default: Any) -> Any:
        """A WebUI option's value, A1111's own default when config.json lacks it."""
        opts = shared.opts
        data = getattr(opts, "data", None) or {}
        if key in data:
            return data[key]
        info = (getattr(opts, "data_labels", None) or {}).get(key)
        return default if info is None else getattr(info, "default", default)

    def set_option(self, key: str, value: Any) -> None:
        """Set and save a WebUI option, as the Settings tab does (setting the value it has already is fine)."""
        if self.option(key, None) == value:
            return
        try:
            taken = shared.opts.set(key, value)
        except AssertionError as e:  # --freeze-settings
            raise SdtrtError(f"the WebUI's settings are frozen (--freeze-settings): {e}") from None
        if not taken:
            raise SdtrtError(f"the WebUI did not take the setting {key}={value!r}")
        shared.opts.save(shared.config_filename)

    def closest_checkpoint(self, name: str) -> H.CheckpointRef | None:
        """A checkpoint as A1111 looks up hires and refiner checkpoints (its closest match), or None."""
        from modules import sd_models

        info = sd_models.get_closet_checkpoint_match(name)
        return None if info is None else _ref(info)

    def apply_styles(self, text: str, styles: list[str], negative: bool) -> str:
        """`text` with the named styles applied, as processing applies them."""
        prompt_styles = getattr(shared, "prompt_styles", None)
        if not styles or prompt_styles is None:
            return text
        apply = prompt_styles.apply_negative_styles_to_prompt if negative else prompt_styles.apply_styles_to_prompt
        return str(apply(text, styles))

    def prompt_chunks(self, text: str, negative: bool, steps: int = 20) -> int:
        """77-row chunks of a prompt's conditioning, counted the way A1111's token counter counts (extra networks
        removed, AND parts and schedules each counted). Not under A1111's queue lock (the status line must not
        wait for a generation); while a model loads, the caller falls back to counting words."""
        from modules import extra_networks, prompt_parser, sd_hijack

        text, _ = extra_networks.parse_prompt(text)
        flat = [text]
        if not negative and hasattr(prompt_parser, "get_multicond_prompt_list"):
            _, flat, _ = prompt_parser.get_multicond_prompt_list([text])
        prompts = list(flat)
        if hasattr(prompt_parser, "get_learned_conditioning_prompt_schedules"):
            schedules = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps)
            prompts = [t for schedule in schedules for _, t in schedule]
        return max(int(sd_hijack.model_hijack.get_prompt_lengths(t)[1]) for t in prompts) // TOKENS_PER_CHUNK

    def network_key(self) -> Any:
        return network_key()

    def network_weights(self, base: Any) -> dict[str, Any]:
        unet = self.torch_unet()
        return {} if unet is None else network_weights(unet, base)

    def network_files(self) -> list[str]:
        """The files the active networks came from: the engine takes safetensors LoRAs only."""
        lora = _lora()
        if lora is None:
            return []
        return [str(getattr(getattr(n, "network_on_disk", None), "filename", "") or "") for n in lora.loaded_networks]

    def tell_user(self, p: Any, text: str) -> None:
        """In the UI's generation info (comments) and, for API clients, in `info` and the PNG infotext."""
        if hasattr(p, "comment"):
            p.comment(text)
        elif isinstance(getattr(p, "comments", None), dict):
            p.comments[text] = 1
        params = getattr(p, "extra_generation_params", None)
        if isinstance(params, dict):
            note = text.split(": ", 1)[-1]
            previous = params.get("TensorRT fallback")
            params["TensorRT fallback"] = f"{previous}; {note}" if previous else note


def _say(waiting: Any, said: str | None, text: str) -> str:
    if text != said:
        waiting(text)
    return text


def _try_acquire(lock: Any) -> bool:
    acquire = getattr(lock, "acquire", None)
    return True if acquire is None else bool(acquire(blocking=False))


def _release(lock: Any) -> None:
    release = getattr(lock, "release", None)
    if release is not None:
        release()


def _lora() -> Any:
    """A1111's built-in Lora (`networks`), or None when that extension is disabled."""
    try:
        import networks
    except ImportError:
        return None
    return networks


def network_key() -> tuple[Any, ...]:
    """What decides the UNet weights of the active networks (A1111 keys its own merge on nearly the same tuple;
    the text-encoder strength is left out because it does not touch the UNet)."""
    lora = _lora()
    if lora is None:
        return ()
    return tuple((n.name, n.unet_multiplier, n.dyn_dim, getattr(n, "mtime", None)) for n in lora.loaded_networks)


def network_weights(unet: Any, base: Any) -> dict[str, Any]:
    """New values of every UNet weight the active networks change, computed by A1111's own network modules
    (`calc_updown`, every type its Lora supports) and merged the way its `network_apply_weights` merges:
    net after net, in the update's dtype, 4->9 channel padding for inpainting input convs."""
    import torch

    from sdtrt.pipeline.refit import merge

    lora = _lora()
    if lora is None or not lora.loaded_networks:
        return {}
    paths = {getattr(m, "network_layer_name", None): name for name, m in unet.named_modules()}
    layers: dict[str, list[Any]] = {}
    for net in lora.loaded_networks:
        for layer_name, module in net.modules.items():
            if layer_name in paths:
                layers.setdefault(layer_name, []).append(module)
    names = [f"{paths[layer]}.{part}" for layer in layers for part in ("weight", "bias")]
    bases = base(names)
    out: dict[str, Any] = {}
    for layer, modules in layers.items():
        w_name, b_name = f"{paths[layer]}.weight", f"{paths[layer]}.bias"
        if w_name not in bases:
            continue  # a layer without a weight (A1111 skips it too)
        weight, bias = bases[w_name], bases.get(b_name)
        for module in modules:
            with torch.no_grad():
                updown, ex_bias = module.calc_updown(weight)
            if weight.dim() == 4 and weight.shape[1] == 9 and updown.dim() == 4 and updown.shape[1] == 4:
                updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))
            weight = merge(weight, updown)
            if ex_bias is not None:
                if bias is None:
                    raise SdtrtError(f"network {module.network.name} adds a bias to {paths[layer]}, which has none "
                                     "in the engine")
                bias = merge(bias, ex_bias)
        out[w_name] = weight
        if bias is not None and b_name in bases and bias is not bases[b_name]:
            out[b_name] = bias
    return out


class TrtUnet(sd_unet.SdUnet):
    """What A1111 routes every UNet forward to while one of our options is selected."""

    def __init__(self, spec: OptionSpec):
        super().__init__()
        self.spec = spec
        self.server: Any = None
        self.model: Any = None  # the WebUI model the server was made for

    def activate(self) -> None:
        svc = service()
        self.model = _loaded_model()
        self.server = svc.make_server(self.spec)  # never raises: problems become PyTorch fallback
        try:
            svc.activate(self.server, self.spec.label)
        except Exception as e:
            log.exception("sdtrt: activating %s failed", self.spec.label)
            self.server.unusable = f"activation failed: {e}"

    def forward(self, x: Any, timesteps: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
        if self.server is None:  # a host that forgot activate()
            self.activate()
        if _loaded_model() is not self.model:
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
        host = A1111Host()
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
        service().begin(p)

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        """Fired right after A1111 loaded this pass's LoRAs (again for the hires pass): refit before sampling."""
        service().apply_networks()

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        service().before_sampling()

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        service().end(p)


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
        ref = A1111Host().loaded_checkpoint()
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


service().attach(A1111Host())
if getattr(shared, "options_templates", None) is not None and hasattr(shared, "options_section"):
    shared.options_templates.update(shared.options_section(SECTION, setting_infos()))
script_callbacks.on_list_unets(on_list_unets)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(on_script_unloaded)

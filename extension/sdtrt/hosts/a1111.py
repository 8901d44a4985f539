"""The Host adapter of AUTOMATIC1111's WebUI (1.10): the extension's one view of `modules.*` (settings, the loaded
model and its UNet, checkpoints, the queue lock, styles, the token counter, the Lora extension's networks). Importable
inside A1111 only; the glue in scripts/sdtrt_webui.py attaches it."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from modules import sd_unet, shared

from sdtrt.constants import TOKENS_PER_CHUNK
from sdtrt.errors import SdtrtError
from sdtrt.models.convention import A1111
from sdtrt.webui import host as H


def loaded_model() -> Any:
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
        model = loaded_model()
        return None if model is None else model.model.diffusion_model

    def unet_convention(self) -> str:
        return A1111  # the UNet upsamples x2 and A1111's `cat` patch resizes to the skip connection

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
        model = loaded_model()
        return bool(getattr(model, "lowvram", False))

    def loaded_checkpoint(self) -> H.CheckpointRef | None:
        model = loaded_model()
        info = getattr(model, "sd_checkpoint_info", None)
        return None if info is None else self.checkpoint_ref(info)

    def checkpoint_ref(self, info: Any) -> H.CheckpointRef:
        """A checkpoint as the engine pipeline sees it (A1111: with the config yaml it would load beside it)."""
        return _ref(info)

    def checkpoints(self) -> list[H.CheckpointRef]:
        from modules import sd_models

        return [self.checkpoint_ref(info) for info in list(sd_models.checkpoints_list.values())]

    def resolve_checkpoint(self, name: str) -> H.CheckpointRef:
        from modules import sd_models

        info = sd_models.checkpoint_aliases.get(name)
        if info is None:
            info = next((i for i in sd_models.checkpoints_list.values() if name in (i.model_name, i.name_for_extra)),
                        None)
        if info is None:
            known = ", ".join(sorted(i.title for i in sd_models.checkpoints_list.values())) or "none"
            raise SdtrtError(f"unknown checkpoint {name!r}; the WebUI lists: {known}")
        return self.checkpoint_ref(info)

    def refresh_unet_list(self) -> None:
        sd_unet.list_unets()

    def apply_unet(self) -> None:
        sd_unet.apply_unet()

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
        return None if info is None else self.checkpoint_ref(info)

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
        from modules import extra_networks, prompt_parser

        count = self.token_counter()
        text, _ = extra_networks.parse_prompt(text)
        flat = [text]
        if not negative and hasattr(prompt_parser, "get_multicond_prompt_list"):
            _, flat, _ = prompt_parser.get_multicond_prompt_list([text])
        prompts = list(flat)
        if hasattr(prompt_parser, "get_learned_conditioning_prompt_schedules"):
            schedules = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps)
            prompts = [t for schedule in schedules for _, t in schedule]
        return max(int(count(t)[1]) for t in prompts) // TOKENS_PER_CHUNK

    def token_counter(self) -> Any:
        """`count(text) -> (tokens, target)`: the WebUI's own token counter (A1111: its hijack's)."""
        from modules import sd_hijack

        return sd_hijack.model_hijack.get_prompt_lengths

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

"""Test extension for the fake A1111 host: an SdUnetOption per checkpoint ("[FAKE] <model_name>", matched under
"Automatic" only for model names listed in the `fake_ext_auto` setting) whose SdUnet forwards to the original torch
forward and records every call; an always-on script recording every hook; settings; an API route."""

from __future__ import annotations

import fake_ext_state as state  # helper module at the extension root (on sys.path while scripts import)
from modules import script_callbacks, scripts, sd_hijack, sd_models, sd_unet, shared

state.loads += 1
# method (b): settings added to options_templates at script import time
shared.options_templates.update(shared.options_section(("fakeext", "Fake ext"), {
    "fake_ext_import_time": shared.OptionInfo(7, "set at import time"),
}))


class FakeUnet(sd_unet.SdUnet):
    def __init__(self, label: str):
        super().__init__()
        self.label = label
        state.unets.append(self)

    def forward(self, x, timesteps, context, *args, **kwargs):  # type: ignore[no-untyped-def]
        state.calls.append({"label": self.label, "x": tuple(x.shape), "x_dtype": x.dtype,
                            "t_dtype": timesteps.dtype, "context": tuple(context.shape), "n_args": len(args),
                            "kwargs": sorted(kwargs), "y": tuple(kwargs["y"].shape) if "y" in kwargs else None})
        model = shared.sd_model
        original = sd_hijack.sgm_original_forward if model.is_sdxl else sd_hijack.ldm_original_forward
        return original(model.model.diffusion_model, x, timesteps, context, *args, **kwargs)

    def activate(self):  # type: ignore[no-untyped-def]
        state.events.append(("activate", self.label))

    def deactivate(self):  # type: ignore[no-untyped-def]
        state.events.append(("deactivate", self.label))


class FakeOption(sd_unet.SdUnetOption):
    def __init__(self, model_name: str, auto: bool):
        self.model_name = model_name if auto else None
        self.label = f"[FAKE] {model_name}"

    def create_unet(self):  # type: ignore[no-untyped-def]
        state.events.append(("create", self.label))
        return FakeUnet(self.label)


def on_list_unets(unet_list):  # type: ignore[no-untyped-def]
    auto = shared.opts.data.get("fake_ext_auto", [])
    for info in sd_models.checkpoints_list.values():
        unet_list.append(FakeOption(info.model_name, info.model_name in auto))
    state.events.append(("list_unets", len(unet_list)))


def on_ui_settings():  # type: ignore[no-untyped-def]
    shared.opts.add_option("fake_ext_ui_setting", shared.OptionInfo(
        "x", "set in on_ui_settings", component=None, section=("fakeext", "Fake ext")))
    state.events.append(("ui_settings",))


def on_app_started(demo, app):  # type: ignore[no-untyped-def]
    state.events.append(("app_started", demo is None))

    @app.get("/fakeext/v1/ping")
    def ping():  # type: ignore[no-untyped-def]
        return {"ok": True, "calls": len(state.calls)}


def on_script_unloaded():  # type: ignore[no-untyped-def]
    state.events.append(("script_unloaded",))
    if isinstance(sd_unet.current_unet, FakeUnet):
        sd_unet.current_unet.deactivate()


def on_cfg_denoiser(params):  # type: ignore[no-untyped-def]
    state.events.append(("cfg_denoiser", tuple(params.x.shape), params.sampling_step, params.denoiser is not None))


script_callbacks.on_list_unets(on_list_unets)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(on_script_unloaded)
script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
script_callbacks.on_before_ui(lambda: state.events.append(("before_ui",)))
script_callbacks.on_before_reload(lambda: state.events.append(("before_reload",)))
script_callbacks.on_model_loaded(lambda m: state.events.append(("model_loaded", m.sd_checkpoint_info.model_name)))


class _Control:
    """Stands in for a gradio component: the API reads `.value` as the default argument."""

    def __init__(self, value):  # type: ignore[no-untyped-def]
        self.value = value


class FakeExtScript(scripts.Script):
    def title(self):  # type: ignore[no-untyped-def]
        return "Fake UNet ext"

    def show(self, is_img2img):  # type: ignore[no-untyped-def]
        return scripts.AlwaysVisible

    def ui(self, is_img2img):  # type: ignore[no-untyped-def]
        return [_Control(True), _Control("default")]

    def setup(self, p, *args):  # type: ignore[no-untyped-def]
        state.events.append(("setup", args))

    def before_process(self, p, *args):  # type: ignore[no-untyped-def]
        state.events.append(("before_process", args, shared.opts.sd_unet))

    def process(self, p, *args):  # type: ignore[no-untyped-def]
        state.events.append(("process", args, sd_unet.current_unet_option is not None))
        p.comment("fake ext was here")
        p.extra_generation_params["Fake ext"] = "on"

    def before_process_batch(self, p, *args, **kw):  # type: ignore[no-untyped-def]
        state.events.append(("before_process_batch", kw["batch_number"]))

    def after_extra_networks_activate(self, p, *args, **kw):  # type: ignore[no-untyped-def]
        state.events.append(("after_extra_networks_activate", kw["batch_number"], dict(kw["extra_network_data"]),
                             p.is_hr_pass if hasattr(p, "is_hr_pass") else None))

    def process_batch(self, p, *args, **kw):  # type: ignore[no-untyped-def]
        state.events.append(("process_batch", kw["batch_number"], shared.sd_model.sd_checkpoint_info.model_name))

    def process_before_every_sampling(self, p, *args, **kw):  # type: ignore[no-untyped-def]
        state.events.append(("process_before_every_sampling", tuple(kw["x"].shape)))

    def before_hr(self, p, *args):  # type: ignore[no-untyped-def]
        state.events.append(("before_hr", p.hr_upscale_to_x, p.hr_upscale_to_y))

    def postprocess(self, p, processed, *args):  # type: ignore[no-untyped-def]
        state.events.append(("postprocess", len(processed.images)))

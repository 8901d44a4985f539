"""`modules.api.api.Api(app, queue_lock)`: the core /sdapi/v1 routes, HTTP Basic `--api-auth` on every route added
through `Api.add_api_route` (extension routes added in on_app_started are NOT protected), the exception middleware
that turns any exception into JSON {error, detail, body, errors} with `status_code` or 500 (response headers of the
exception, e.g. WWW-Authenticate, are not forwarded), and `alwayson_scripts` argument mapping.

Fake-only: `Api.run_txt2img(req)` / `run_img2img(req)` return the `Processed` object (the route handlers call them),
so the test harness runs exactly the API path and can read latents."""

from __future__ import annotations

import base64
import io
import ipaddress  # noqa: F401
from contextlib import closing
from secrets import compare_digest
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image

from modules import errors, scripts, sd_models, sd_models_config, sd_samplers, shared, ui
from modules.api import models
from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img, process_images
from modules.shared import opts


def script_name_to_index(name, scripts_list):  # type: ignore[no-untyped-def]
    try:
        return [script.title().lower() for script in scripts_list].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def validate_sampler_name(name):  # type: ignore[no-untyped-def]
    config = sd_samplers.all_samplers_map.get(name, None)
    if config is None:
        raise HTTPException(status_code=400, detail="Sampler not found")
    return name


def decode_base64_to_image(encoding):  # type: ignore[no-untyped-def]
    if encoding.startswith("data:image/"):
        encoding = encoding.split(";")[1].split(",")[1]
    try:
        return Image.open(io.BytesIO(base64.b64decode(encoding)))
    except Exception as e:
        raise HTTPException(status_code=500, detail="Invalid encoded image") from e


def encode_pil_to_base64(image):  # type: ignore[no-untyped-def]
    with io.BytesIO() as output_bytes:
        image.save(output_bytes, format="PNG")
        return base64.b64encode(output_bytes.getvalue()).decode()


def api_middleware(app: FastAPI):  # type: ignore[no-untyped-def]
    def handle_exception(request: Request, e: Exception):  # type: ignore[no-untyped-def]
        err = {
            "error": type(e).__name__,
            "detail": vars(e).get("detail", ""),
            "body": vars(e).get("body", ""),
            "errors": str(e),
        }
        if not isinstance(e, HTTPException):
            errors.report(f"API error: {request.method}: {request.url} {err}", exc_info=True)
        return JSONResponse(status_code=vars(e).get("status_code", 500), content=jsonable_encoder(err))

    @app.middleware("http")
    async def exception_handling(request: Request, call_next):  # type: ignore[no-untyped-def]
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001
            return handle_exception(request, e)

    @app.exception_handler(Exception)
    async def fastapi_exception_handler(request: Request, e: Exception):  # type: ignore[no-untyped-def]
        return handle_exception(request, e)

    @app.exception_handler(HTTPException)
    async def http_exception_handler(request: Request, e: HTTPException):  # type: ignore[no-untyped-def]
        return handle_exception(request, e)


class Api:
    def __init__(self, app: FastAPI, queue_lock):  # type: ignore[no-untyped-def]
        if shared.cmd_opts.api_auth:
            self.credentials = {}
            for auth in shared.cmd_opts.api_auth.split(","):
                user, password = auth.split(":")
                self.credentials[user] = password

        self.router = APIRouter()
        self.app = app
        self.queue_lock = queue_lock
        api_middleware(self.app)
        self.add_api_route("/sdapi/v1/txt2img", self.text2imgapi, methods=["POST"],
                           response_model=models.TextToImageResponse)
        self.add_api_route("/sdapi/v1/img2img", self.img2imgapi, methods=["POST"],
                           response_model=models.ImageToImageResponse)
        self.add_api_route("/sdapi/v1/progress", self.progressapi, methods=["GET"],
                           response_model=models.ProgressResponse)
        self.add_api_route("/sdapi/v1/interrupt", self.interruptapi, methods=["POST"])
        self.add_api_route("/sdapi/v1/skip", self.skip, methods=["POST"])
        self.add_api_route("/sdapi/v1/options", self.get_config, methods=["GET"], response_model=models.OptionsModel)
        self.add_api_route("/sdapi/v1/options", self.set_config, methods=["POST"])
        self.add_api_route("/sdapi/v1/cmd-flags", self.get_cmd_flags, methods=["GET"],
                           response_model=models.FlagsModel)
        self.add_api_route("/sdapi/v1/samplers", self.get_samplers, methods=["GET"])
        self.add_api_route("/sdapi/v1/schedulers", self.get_schedulers, methods=["GET"])
        self.add_api_route("/sdapi/v1/sd-models", self.get_sd_models, methods=["GET"],
                           response_model=list[models.SDModelItem])
        self.add_api_route("/sdapi/v1/scripts", self.get_scripts_list, methods=["GET"])
        self.add_api_route("/sdapi/v1/refresh-checkpoints", self.refresh_checkpoints, methods=["POST"])
        self.add_api_route("/sdapi/v1/unload-checkpoint", self.unloadapi, methods=["POST"])
        self.add_api_route("/sdapi/v1/reload-checkpoint", self.reloadapi, methods=["POST"])

        self.default_script_arg_txt2img: list = []
        self.default_script_arg_img2img: list = []
        txt2img_script_runner = scripts.scripts_txt2img
        img2img_script_runner = scripts.scripts_img2img
        if not txt2img_script_runner.scripts or not img2img_script_runner.scripts:
            ui.create_ui()
        if not txt2img_script_runner.scripts:
            txt2img_script_runner.initialize_scripts(False)
        if not self.default_script_arg_txt2img:
            self.default_script_arg_txt2img = self.init_default_script_args(txt2img_script_runner)
        if not img2img_script_runner.scripts:
            img2img_script_runner.initialize_scripts(True)
        if not self.default_script_arg_img2img:
            self.default_script_arg_img2img = self.init_default_script_args(img2img_script_runner)

    def add_api_route(self, path: str, endpoint, **kwargs):  # type: ignore[no-untyped-def]
        if shared.cmd_opts.api_auth:
            return self.app.add_api_route(path, endpoint, dependencies=[Depends(self.auth)], **kwargs)
        return self.app.add_api_route(path, endpoint, **kwargs)

    def auth(self, credentials: HTTPBasicCredentials = Depends(HTTPBasic())):  # type: ignore[no-untyped-def]  # noqa: B008
        if credentials.username in self.credentials:  # noqa: SIM102
            if compare_digest(credentials.password, self.credentials[credentials.username]):
                return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    def get_selectable_script(self, script_name, script_runner):  # type: ignore[no-untyped-def]
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.selectable_scripts)
        script = script_runner.selectable_scripts[script_idx]
        return script, script_idx

    def get_scripts_list(self):  # type: ignore[no-untyped-def]
        t2ilist = [script.name for script in scripts.scripts_txt2img.scripts if script.name is not None]
        i2ilist = [script.name for script in scripts.scripts_img2img.scripts if script.name is not None]
        return {"txt2img": t2ilist, "img2img": i2ilist}

    def get_script(self, script_name, script_runner):  # type: ignore[no-untyped-def]
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.scripts)
        return script_runner.scripts[script_idx]

    def init_default_script_args(self, script_runner):  # type: ignore[no-untyped-def]
        last_arg_index = 1
        for script in script_runner.scripts:
            last_arg_index = max(last_arg_index, script.args_to)
        script_args = [None] * last_arg_index
        script_args[0] = 0
        gr = ui.gradio()
        import contextlib

        with gr.Blocks() if gr is not None else contextlib.nullcontext():
            for script in script_runner.scripts:
                if script.ui(script.is_img2img):
                    ui_default_values = []
                    for elem in script.ui(script.is_img2img):
                        ui_default_values.append(getattr(elem, "value", elem))
                    script_args[script.args_from:script.args_to] = ui_default_values
        return script_args

    def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *,  # type: ignore[no-untyped-def]
                         input_script_args=None):
        script_args = default_script_args.copy()
        if input_script_args is not None:
            for index, value in input_script_args.items():
                script_args[index] = value
        if selectable_scripts:
            script_args[selectable_scripts.args_from:selectable_scripts.args_to] = request.script_args
            script_args[0] = selectable_idx + 1
        if request.alwayson_scripts:
            for alwayson_script_name in request.alwayson_scripts:
                alwayson_script = self.get_script(alwayson_script_name, script_runner)
                if alwayson_script is None:
                    raise HTTPException(status_code=422, detail=f"always on script {alwayson_script_name} not found")
                if alwayson_script.alwayson is False:
                    raise HTTPException(status_code=422,
                                        detail="Cannot have a selectable script in the always on scripts params")
                if "args" in request.alwayson_scripts[alwayson_script_name]:
                    req_args = request.alwayson_scripts[alwayson_script_name]["args"]
                    for idx in range(min((alwayson_script.args_to - alwayson_script.args_from), len(req_args))):
                        script_args[alwayson_script.args_from + idx] = req_args[idx]
        return script_args

    # ---- txt2img / img2img -------------------------------------------------------------------------------------

    def run_txt2img(self, txt2imgreq):  # type: ignore[no-untyped-def]
        """Fake-only split of text2imgapi: returns (Processed, send_images)."""
        script_runner = scripts.scripts_txt2img
        selectable_scripts, selectable_script_idx = self.get_selectable_script(txt2imgreq.script_name, script_runner)
        sampler, scheduler = sd_samplers.get_sampler_and_scheduler(txt2imgreq.sampler_name or txt2imgreq.sampler_index,
                                                                   txt2imgreq.scheduler)
        populate = models.copy_model(txt2imgreq, {
            "sampler_name": validate_sampler_name(sampler),
            "scheduler": scheduler,
            "do_not_save_samples": not txt2imgreq.save_images,
            "do_not_save_grid": not txt2imgreq.save_images,
        })
        if populate.sampler_name:
            populate.sampler_index = None
        args = dict(vars(populate))
        args.pop("script_name", None)
        args.pop("script_args", None)
        args.pop("alwayson_scripts", None)
        args.pop("infotext", None)
        script_args = self.init_script_args(txt2imgreq, self.default_script_arg_txt2img, selectable_scripts,
                                            selectable_script_idx, script_runner)
        send_images = args.pop("send_images", True)
        args.pop("save_images", None)
        args.pop("sampler_index", None)
        with self.queue_lock, closing(StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, **args)) as p:
            p.is_api = True
            p.scripts = script_runner
            p.outpath_grids = opts.outdir_txt2img_grids
            p.outpath_samples = opts.outdir_txt2img_samples
            try:
                shared.state.begin(job="scripts_txt2img")
                if selectable_scripts is not None:
                    p.script_args = script_args
                    processed = scripts.scripts_txt2img.run(p, *p.script_args)
                else:
                    p.script_args = tuple(script_args)
                    processed = process_images(p)
            finally:
                shared.state.end()
        return processed, send_images

    def text2imgapi(self, txt2imgreq: models.StableDiffusionTxt2ImgProcessingAPI):  # type: ignore[no-untyped-def]
        processed, send_images = self.run_txt2img(txt2imgreq)
        b64images = list(map(encode_pil_to_base64, processed.images)) if send_images else []
        return models.TextToImageResponse(images=b64images, parameters=vars(txt2imgreq), info=processed.js())

    def run_img2img(self, img2imgreq):  # type: ignore[no-untyped-def]
        init_images = img2imgreq.init_images
        if init_images is None:
            raise HTTPException(status_code=404, detail="Init image not found")
        mask = img2imgreq.mask
        if mask:
            mask = decode_base64_to_image(mask) if isinstance(mask, str) else mask
        script_runner = scripts.scripts_img2img
        selectable_scripts, selectable_script_idx = self.get_selectable_script(img2imgreq.script_name, script_runner)
        sampler, scheduler = sd_samplers.get_sampler_and_scheduler(img2imgreq.sampler_name or img2imgreq.sampler_index,
                                                                   img2imgreq.scheduler)
        populate = models.copy_model(img2imgreq, {
            "sampler_name": validate_sampler_name(sampler),
            "scheduler": scheduler,
            "do_not_save_samples": not img2imgreq.save_images,
            "do_not_save_grid": not img2imgreq.save_images,
            "mask": mask,
        })
        if populate.sampler_name:
            populate.sampler_index = None
        args = dict(vars(populate))
        args.pop("include_init_images", None)
        args.pop("script_name", None)
        args.pop("script_args", None)
        args.pop("alwayson_scripts", None)
        args.pop("infotext", None)
        args.pop("sampler_index", None)
        script_args = self.init_script_args(img2imgreq, self.default_script_arg_img2img, selectable_scripts,
                                            selectable_script_idx, script_runner)
        send_images = args.pop("send_images", True)
        args.pop("save_images", None)
        with self.queue_lock, closing(StableDiffusionProcessingImg2Img(sd_model=shared.sd_model, **args)) as p:
            p.init_images = [decode_base64_to_image(x) if isinstance(x, str) else x for x in init_images]
            p.is_api = True
            p.scripts = script_runner
            p.outpath_grids = opts.outdir_img2img_grids
            p.outpath_samples = opts.outdir_img2img_samples
            try:
                shared.state.begin(job="scripts_img2img")
                if selectable_scripts is not None:
                    p.script_args = script_args
                    processed = scripts.scripts_img2img.run(p, *p.script_args)
                else:
                    p.script_args = tuple(script_args)
                    processed = process_images(p)
            finally:
                shared.state.end()
        return processed, send_images

    def img2imgapi(self, img2imgreq: models.StableDiffusionImg2ImgProcessingAPI):  # type: ignore[no-untyped-def]
        processed, send_images = self.run_img2img(img2imgreq)
        b64images = list(map(encode_pil_to_base64, processed.images)) if send_images else []
        if not img2imgreq.include_init_images:
            img2imgreq.init_images = None
            img2imgreq.mask = None
        return models.ImageToImageResponse(images=b64images, parameters=vars(img2imgreq), info=processed.js())

    # ---- misc --------------------------------------------------------------------------------------------------

    def progressapi(self, req: Any = None):  # type: ignore[no-untyped-def]
        st = shared.state
        if st.job_count == 0:
            return models.ProgressResponse(progress=0, eta_relative=0, state=st.dict(), textinfo=st.textinfo)
        progress = 0.01
        if st.job_count > 0:
            progress += st.job_no / st.job_count
        if st.sampling_steps > 0:
            progress += 1 / max(st.job_count, 1) * st.sampling_step / st.sampling_steps
        return models.ProgressResponse(progress=min(progress, 1), eta_relative=0.0, state=st.dict(),
                                       textinfo=st.textinfo)

    def interruptapi(self):  # type: ignore[no-untyped-def]
        shared.state.interrupt()
        return {}

    def skip(self):  # type: ignore[no-untyped-def]
        shared.state.skip()

    def unloadapi(self):  # type: ignore[no-untyped-def]
        sd_models.unload_model_weights()
        return {}

    def reloadapi(self):  # type: ignore[no-untyped-def]
        sd_models.send_model_to_device(shared.sd_model)
        return {}

    def get_config(self):  # type: ignore[no-untyped-def]
        options = {}
        for key in shared.opts.data:
            metadata = shared.opts.data_labels.get(key)
            if metadata is not None:
                options.update({key: shared.opts.data.get(key, shared.opts.data_labels.get(key).default)})
            else:
                options.update({key: shared.opts.data.get(key, None)})
        return options

    def set_config(self, req: dict[str, Any]):  # type: ignore[no-untyped-def]
        checkpoint_name = req.get("sd_model_checkpoint", None)
        if checkpoint_name is not None and checkpoint_name not in sd_models.checkpoint_aliases:
            raise RuntimeError(f"model {checkpoint_name!r} not found")
        for k, v in req.items():
            shared.opts.set(k, v, is_api=True)
        shared.opts.save(shared.config_filename)

    def get_cmd_flags(self):  # type: ignore[no-untyped-def]
        return vars(shared.cmd_opts)

    def get_samplers(self):  # type: ignore[no-untyped-def]
        return [{"name": s.name, "aliases": s.aliases, "options": s.options} for s in sd_samplers.all_samplers]

    def get_schedulers(self):  # type: ignore[no-untyped-def]
        return [{"name": s.name, "label": s.label, "aliases": s.aliases} for s in sd_samplers.schedulers]

    def get_sd_models(self):  # type: ignore[no-untyped-def]
        return [{"title": x.title, "model_name": x.model_name, "hash": x.shorthash, "sha256": x.sha256,
                 "filename": x.filename, "config": sd_models_config.find_checkpoint_config_near_filename(x)}
                for x in sd_models.checkpoints_list.values()]

    def refresh_checkpoints(self):  # type: ignore[no-untyped-def]
        with self.queue_lock:
            shared.refresh_checkpoints()

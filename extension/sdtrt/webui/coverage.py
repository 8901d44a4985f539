"""Whether a generation will run on an engine, answered before it runs (POST /sdtrt/v1/coverage and the status line
in the txt2img/img2img tabs).

The request is the body of /sdapi/v1/txt2img or /img2img (override_settings included). Its sampling passes and
their UNet calls come from `sdtrt.serving.passes`; which SD Unet option each pass gets follows A1111's "Automatic" rule
over the options this service lists for that pass's checkpoint; and each call is routed by the same serving code
that routes it during the generation (`UnetServer.route`: gate, contract, slot order, profile selection, reasons).
What else sends a pass to PyTorch is decided where serving decides it: tiling (`foreign`), ControlNet units
(`controlnet`), LoRA on an engine without refit (`runtime.refit_refusal`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrt.constants import LATENT_FACTOR, TOKENS_PER_CHUNK
from sdtrt.engine_types import RefitMode
from sdtrt.errors import SdtrtError
from sdtrt.models import NotServable
from sdtrt.models.convention import is_mismatch
from sdtrt.profiles import MAX_PIXELS, MIN_PIXELS, Shape, token_chunks
from sdtrt.serving.counters import Counters
from sdtrt.serving.passes import CallShape, CfgOptions, GenerationSpec, HiresSpec, PassSpec, hires_size, plan_passes
from sdtrt.serving.server import SWITCHED_OFF, FallbackPolicy, UnetServer
from sdtrt.serving.slot import WeightSource
from sdtrt.serving.spec import refit_refusal
from sdtrt.webui import controlnet, foreign
from sdtrt.webui.host import LABEL_PREFIX, CheckpointRef
from sdtrt.webui.prediction import CallRoute, Coverage, PassRoute, RouteKind, suggest_profile, summarize
from sdtrt.webui.request_fields import CoverageError, float_field, int_field, text_field

if TYPE_CHECKING:
    from sdtrt.webui.options import LoadedArch, OptionSpec
    from sdtrt.webui.service import EngineService

log = logging.getLogger("sdtrt")
KINDS = ("txt2img", "img2img")
#: A1111's default size and batch when a request leaves them out.
DEFAULT_PIXELS = 512
#: Hires checkpoint values that mean "the generation's checkpoint".
SAME_CHECKPOINT = ("", "Use same checkpoint", None)
NO_REFINER = ("", "None", "none", None)
#: `<lora:name:...>` / `<lyco:name:...>` in a prompt (A1111's extra-network syntax)
_LORA_RE = re.compile(r"<(?:lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
#: A1111 splits a prompt into AND-composed sub-prompts on this
_AND_RE = re.compile(r"\bAND\b")
#: Largest hires scale a prediction takes (A1111's slider goes to 4)
MAX_HR_SCALE = 16.0


# ---- reading the request -----------------------------------------------------------------------------------------
def lora_names(*prompts: str) -> list[str]:
    return sorted({m.group(1).strip() for p in prompts for m in _LORA_RE.finditer(p)})


def controlnet_units(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The enabled sd-webui-controlnet units of an API request (`alwayson_scripts.controlnet.args`)."""
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, Mapping):
        return []
    entry = next((v for k, v in scripts.items() if str(k).lower() == "controlnet"), None)
    args = entry.get("args") if isinstance(entry, Mapping) else None
    return [u for u in args or [] if isinstance(u, Mapping) and u.get("enabled", True)]


# ---- the prediction --------------------------------------------------------------------------------------------
class Predictor:
    """One prediction: the service, its host, and the request's settings (override_settings over the host's)."""

    def __init__(self, svc: EngineService, body: Mapping[str, Any], kind: str):
        if kind not in KINDS:
            raise CoverageError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(body, Mapping):
            raise CoverageError("the body must be a JSON object, as for /sdapi/v1/txt2img")
        self.svc, self.body, self.kind = svc, body, kind
        self.host = svc.require_host()
        overrides = body.get("override_settings") or {}
        if not isinstance(overrides, Mapping):
            raise CoverageError("override_settings must be an object")
        self.overrides = overrides
        self.settings = self.host.settings().overridden(overrides)
        self.prompts: list[str] = []  # the styled prompts of the passes, for their LoRA tags
        self.units = controlnet_units(body)

    def option(self, key: str, default: Any) -> Any:
        """A WebUI option as this request sees it (override_settings first)."""
        if key in self.overrides:
            return self.overrides[key]
        return self.host.option(key, default)

    def styled(self, prompt: str, negative: bool) -> str:
        """The prompt with the request's styles applied, as processing applies them."""
        styles = self.body.get("styles") or []
        if not styles:
            return prompt
        if not isinstance(styles, list):
            raise CoverageError("styles must be a list of style names")
        return str(self.host.apply_styles(prompt, [str(x) for x in styles], negative))

    def chunks(self, prompt: str, negative: bool) -> int:
        """77-row chunks of a (styled) prompt's conditioning, counted as the WebUI's token counter counts them."""
        steps = int_field(self.body, "steps", 20, 1, 10000)
        try:
            return max(1, int(self.host.prompt_chunks(prompt, negative, steps)))
        except Exception:  # a prediction never fails on the token counter
            log.debug("sdtrt: the WebUI's token counter failed; counting words", exc_info=True)
        return token_chunks(len(prompt.split()))

    def checkpoint(self, name: Any) -> CheckpointRef | None:
        """The checkpoint a generation starts on: `name` (override_settings), else the WebUI's setting, which A1111
        loads when the generation begins (the loaded model may still be another one, e.g. after a request that
        overrode it), else the loaded one."""
        if name:  # A1111 keeps the override only when it names a checkpoint exactly, else drops it
            try:
                return self.host.resolve_checkpoint(str(name))
            except SdtrtError:
                pass
        configured = self.settings_value("sd_model_checkpoint")
        if configured:
            try:
                return self.host.resolve_checkpoint(str(configured))
            except SdtrtError:
                pass  # a setting naming a file that is gone: A1111 falls back to what it can load
        return self.host.loaded_checkpoint()

    def settings_value(self, key: str) -> Any:
        """A WebUI option without this request's override."""
        return self.host.option(key, "")

    def named_checkpoint(self, field_name: str, name: Any) -> CheckpointRef:
        """A hires or refiner checkpoint as A1111 looks it up (its closest match); unknown: the generation fails."""
        ref = self.host.closest_checkpoint(str(name))
        if ref is None:
            raise CoverageError(f"{field_name}: unknown checkpoint {name!r}; the generation would fail with "
                                "'Could not find checkpoint'")
        return ref

    def spec(self) -> GenerationSpec:
        b = self.body
        raw_w = int_field(b, "width", DEFAULT_PIXELS, MIN_PIXELS, MAX_PIXELS)
        raw_h = int_field(b, "height", DEFAULT_PIXELS, MIN_PIXELS, MAX_PIXELS)
        width, height = raw_w // LATENT_FACTOR * LATENT_FACTOR, raw_h // LATENT_FACTOR * LATENT_FACTOR
        batch = int_field(b, "batch_size", 1, 1, 64)
        prompt = self.styled(text_field(b, "prompt"), False)
        negative = self.styled(text_field(b, "negative_prompt"), True)
        conds = max(1, len(_AND_RE.split(prompt)))
        main = self.checkpoint(self.overrides.get("sd_model_checkpoint"))
        hires = None
        if self.kind == "txt2img" and b.get("enable_hr"):
            scale = float_field(b, "hr_scale", 2.0) or 2.0
            if not 0 < scale <= MAX_HR_SCALE:
                raise CoverageError(f"hr_scale must be above 0 and at most {MAX_HR_SCALE}, got {scale}")
            hw, hh = hires_size(raw_w, raw_h, scale,
                                int_field(b, "hr_resize_x", 0, 0, MAX_PIXELS), int_field(b, "hr_resize_y", 0, 0, MAX_PIXELS))
            hr_prompt = self.styled(text_field(b, "hr_prompt"), False) if text_field(b, "hr_prompt") else prompt
            hr_negative = self.styled(text_field(b, "hr_negative_prompt"), True) if text_field(b, "hr_negative_prompt") \
                else negative
            self.prompts.append(hr_prompt)
            name = b.get("hr_checkpoint_name")
            hr_ref = None if name in SAME_CHECKPOINT else self.named_checkpoint("hr_checkpoint_name", name)
            hires = HiresSpec(hw, hh, self.chunks(hr_prompt, False), self.chunks(hr_negative, True),
                              hr_ref.title if hr_ref else None, self.start_ratio(True))
        self.prompts.append(prompt)
        refiner = b.get("refiner_checkpoint")
        refiner_ref = None if refiner in NO_REFINER else self.named_checkpoint("refiner_checkpoint", refiner)
        return GenerationSpec(width, height, batch, self.chunks(prompt, False), self.chunks(negative, True), conds,
                              main.title if main else None, hires, refiner_ref.title if refiner_ref else None,
                              float_field(b, "refiner_switch_at", None),
                              str(self.option("hires_fix_refiner_pass", "second pass")),
                              self.start_ratio(self.kind == "img2img"))

    def start_ratio(self, denoised: bool) -> float:
        """Where a pass starts in the schedule, as A1111's refiner switch measures it: an img2img or hires pass
        starts at 1 - denoising strength (by noise level; by sampling steps every pass starts at 0)."""
        if not denoised or self.option("refiner_switch_by_sample_steps", False):
            return 0.0
        strength = float_field(self.body, "denoising_strength", None)
        if strength is None:
            strength = 0.75  # A1111's default
        return min(1.0, max(0.0, 1.0 - strength))

    def cfg_options(self) -> CfgOptions:
        s_min = float_field(self.body, "s_min_uncond", None)
        if s_min is None:
            s_min = float_field({"s_min_uncond": self.option("s_min_uncond", 0.0)}, "s_min_uncond", 0.0) or 0.0
        early = float_field({"skip_early_cond": self.option("skip_early_cond", 0.0)}, "skip_early_cond", 0.0) or 0.0
        return CfgOptions(bool(self.option("batch_cond_uncond", True)), bool(self.option("pad_cond_uncond", False)),
                          bool(self.option("pad_cond_uncond_v0", False)), s_min > 0 or early > 0)

    # ---- one pass ----------------------------------------------------------------------------------------------
    def option_for(self, ref: CheckpointRef | None) -> tuple[OptionSpec | None, LoadedArch | None, str | None]:
        """The SD Unet option A1111 applies while `ref` is loaded (its "Automatic" rule: the option whose
        model_name is the checkpoint's), the checkpoint's architecture, and why there is none."""
        sd_unet = str(self.option("sd_unet", "Automatic") or "Automatic")
        if sd_unet == "None":
            return None, None, "SD Unet is None: the UNet runs on PyTorch"
        if ref is None:
            return None, None, "no checkpoint is loaded"
        arch = self.arch_of(ref)
        options = self.svc.options.options_with(ref, lambda: arch)
        if sd_unet == "Automatic":
            spec = next((o for o in options if o.model_name == ref.model_name), None)
            if spec is None:
                return None, arch, f"no engine for this checkpoint ({ref.model_name})"
            return spec, arch, None
        spec = next((o for o in options if o.label == sd_unet), None)
        if spec is None:
            ours = sd_unet.startswith(LABEL_PREFIX)
            return None, arch, (f"the SD Unet {sd_unet} is not available for {ref.model_name}" if ours
                                else f"SD Unet is {sd_unet}, not a TensorRT engine")
        return spec, arch, None

    def arch_of(self, ref: CheckpointRef) -> LoadedArch | None:
        from sdtrt.webui.options import LoadedArch

        loaded = self.host.loaded_checkpoint()
        if loaded is not None and loaded.filename == ref.filename:
            return self.svc.options.loaded_arch()
        from sdtrt.pipeline.checkpoint import header_info

        try:
            info = header_info(Path(ref.filename), Path(ref.config) if ref.config else None)
        except Exception:  # noqa: BLE001 - a pickle or unreadable file: only its own engines are known
            return None
        return LoadedArch(info.family_id, info.arch_hash, None)

    def server(self, spec: OptionSpec, ref: CheckpointRef, arch: LoadedArch | None) -> UnetServer:
        """The server A1111 would activate for `spec` while `ref` is loaded, with counters of its own (a prediction
        leaves /status alone). Which checkpoint's weights: the host's hash, or the loaded file's (serving hashes it
        too, remembered per file version); a checkpoint that is not loaded is never hashed here (multi-GB files,
        per keystroke): an engine with fixed weights counts as its own when it was built from a file of that name.
        While this option is the active one, engines that failed to load stay failed, as they do in serving."""
        sha = ref.sha256 or (self.svc.options.checkpoint_sha256(ref) if self._is_loaded(ref) else None)
        if sha is None:
            base = os.path.basename(ref.filename)
            sha = next((str(m.source_checkpoint.get("sha256")) for m in self.svc.options.usable_manifests()
                        if m.id in spec.engine_ids and m.key.refit_mode is not RefitMode.REFIT
                        and m.source_checkpoint.get("name") == base), f"name:{base}")
        if arch is None:  # not readable without loading: assume the architecture of its own engines
            arch = self._own_arch(spec, ref)
        identity = WeightSource(sha, _never_read)
        server = self.svc.activation.server_for(spec, lambda: arch, lambda: identity, counters=Counters())
        server.enabled = lambda: self.settings.enabled
        active = self.svc.active
        if active is not None and self.svc.active_label == spec.label and self._is_loaded(ref):
            broken = {slot.id: slot.broken for slot in active.slots}
            for slot in server.slots:
                slot.broken = broken.get(slot.id)
        return server

    def _is_loaded(self, ref: CheckpointRef) -> bool:
        loaded = self.host.loaded_checkpoint()
        return loaded is not None and loaded.filename == ref.filename

    def _own_arch(self, spec: OptionSpec, ref: CheckpointRef) -> LoadedArch | None:
        from sdtrt.webui.options import LoadedArch

        base = os.path.basename(ref.filename)
        for m in self.svc.options.usable_manifests():
            if m.id in spec.engine_ids and m.source_checkpoint.get("name") == base:
                return LoadedArch(m.key.family, m.key.arch_hash, None)
        return None

    def route_pass(self, p: PassSpec) -> PassRoute:
        ref = self.host.resolve_checkpoint(p.checkpoint) if p.checkpoint else None
        route = PassRoute(p.name, ref.title if ref else None, p.width, p.height, p.batch, False, None, None, None,
                          RouteKind.OFF)
        if not self.settings.enabled:
            return self.nowhere(route, p, SWITCHED_OFF, RouteKind.OFF)
        spec, arch, why = self.option_for(ref)
        if spec is None or ref is None:
            return self.nowhere(route, p, why, RouteKind.OFF if why and why.startswith("SD Unet") else RouteKind.NO_ENGINE)
        server = self.server(spec, ref, arch)
        bypass = self.unservable(server)
        if bypass is not None:
            server.bypass = bypass
        calls = [self.route_call(server, c, bool(self.units)) for c in p.calls]
        route.calls = calls
        missing = next((c for c in calls if c.engine_id is None), None)
        if missing is None and calls:
            route.engine, route.kind = True, RouteKind.ENGINE
            route.engine_id, route.profile = calls[0].engine_id, calls[0].profile
            return route
        route.reason = missing.reason if missing else "no UNet call"
        route.kind = (RouteKind.NO_CONTROL_INPUTS if bypass == controlnet.NO_CONTROL_ENGINE
                      else RouteKind.UNSERVABLE if bypass is not None or server.unusable is not None
                      else RouteKind.UNCOVERED if route.reason and route.reason.startswith("no engine profile covers")
                      else RouteKind.OTHER_CONVENTION if is_mismatch(route.reason)
                      else RouteKind.UNSERVABLE)
        return route

    @staticmethod
    def nowhere(route: PassRoute, p: PassSpec, reason: str | None, kind: RouteKind) -> PassRoute:
        """`route` with every call on PyTorch for `reason`."""
        route.reason, route.kind = reason, kind
        route.calls = [CallRoute(c.rows, c.width, c.height, c.chunks, None, None, reason) for c in p.calls]
        return route

    @staticmethod
    def route_call(server: UnetServer, call: CallShape, control: bool) -> CallRoute:
        """Where one call runs. With ControlNet units every call carries their inputs, which only the engines
        with ControlNet inputs take (serving skips the others the same way); an engine of the other convention
        than the host's is refused at sizes where the two compute differently (by the server, as in serving)."""
        shape = Shape(max(1, call.rows), call.height, call.width, call.chunks * TOKENS_PER_CHUNK)

        def dims(slot: Any) -> Mapping[str, Any]:
            if control and not slot.contract.takes_control:
                raise NotServable("this engine has no ControlNet inputs")
            return slot.contract.call_dims(shape, rows=call.rows)

        route = server.route(dims)
        return CallRoute(call.rows, call.width, call.height, call.chunks, route.slot.id if route.slot else None,
                         None if route.profile is None else route.profile + 1, route.reason)

    def unservable(self, server: UnetServer) -> str | None:
        """What in the request sends the pass to PyTorch whatever the sizes (as serving would find it)."""
        tiling = self.body.get("tiling")
        if tiling is None:
            tiling = self.option("tiling", False)
        if tiling:
            return foreign.TILING
        if self.units:
            why = self.host.controlnet_refusal() or controlnet.request_problem(self.units, server.takes_control)
            if why is not None:
                return why
        if lora_names(*self.prompts):
            refusal = self.host.lora_refusal()
            if refusal is not None:
                return refusal
            for slot in server.slots:
                refusal = refit_refusal(slot.manifest, "LoRA weights")
                if refusal is not None:
                    return refusal
        return None

    # ---- the answer --------------------------------------------------------------------------------------------
    def predict(self) -> Coverage:
        gen = self.spec()
        passes = plan_passes(gen, self.cfg_options())
        routes = [self.route_pass(p) for p in passes]
        return summarize(routes, self.suggest(gen, passes, routes), fails=self.settings.fallback is FallbackPolicy.ERROR)

    def suggest(self, gen: GenerationSpec, passes: list[PassSpec], routes: list[PassRoute]) -> dict[str, Any] | None:
        """A build request whose profile covers every pass on the checkpoint of the first pass that lacks an
        engine or a profile, when building would fix it."""
        first = next((r for r in routes if r.kind.buildable), None)
        if first is None or first.checkpoint is None:
            return None
        mine = [p for p, r in zip(passes, routes) if r.checkpoint == first.checkpoint]
        return {"checkpoint": first.checkpoint, "profiles": [suggest_profile(mine)],
                "controlnet": bool(self.units), "convention": self.host.unet_convention()}


def _never_read(names: Any) -> Mapping[str, Any]:
    raise SdtrtError("a prediction reads no weights")


def predict(svc: EngineService, body: Mapping[str, Any], kind: str = "txt2img") -> dict[str, Any]:
    """POST /sdtrt/v1/coverage: what a generation of `body` will run on. Raises CoverageError (400) for a body it
    cannot read; SdtrtError for an unknown checkpoint."""
    try:
        return Predictor(svc, body, kind).predict().to_dict()
    except (TypeError, ValueError, OverflowError, AttributeError) as e:  # a field of an unexpected type or size
        raise CoverageError(f"cannot read the request: {type(e).__name__}: {e}") from e

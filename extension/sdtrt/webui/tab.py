"""The "TensorRT" tab (gradio 3.41, as A1111 1.10 ships it): presets and a profile editor in user units, Build
with a progress bar fed by the build job, the engine table, delete and rebuild of stale engines.

The handlers are plain functions over the EngineService (tested without gradio); `create_tab` only lays them out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from sdtrt.errors import ProfileError, SdtrtError
from sdtrt.models.convention import A1111, CONVENTIONS
from sdtrt.profiles import Profile, Shape
from sdtrt.webui.fleet import BUILDS_ENV, FleetSettings
from sdtrt.webui.host import BACKEND_CHOICES
from sdtrt.webui.jobs import DONE, QUEUED, RUNNING, Job
from sdtrt.webui.reports import EngineListing
from sdtrt.webui.service import EngineService

#: label -> profiles (user units: batch x height x width x tokens; min:opt:max or one static shape).
PRESETS: dict[str, tuple[str, ...]] = {
    "SD 1.x 512x512, batch 1 (static)": ("1x512x512x75",),
    "SD 1.x 256-768 px, batch 1-4 (dynamic)": ("1x256x256x75:1x512x512x75:4x768x768x150",),
    "SD 2.x 768x768, batch 1 (static)": ("1x768x768x75",),
    "SD 2.x 512-1024 px, batch 1-4 (dynamic)": ("1x512x512x75:1x768x768x75:4x1024x1024x150",),
    "SDXL 1024x1024, batch 1 (static)": ("1x1024x1024x75",),
    "SDXL 768-1344 px, batch 1-2 (dynamic)": ("1x768x768x75:1x1024x1024x75:2x1344x1344x150",),
    "Hires fix 512 -> 1024, batch 1": ("1x512x512x75", "1x1024x1024x75"),
}
HEADERS = ["id", "status", "family", "profiles", "backend", "dtype", "size", "checkpoint", "created", "convention"]


def format_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table(rows: Sequence[EngineListing]) -> list[list[str]]:
    out = []
    for r in rows:
        status = "ok" if r.ok else f"stale: {r.reason}"
        if r.active:
            status += " (active)"
        family = (r.family or "?") + (" + ControlNet inputs" if r.controlnet else "")
        backend = (r.backend or "?") + (f" for {', '.join(r.targets)}" if r.targets else "")
        out.append([r.id, status, family, "\n".join(r.profiles), backend, r.dtype or "?", format_size(r.size_bytes),
                    r.checkpoint or "?", (r.created or "")[:19], r.convention or "?"])
    return out


def profiles_from_text(text: str) -> list[str]:
    """One profile per line (blank lines and '#' comments ignored); raises ProfileError naming the bad line."""
    out = []
    for n, line in enumerate((text or "").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            out.append(str(Profile.parse(line)))
        except SdtrtError as e:
            raise type(e)(f"line {n}: {e}") from None
    if not out:
        raise SdtrtError("no profiles: pick a preset or add one with the editor")
    return out


def profile_from_fields(batch: Sequence[float], height: Sequence[float], width: Sequence[float],
                        tokens: Sequence[float]) -> str:
    """The editor's min/opt/max fields as one profile spec (static when all three are equal). Empty, NaN,
    infinite or fractional fields raise ProfileError like every other bad profile."""

    def whole(value: object, what: str) -> int:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ProfileError(f"{what} must be a whole number, got {value!r}") from None
        if not math.isfinite(number) or number != int(number):
            raise ProfileError(f"{what} must be a whole number, got {value!r}")
        return int(number)

    shapes = [Shape(whole(b, "batch"), whole(h, "height"), whole(w, "width"), whole(t, "tokens"))
              for b, h, w, t in zip(batch, height, width, tokens)]
    for s in shapes:
        s.validate()
    return str(Profile(*shapes))


def run_build(svc: EngineService, checkpoint: str, profiles_text: str, backend: str,
              progress: Callable[[float, str], None], poll: float = 0.25,
              submit: Callable[[], Job] | None = None, controlnet: bool = False, targets: str = "",
              convention: str | None = None) -> str:
    """Submit a build and follow it, reporting (fraction, phase) until it ends. Returns the outcome message.
    `targets`: GPU compute capabilities for an ahead-of-time build, comma-separated ("" or "current": this GPU).
    `convention`: whose UNet numerics the engine follows (None: the running WebUI's)."""
    try:
        job = submit() if submit else svc.submit_build(checkpoint, profiles_from_text(profiles_text), backend,
                                                       controlnet=bool(controlnet), targets=targets or None,
                                                       convention=convention or None)
    except SdtrtError as e:
        return f"Not started: {e}"
    while True:
        job = svc.jobs.get(job.id)
        if job.state == QUEUED:
            busy = any(j.state == RUNNING and j.id != job.id for j in svc.jobs.list())
            progress(0.0, "waiting for another build to finish" if busy else "queued")
        elif job.state == RUNNING:
            progress(job.progress, job.phase)
        else:
            break
        time.sleep(poll)
    if job.state == DONE:
        result = job.result or {}
        verb = "Built" if result.get("built") else "Already in the cache:"
        notes = "".join(f"\n{note}" for note in result.get("notes") or ())
        return f"{verb} engine {result.get('engine_id')} ({format_size(result.get('size_bytes'))}){notes}"
    return f"Build {job.state}: {job.error or 'no error message'}"


def rebuild_stale(svc: EngineService, progress: Callable[[float, str], None], poll: float = 0.25) -> str:
    stale = [r.id for r in svc.engine_rows() if not r.ok]
    if not stale:
        return "No stale engines."
    lines = []
    for n, engine_id in enumerate(stale):
        def scaled(f: float, phase: str, n: int = n, engine_id: str = engine_id) -> None:
            progress((n + f) / len(stale), f"{engine_id}: {phase}")

        try:
            def submit(engine_id: str = engine_id) -> Job:
                return svc.rebuild(engine_id)

            lines.append(run_build(svc, "", "", "", scaled, poll, submit=submit))
        except SdtrtError as e:
            lines.append(f"{engine_id}: {e}")
    return "\n".join(lines)


def delete_engine(svc: EngineService, engine_id: str) -> str:
    if not engine_id:
        return "Pick an engine to delete."
    try:
        svc.delete(engine_id)
    except SdtrtError as e:
        return f"Not deleted: {e}"
    return f"Deleted {engine_id}."


def fleet_notice(fleet: FleetSettings) -> str | None:
    """What the tab says above everything in a replica that does not build (SDTRT_BUILDS=off), else None."""
    if fleet.builds:
        return None
    return (f"**This WebUI does not build or delete engines ({BUILDS_ENV}=off).** Engines are built into the shared "
            "cache by the pre-build Job (or `python -m sdtrt build` where the cache is writable); this replica picks "
            f"new ones up by itself (every {fleet.rescan_s:g} s at the start of a generation) or at once with "
            "POST /sdtrt/v1/rescan.")


def create_tab(svc: EngineService, checkpoint_titles: Callable[[], list[str]],
               current_checkpoint: Callable[[], str | None]) -> Any:
    """Lay the tab out; returns the gr.Blocks for on_ui_tabs."""
    import gradio as gr

    def engine_ids() -> list[str]:
        return [r.id for r in svc.engine_rows()]

    def table_value() -> dict[str, Any]:
        # with headers: gradio 3.41 drops them for an empty list (and shows 1..9 instead)
        return {"headers": HEADERS, "data": table(svc.engine_rows())}

    notice = fleet_notice(svc.state.fleet)
    builds = notice is None
    host = svc.state.host
    with gr.Blocks(analytics_enabled=False) as ui:
        if notice is not None:
            gr.Markdown(notice, elem_id="sdtrt_fleet_notice")
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("### Build an engine\nProfiles are in WebUI units: images per batch x height x width "
                            "x prompt tokens. One shape is a static profile; `min:opt:max` is dynamic.")
                with gr.Row():
                    checkpoint = gr.Dropdown(label="Checkpoint", choices=checkpoint_titles(),
                                             value=current_checkpoint(), elem_id="sdtrt_checkpoint")
                    backend = gr.Dropdown(label="Backend", choices=list(BACKEND_CHOICES), value="auto",
                                          elem_id="sdtrt_backend")
                preset = gr.Dropdown(label="Preset", choices=list(PRESETS), value=None, elem_id="sdtrt_preset")
                profiles = gr.Textbox(label="Profiles (one per line)", lines=4, elem_id="sdtrt_profiles",
                                      placeholder="1x512x512x75\n1x256x256x75:1x512x512x75:4x768x768x150")
                with gr.Accordion("Profile editor", open=False):
                    fields: dict[str, list[Any]] = {}
                    for name, values, step in (("batch", (1, 1, 4), 1), ("height", (256, 512, 768), 8),
                                               ("width", (256, 512, 768), 8), ("tokens", (75, 75, 150), 75)):
                        with gr.Row():
                            fields[name] = [gr.Number(label=f"{name} {which}", value=v, precision=0, step=step)
                                            for which, v in zip(("min", "opt", "max"), values)]
                    add = gr.Button("Add profile", elem_id="sdtrt_add_profile")
                controlnet = gr.Checkbox(
                    label="ControlNet inputs: run sd-webui-controlnet's ControlNet, T2I-Adapter, ReVision, style "
                          "adapter and inpaint units on the engine (it serves plain generations too); "
                          "reference-only, IP-Adapter and ControlLLLite run on PyTorch",
                    value=False, elem_id="sdtrt_controlnet")
                targets = gr.Textbox(
                    label="GPU targets (TensorRT-RTX, ahead of time): e.g. sm86, sm89, sm120 to build for GPUs "
                          "this machine does not have (no GPU needed; the engine then embeds this checkpoint's "
                          "weights); empty: this GPU", value="", elem_id="sdtrt_targets")
                convention = gr.Dropdown(
                    label="Convention: whose UNet numerics the engine follows at sizes that are not multiples of "
                          "64 px (a1111: upsample x2, resize in the skip concatenation; forge: upsample to the "
                          "skip's size); default: this WebUI's", choices=list(CONVENTIONS),
                    value=host.unet_convention() if host is not None else A1111, elem_id="sdtrt_convention")
                build = gr.Button("Build", variant="primary", elem_id="sdtrt_build", interactive=builds)
                message = gr.Textbox(label="Result", interactive=False, elem_id="sdtrt_message")
            with gr.Column(scale=4):
                gr.Markdown("### Engines")
                engines = gr.Dataframe(headers=HEADERS, value=table_value(), interactive=False,
                                       wrap=True, elem_id="sdtrt_engines")
                with gr.Row():
                    to_delete = gr.Dropdown(label="Engine", choices=engine_ids(), elem_id="sdtrt_delete_id")
                    delete = gr.Button("Delete", variant="stop", elem_id="sdtrt_delete", interactive=builds)
                with gr.Row():
                    refresh = gr.Button("Refresh", elem_id="sdtrt_refresh")
                    rebuild = gr.Button("Rebuild stale engines", elem_id="sdtrt_rebuild", interactive=builds)

        def refreshed() -> tuple[Any, Any]:
            return gr.update(value=table_value()), gr.update(choices=engine_ids())

        def on_preset(name: str) -> str:
            return "\n".join(PRESETS.get(name, ()))

        def on_add(text: str, *values: float) -> Any:
            try:
                spec = profile_from_fields(values[0:3], values[3:6], values[6:9], values[9:12])
            except SdtrtError as e:
                return text, f"Profile not added: {e}"
            return (text.rstrip() + "\n" if text and text.strip() else "") + spec, ""

        def on_build(ckpt: str, text: str, be: str, cn: bool, aot: str, conv: str,
                     progress: Any = gr.Progress()) -> Any:  # noqa: B008
            msg = run_build(svc, ckpt, text, be, lambda f, d: progress(f, desc=d), controlnet=cn, targets=aot,
                            convention=conv)
            return (msg, *refreshed())

        def on_delete(engine_id: str) -> Any:
            return (delete_engine(svc, engine_id), *refreshed())

        def on_rebuild(progress: Any = gr.Progress()) -> Any:  # noqa: B008
            return (rebuild_stale(svc, lambda f, d: progress(f, desc=d)), *refreshed())

        editor = [c for name in ("batch", "height", "width", "tokens") for c in fields[name]]
        preset.change(on_preset, inputs=[preset], outputs=[profiles])
        add.click(on_add, inputs=[profiles, *editor], outputs=[profiles, message])
        build.click(on_build, inputs=[checkpoint, profiles, backend, controlnet, targets, convention],
                    outputs=[message, engines, to_delete])
        delete.click(on_delete, inputs=[to_delete], outputs=[message, engines, to_delete])
        refresh.click(refreshed, outputs=[engines, to_delete])
        rebuild.click(on_rebuild, outputs=[message, engines, to_delete])
    return ui

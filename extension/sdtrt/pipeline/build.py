"""From checkpoint to published engine, and from published engine to a loaded session: the headless path the CLI,
the WebUI tab and the REST API share."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from sdtrt.backends import get_backend
from sdtrt.backends.base import Backend, BackendInfo, BuildOptions, BuildResult, ProgressCallback, no_progress
from sdtrt.engine_types import RefitMode, WeightsMode
from sdtrt.models.convention import A1111, check_convention
from sdtrt.pipeline.checkpoint import build_unet, file_sha256, open_checkpoint
from sdtrt.pipeline.export import DTYPES, ExportSettings, export_unet, trace_device
from sdtrt.pipeline.families import ModelInfo
from sdtrt.profiles import Profile
from sdtrt.storage.key import EngineKey
from sdtrt.storage.manifest import Manifest
from sdtrt.storage.registry import Registry


def default_dtype(info: BackendInfo) -> str:
    """fp32 where the engine runs on a CPU (exact, and fast there); fp16 on GPUs, also ahead of time where this
    torch can trace float16 (torch 2.1, A1111's, traces float16 only on a GPU: fp32 there, with a note)."""
    if info.device == "cpu":
        return "float32"
    import torch

    from sdtrt.pipeline.export import cpu_computes

    return "float16" if cpu_computes(torch.float16) or torch.cuda.is_available() else "float32"


def supports_stripping(backend: Backend) -> bool:
    return backend.capabilities.strips_weights


def make_key(info: ModelInfo, profiles: Sequence[Profile], backend: Backend, settings: ExportSettings,
             options: BuildOptions, *, controlnet: bool = False, checkpoint_sha256: str | None = None,
             convention: str = A1111) -> EngineKey:
    """Everything that goes into an engine, and nothing else: the checkpoint's weights are part of it only when
    the engine cannot be refit (`checkpoint_sha256`); refittable engines are filled from any checkpoint of the
    same architecture. `options` are those the backend will really use (Backend.build_options)."""
    binfo = backend.build_info(options)
    refit = RefitMode.REFIT if options.refit else RefitMode.NONE
    return EngineKey(
        family=info.family_id,
        arch_hash=info.arch_hash,
        io=info.contract_for(controlnet, convention).record(),
        profiles=tuple(str(p) for p in profiles),
        backend=binfo.name,
        backend_version=binfo.version,
        device=binfo.device,
        compute_capability=binfo.compute_capability,
        refit_mode=refit,
        weights=WeightsMode.STRIPPED if options.strip_weights and options.refit and supports_stripping(backend)
        else WeightsMode.EMBEDDED,
        export=settings.to_dict(),
        # an engine that cannot take other weights is one checkpoint's engine: two checkpoints, two ids
        checkpoint_sha256=checkpoint_sha256 if refit is RefitMode.NONE else None,
        targets=options.targets,
    )


@dataclass(frozen=True)
class BuildOutcome:
    manifest: Manifest
    built: bool  # False when an identical engine was already in the cache
    #: what the build did differently from what was asked, and why (e.g. weights embedded without a GPU)
    notes: tuple[str, ...] = ()


def build_engine(
    checkpoint: Path,
    profiles: Sequence[Profile],
    cache: Path,
    *,
    config: Path | None = None,
    backend: str = "auto",
    dtype: str | None = None,
    options: BuildOptions | None = None,
    progress: ProgressCallback = no_progress,
    torch_guard: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    checkpoint_sha256: str | None = None,
    controlnet: bool = False,
    convention: str = A1111,
) -> BuildOutcome:
    """Export and build an engine for `checkpoint` with `profiles` into the cache, or reuse an identical one.

    `torch_guard()` is held while the UNet is created and exported (the part that uses torch); a host that
    changes torch globally (a model load in the WebUI) keeps its changes out of that window with it.
    `checkpoint_sha256`: the checkpoint's hash when the caller knows it (the WebUI does), so a cache hit reads
    nothing of a multi-GB file. `controlnet`: the engine takes ControlNet residuals too (`models/control.py`). `convention`: whose UNet numerics
    the engine follows at sizes that are not multiples of 64 px (`models/convention.py`: "a1111" or "forge")."""
    check_convention(convention)
    if not profiles:
        from sdtrt.errors import ProfileError

        raise ProfileError("give at least one profile (e.g. --profile 1x512x512x75)")
    options = options or BuildOptions(cache_dir=Path(cache) / ".cache")
    be = get_backend(backend, targets=options.targets)
    options, note = be.build_options(options)
    notes = [note] if note else []
    settings = ExportSettings(dtype=dtype or default_dtype(be.build_info(options)))
    if dtype is None and settings.dtype == "float32" and be.build_info(options).device != "cpu":
        notes.append("float32 engine: this torch traces float16 only on a GPU (torch 2.1); build with a newer torch "
                     "(python -m sdtrt build) or on a GPU machine for a float16 engine")
    trace_device(DTYPES[settings.dtype])  # a precision this machine cannot export is refused before any reading
    ckpt, sd = open_checkpoint(checkpoint, config)
    checkpoint_sha256 = checkpoint_sha256 or file_sha256(ckpt.path)
    key = make_key(ckpt.info, profiles, be, settings, options, controlnet=controlnet,
                   checkpoint_sha256=checkpoint_sha256, convention=convention)
    contract = ckpt.info.contract_for(controlnet, convention)
    engine_profiles = [contract.engine_ranges(p) for p in profiles]
    registry = Registry(cache)
    calls = []
    keys = set(sd)
    weights = [sd]  # handed to the export, which drops them as it goes (nothing else holds them)
    del sd

    def produce(tmp: Path) -> BuildResult:
        calls.append(time.perf_counter())
        onnx_dir = tmp / "onnx"
        with torch_guard():
            # the module shares the checkpoint's tensors and the export converts it in place: one copy of the
            # weights in memory (an SDXL export peaks far lower)
            unet = build_unet(ckpt.info, weights.pop() if weights else open_checkpoint(checkpoint, config)[1],
                              share=True, convention=convention)
            exported = export_unet(unet, contract, onnx_dir, settings, state_dict_keys=keys, owned=True,
                                   progress=lambda ph, f: progress(ph, 0.3 * f))
            del unet
        result = be.build(exported.onnx_path, engine_profiles, tmp, options,
                          progress=lambda ph, f: progress(ph, 0.3 + 0.7 * f))
        # the ONNX was an intermediate unless the backend kept it as its engine (hard links survive this)
        for f in onnx_dir.iterdir():
            f.unlink()
        onnx_dir.rmdir()
        return result

    source = {"name": ckpt.path.name, "sha256": checkpoint_sha256}
    manifest = registry.build(key, source, produce, progress=progress)
    progress("done", 1.0)
    return BuildOutcome(manifest, built=bool(calls), notes=tuple(notes))

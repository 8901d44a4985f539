"""Run an engine and the PyTorch UNet on the same random inputs and report how close they are and how fast."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdtrt.errors import NoMatchingProfile, SdtrtError
from sdtrt.pipeline.checkpoint import build_unet, file_sha256, open_checkpoint
from sdtrt.pipeline.export import DTYPES
from sdtrt.pipeline.lora import LoraSpec
from sdtrt.profiles import Shape
from sdtrt.serving.session import EngineSession
from sdtrt.storage.registry import Registry


@dataclass(frozen=True)
class CheckRow:
    shape: str
    max_abs_diff: float
    max_abs_out: float
    rel_diff: float
    torch_ms: float
    engine_ms: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def timed_samples(fn: Callable[[], object], repeats: int, *, sync: bool) -> list[float]:
    """Seconds of each of `repeats` calls; with `sync`, the GPU is synchronised before and after each."""
    out = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    out = fn()  # warm-up (and the result we compare)
    times = timed_samples(fn, repeats, sync=torch.cuda.is_available())
    return out, statistics.median(times) * 1000


def check_engine(cache: Path, engine_id: str, checkpoint: Path, shapes: Sequence[Shape], *,
                 config: Path | None = None, seed: int = 0, repeats: int = 3,
                 loras: Sequence[LoraSpec] = ()) -> list[CheckRow]:
    """Compare engine and PyTorch UNet at each shape (user units; CFG batch = 2 x images), both with the
    checkpoint's weights (refitted into the engine) and the given LoRAs merged."""
    registry = Registry(cache)
    session = EngineSession.open(registry, engine_id)
    try:
        ckpt, sd = open_checkpoint(checkpoint, config)
        if ckpt.info.arch_hash != session.manifest.key.arch_hash:
            raise SdtrtError(
                f"engine {engine_id} is for a {session.manifest.key.family} UNet of another architecture; "
                f"{ckpt.path.name} is {ckpt.info.describe()}"
            )
        session.load_weights(sd, file_sha256(ckpt.path))
        if loras:
            from sdtrt.pipeline.lora import lora_weights, read_lora

            def base(names: Sequence[str]) -> dict[str, torch.Tensor]:
                return {n: sd[n] for n in names if n in sd}

            changed = lora_weights([(spec, read_lora(spec.path)) for spec in loras], sd.keys(), base)
            session.apply_deltas(tuple(str(spec) for spec in loras), changed, base)
            sd = {**sd, **changed}
        dtype = DTYPES[str(session.manifest.key.export.get("dtype", "float32"))]
        device = "cuda" if session.manifest.key.device != "cpu" and torch.cuda.is_available() else "cpu"
        # the reference computes as the engine's convention says (A1111's or Forge's upsampling)
        unet = build_unet(ckpt.info, sd, convention=session.contract.io.convention).to(device, dtype)
        rows = []
        g = torch.Generator().manual_seed(seed)
        for shape in shapes:
            dims = session.contract.call_dims(shape)
            if session.spec.profile_for(dims) is None:
                raise NoMatchingProfile(
                    f"shape {shape} is outside every profile of {engine_id}: "
                    f"{', '.join(map(str, session.profiles))}"
                )
            feeds = session.contract.random_feeds(dims, device, dtype, g)
            with torch.no_grad():
                ref, torch_ms = _time(functools.partial(session.contract.torch_call, unet, feeds), repeats)
                out, engine_ms = _time(functools.partial(session, feeds), repeats)
            diff = (out.float().to(ref.device) - ref.float()).abs().max().item()
            scale = ref.float().abs().max().item()
            rows.append(CheckRow(str(shape), diff, scale, diff / scale if scale else float("inf"), torch_ms,
                                 engine_ms))
        return rows
    finally:
        session.close()

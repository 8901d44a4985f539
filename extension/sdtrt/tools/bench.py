"""Benchmarks (`python -m sdtrt bench ...`): measured in one run, reported as numbers, never asserted by tests.

latency: per UNet call, the engine against the PyTorch UNet (SDPA attention, the way A1111 runs it) on the same
inputs in one run: median and p10-p90, the ratio, it/s, the host overhead of our serving layer, build and full
refit time, peak device memory on GPUs. JSON and a PNG chart. ControlNet: an engine with ControlNet inputs against
the PyTorch blocks with the same residuals. (refit: tools/bench_refit.py; build: tools/bench_build.py.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from sdtrt.models.torch_unet import UNetSpec
from sdtrt.tools.bench_refit import FULL_SPECS
from sdtrt.tools.check import timed_samples
from sdtrt.tools.tiny import standard_spec, write_checkpoint


def to_dicts(rows: Sequence[object]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]  # type: ignore[call-overload]


# ---- latency: engine vs PyTorch per UNet call --------------------------------------------------------------------
#: name -> (spec, pixel size). tiny/small for CPUs; the full-size ones are for GPUs (random weights, no download).
LATENCY_MODELS: dict[str, tuple[UNetSpec, int]] = {
    "tiny": (standard_spec(num_heads=2), 64),
    "small": (standard_spec(model_channels=64, channel_mult=(1, 2, 4), transformer_depth=(1, 1, 1), num_heads=4),
              256),
    "sd15": (FULL_SPECS["sd15"], 512),
    "sd21": (standard_spec(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                           transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, context_dim=1024,
                           use_linear=True, num_head_channels=64), 768),
    "sdxl": (FULL_SPECS["sdxl"], 1024),
}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        s = sorted(samples)

        def q(f: float) -> float:
            return s[min(len(s) - 1, int(f * len(s)))] * 1000

        return cls(q(0.5), q(0.1), q(0.9))


@dataclass(frozen=True)
class LatencyRow:
    model: str
    pixels: int
    batch: int  # images; the UNet call has 2 x batch rows (CFG)
    backend: str
    device: str
    dtype: str
    torch: Timing
    engine: Timing  # with CUDA graphs where the backend has them
    engine_no_graphs: Timing | None  # the same engine loaded with graphs off (GPU backends with graphs only)
    torch_xformers: Timing | None  # the PyTorch UNet with xformers attention (GPU, when xformers is installed)
    ratio: float  # engine / torch median; < 1 is faster
    torch_it_s: float  # sampler steps per second if every step is one such call
    engine_it_s: float
    host_overhead_ms: float  # our layer around the backend call (profile choice, feeds, counters), per call
    build_s: float
    refit_s: float
    torch_device_bytes: int | None  # device memory in use while the PyTorch UNet runs (engine not loaded)
    engine_device_bytes: int | None  # ... while the engine runs (PyTorch UNet off the device)
    cuda_graphs: dict[str, object]  # the engine runner's graph counters after the run


def _timed(fn: Callable[[], object], repeats: int, device: str) -> list[float]:
    """Seconds per call after two warm-up calls, synchronising the GPU around each call."""
    for _ in range(2):
        fn()
    return timed_samples(fn, repeats, sync=device.startswith("cuda"))


def _xformers_attention() -> Callable[..., torch.Tensor] | None:
    """An SDPA-compatible function running xformers' memory-efficient attention, or None without xformers."""
    try:
        import xformers.ops as xops  # type: ignore[import-not-found]
    except ImportError:
        return None

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        # SDPA's layout is (batch, heads, tokens, dim); xformers wants (batch, tokens, heads, dim)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return attention


def _with_attention(fn: Callable[[], object], attention: Callable[..., torch.Tensor]) -> Callable[[], object]:
    from sdtrt.pipeline.export import swapped_attention

    def call() -> object:
        with swapped_attention(attention):
            return fn()

    return call


def _device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def _interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call for each function, measured in alternating rounds (A B, B A, ...) so that drift of a
    shared machine (clocks, other processes) hits all of them alike. Two warm-up calls each first."""
    sync = device.startswith("cuda")
    for fn in fns.values():
        fn()
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    for i in range(repeats):
        for name, fn in items if i % 2 == 0 else reversed(items):
            out[name] += timed_samples(fn, 1, sync=sync)
    return out


def latency_bench(model: str, batch: int, work: Path, *, backend: str = "auto", repeats: int = 10
                  ) -> LatencyRow:
    from sdtrt.backends import backend_class
    from sdtrt.pipeline.build import build_engine
    from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
    from sdtrt.profiles import Profile, Shape
    from sdtrt.serving.counters import Counters
    from sdtrt.serving.server import FixedPolicy, UnetServer
    from sdtrt.serving.session import EngineSession
    from sdtrt.serving.slot import EngineSlot
    from sdtrt.serving.spec import engine_contract
    from sdtrt.storage.registry import Registry

    spec, pixels = LATENCY_MODELS[model]
    ckpt = write_checkpoint(spec, work / model, "bench-0")
    shape = Shape(batch, pixels, pixels, 75)
    t0 = time.perf_counter()
    out = build_engine(ckpt, [Profile.static(shape)], work / "cache", backend=backend)
    build_s = time.perf_counter() - t0
    m = out.manifest
    device = "cpu" if m.key.device == "cpu" else "cuda"
    gpu = device == "cuda"
    dtype = torch.float32 if m.key.export.get("dtype") == "float32" else torch.float16
    info, sd = open_checkpoint(ckpt)
    unet = build_unet(info.info, sd).to(device, dtype)
    registry = Registry(work / "cache")
    contract = engine_contract(m)
    feeds = contract.random_feeds(contract.call_dims(shape), device, dtype, torch.Generator().manual_seed(0))
    args, kwargs = contract.host_args(feeds)
    torch_used = engine_used = None
    with torch.no_grad():
        if gpu:  # memory first, each side alone on the device
            unet(*args, **kwargs)
            torch.cuda.synchronize()
            torch_used = _device_used()
            unet.to("cpu")
            torch.cuda.empty_cache()
        session = EngineSession.open(registry, m.id)
        plain = None
        try:
            t0 = time.perf_counter()
            session.load_weights(sd, "refit-timing")  # a full refit with every weight, as a checkpoint switch does
            refit_s = time.perf_counter() - t0
            if gpu:
                session.runner.infer(feeds, 0)
                torch.cuda.synchronize()
                engine_used = _device_used()
                unet.to(device)
            fns: dict[str, Callable[[], object]] = {
                "torch": lambda: unet(*args, **kwargs),
                "engine": lambda: session.runner.infer(feeds, 0),
            }
            xformers = _xformers_attention() if gpu else None
            if xformers is not None:
                fns["xformers"] = _with_attention(fns["torch"], xformers)
            if gpu and "cuda_graphs" in session.runner.stats():
                plain = backend_class(m.key.backend)(cuda_graphs=False).load(
                    registry.engine_dir(m.id), [f.name for f in m.files], list(session.spec.ranges))
                if plain.needs_weights:
                    plain.refit({k: v for k, v in sd.items() if k in plain.weight_names()})
                fns["no_graphs"] = lambda: plain.infer(feeds, 0)
            samples = _interleaved(fns, repeats, device)
            graphs = dict(session.runner.stats().get("cuda_graphs", {}))
            # our layer alone: the same server path with the backend call replaced by returning its last output
            last = session.runner.infer(feeds, 0)
            # a real session (its lock is part of the path) around a runner that answers at once
            stub = EngineSession(session.spec, SimpleNamespace(infer=lambda feeds, index: last),  # type: ignore[arg-type]
                                 None)
            slot = EngineSlot(m, lambda _id: stub)
            server = UnetServer([slot], policy=FixedPolicy(lambda *a, **k: last), counters=Counters())
            served_s = _timed(lambda: server(*args, **kwargs), max(200, repeats), device)
        finally:
            session.close()
            if plain is not None:
                plain.close()
    te, tt, ts = Timing.of(samples["engine"]), Timing.of(samples["torch"]), Timing.of(served_s)
    tn = Timing.of(samples["no_graphs"]) if "no_graphs" in samples else None
    tx = Timing.of(samples["xformers"]) if "xformers" in samples else None
    return LatencyRow(model, pixels, batch, m.key.backend, device, str(dtype).replace("torch.", ""), tt, te, tn, tx,
                      te.median_ms / tt.median_ms, 1000 / tt.median_ms, 1000 / te.median_ms,
                      ts.median_ms, build_s, refit_s, torch_used, engine_used, graphs)


@dataclass(frozen=True)
class ControlNetRow:
    """A ControlNet unit's UNet call: the engine with ControlNet inputs against PyTorch running the UNet's blocks
    with the same residuals added (what sd-webui-controlnet does on PyTorch), and what the control inputs cost a
    plain call (the same engine fed zeros against the plain engine). The ControlNet model itself runs on PyTorch
    in both cases and is not timed."""

    model: str
    pixels: int
    batch: int
    backend: str
    device: str
    dtype: str
    torch: Timing  # PyTorch UNet blocks with the residuals
    engine: Timing  # engine with ControlNet inputs, residuals fed
    ratio: float  # engine / torch median
    plain_engine: Timing  # the plain engine, plain call
    control_engine_plain_call: Timing  # the engine with ControlNet inputs, plain call (zeros)
    plain_call_cost: float  # control_engine_plain_call / plain_engine median (1.0 = free)


def controlnet_bench(model: str, batch: int, work: Path, *, backend: str = "auto", repeats: int = 10
                     ) -> ControlNetRow:
    from sdtrt.pipeline.build import build_engine
    from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
    from sdtrt.profiles import Profile, Shape
    from sdtrt.serving.session import EngineSession
    from sdtrt.serving.spec import engine_contract
    from sdtrt.storage.registry import Registry

    spec, pixels = LATENCY_MODELS[model]
    ckpt = write_checkpoint(spec, work / f"{model}-cn", "bench-0")
    shape = Shape(batch, pixels, pixels, 75)
    cache = work / "cache-cn"
    plain_m = build_engine(ckpt, [Profile.static(shape)], cache, backend=backend).manifest
    m = build_engine(ckpt, [Profile.static(shape)], cache, backend=backend, controlnet=True).manifest
    device = "cpu" if m.key.device == "cpu" else "cuda"
    dtype = torch.float32 if m.key.export.get("dtype") == "float32" else torch.float16
    info, sd = open_checkpoint(ckpt)
    unet = build_unet(info.info, sd).to(device, dtype)
    contract, plain_contract = engine_contract(m), engine_contract(plain_m)
    g = torch.Generator().manual_seed(0)
    feeds = contract.random_feeds(contract.call_dims(shape), device, dtype, g)
    plain_feeds = {k: v for k, v in feeds.items() if k in plain_contract.input_names()}
    zero_feeds = contract.feeds(*plain_contract.host_args(plain_feeds))
    registry = Registry(cache)
    with torch.no_grad():
        session, plain = EngineSession.open(registry, m.id), EngineSession.open(registry, plain_m.id)
        try:
            samples = _interleaved({
                "torch": lambda: contract.torch_call(unet, feeds),
                "engine": lambda: session.runner.infer(feeds, 0),
                "plain": lambda: plain.runner.infer(plain_feeds, 0),
                "zeros": lambda: session.runner.infer(zero_feeds, 0),
            }, repeats, device)
        finally:
            session.close()
            plain.close()
    tt, te, tp, tz = (Timing.of(samples[k]) for k in ("torch", "engine", "plain", "zeros"))
    return ControlNetRow(model, pixels, batch, m.key.backend, device, str(dtype).replace("torch.", ""), tt, te,
                         te.median_ms / tt.median_ms, tp, tz, tz.median_ms / tp.median_ms)


def format_controlnet(rows: Sequence[ControlNetRow]) -> str:
    lines = [("ControlNet  model  px    batch backend      torch+residuals_ms engine_ms ratio  plain_engine_ms "
              "zeros_fed_ms plain_call_cost")]
    for r in rows:
        lines.append(f"ControlNet  {r.model:6} {r.pixels:5} {r.batch:5} {r.backend:12} {r.torch.median_ms:18.2f} "
                     f"{r.engine.median_ms:9.2f} {r.ratio:5.3f} {r.plain_engine.median_ms:15.2f} "
                     f"{r.control_engine_plain_call.median_ms:12.2f} {r.plain_call_cost:15.3f}")
    return "\n".join(lines)


def format_latency(rows: Sequence[LatencyRow]) -> str:
    lines = [("model  px    batch backend      device dtype    torch_ms (p10-p90)   engine_ms (p10-p90)  ratio  "
              "no_graphs_ms overhead_ms build_s refit_s")]
    for r in rows:
        lines.append(
            f"{r.model:6} {r.pixels:5} {r.batch:5} {r.backend:12} {r.device:6} {r.dtype:8} "
            f"{r.torch.median_ms:8.2f} ({r.torch.p10_ms:.1f}-{r.torch.p90_ms:.1f}) "
            f"{r.engine.median_ms:8.2f} ({r.engine.p10_ms:.1f}-{r.engine.p90_ms:.1f}) {r.ratio:6.3f} "
            f"{'-' if r.engine_no_graphs is None else f'{r.engine_no_graphs.median_ms:.2f}':>12} "
            f"{r.host_overhead_ms:11.3f} {r.build_s:7.1f} {r.refit_s:7.2f}")
    return "\n".join(lines)


def latency_chart(rows: Sequence[LatencyRow], path: Path) -> Path:
    """A bar chart (PIL only): per row, median ms per UNet call of PyTorch (and PyTorch+xformers), the engine
    without CUDA graphs and the engine as served, with the engine/PyTorch ratio."""
    from PIL import Image, ImageDraw

    def bars(r: LatencyRow) -> list[tuple[str, float, tuple[int, int, int]]]:
        out = [("PyTorch SDPA", r.torch.median_ms, (120, 120, 120))]
        if r.torch_xformers is not None:
            out.append(("PyTorch xformers", r.torch_xformers.median_ms, (170, 170, 170)))
        if r.engine_no_graphs is not None:
            out.append((f"{r.backend} no graphs", r.engine_no_graphs.median_ms, (129, 199, 132)))
        out.append((r.backend, r.engine.median_ms, (46, 125, 50)))
        return out

    width, bar_h, gap, left = 900, 18, 14, 220
    height = 40 + sum(len(bars(r)) * bar_h + gap for r in rows) + 30
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "UNet call latency, median ms (shorter is faster); label: model px, images x2 (CFG)", fill="black")
    top = max((ms for r in rows for _, ms, _ in bars(r)), default=1.0)
    scale = (width - left - 160) / top
    y0 = 40
    for r in rows:
        d.text((10, y0 + bar_h // 2), f"{r.model} {r.pixels}px b{r.batch} {r.device}", fill="black")
        row = bars(r)
        for i, (label, ms, color) in enumerate(row):
            y = y0 + i * bar_h
            d.rectangle([left, y, left + max(1, int(ms * scale)), y + bar_h - 3], fill=color)
            last = i == len(row) - 1
            d.text((left + int(ms * scale) + 6, y + 2), f"{label} {ms:.2f} ms" + (f"  x{r.ratio:.2f}" if last else ""),
                   fill="black")
        y0 += len(row) * bar_h + gap
    img.save(path)
    return path

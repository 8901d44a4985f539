"""Benchmarks (`python -m sdtrt bench ...`): measured in one run, reported as numbers, never asserted by tests.

latency: per UNet call, the engine against the PyTorch UNet (SDPA attention, the way A1111 runs it) on the same
inputs in one run: median and p10-p90, the ratio, it/s, the host overhead of our serving layer, build and full
refit time, peak device memory on GPUs. JSON and a PNG chart.

refit: what a LoRA costs on the host side for a full-size UNet (random weights, nothing downloaded): computing the
new weights of a rank-r LoRA on every attention and feed-forward Linear, planning the refit, and the size of what
would be sent to the engine; then switching to another LoRA (the previous one's weights restored).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from sdtrt.tools.check import timed_samples
from sdtrt.constants import SD1_CONTEXT_DIM, SDXL_BASE_CONTEXT_DIM, SDXL_BASE_Y_WIDTH
from sdtrt.pipeline.lora import LoraSpec, lora_weights
from sdtrt.pipeline.refit import WeightTracker
from sdtrt.tools.tiny import standard_spec, write_checkpoint
from sdtrt.models.torch_unet import UNetModel, UNetSpec

#: Full-size UNets as their LDM/SGM configs lay them out.
FULL_SPECS: dict[str, UNetSpec] = {
    "sd15": standard_spec(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                          transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, context_dim=SD1_CONTEXT_DIM,
                          num_heads=8),
    "sdxl": standard_spec(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 2, 10),
                          transformer_depth_middle=10, context_dim=SDXL_BASE_CONTEXT_DIM, use_linear=True,
                          num_head_channels=64, adm_in_channels=SDXL_BASE_Y_WIDTH),
}
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass(frozen=True)
class RefitBench:
    family: str
    device: str
    dtype: str
    unet_weights: int
    unet_bytes: int
    rank: int
    lora_layers: int
    compute_s: float  # new weight values of the LoRA set (up @ down, scale, merge)
    plan_s: float
    weights_touched: int
    bytes_touched: int
    switch_compute_s: float  # another LoRA: its weights, plus the previous ones restored
    switch_weights_touched: int


def shapes(spec: UNetSpec) -> dict[str, torch.Size]:
    with torch.device("meta"):
        unet = UNetModel(spec)
    return {k: v.shape for k, v in unet.state_dict().items()}


def _lora(shape_of: Mapping[str, torch.Size], rank: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    groups = {}
    for name, shape in shape_of.items():
        path = name[: -len(".weight")]
        if name.endswith(".weight") and path.endswith(LORA_TARGETS) and len(shape) == 2:
            groups["lora_unet_" + path.replace(".", "_")] = {
                "lora_down.weight": torch.randn(rank, shape[1], generator=g) * 0.01,
                "lora_up.weight": torch.randn(shape[0], rank, generator=g) * 0.01,
                "alpha": torch.tensor(float(rank)),
            }
    return groups


def refit_bench(family: str, rank: int = 32, device: str = "cpu", dtype: torch.dtype = torch.float16) -> RefitBench:
    shape_of = shapes(FULL_SPECS[family])
    cache: dict[str, torch.Tensor] = {}

    def base(names: Sequence[str]) -> dict[str, torch.Tensor]:
        for n in names:
            if n not in cache:
                cache[n] = torch.randn(shape_of[n], dtype=torch.float32).to(device, dtype)
        return {n: cache[n] for n in names}

    a, b = _lora(shape_of, rank, 1), _lora(shape_of, rank, 2)
    b = dict(list(b.items())[: len(b) // 2])  # B touches half the layers: A's other half must be restored
    spec_a, spec_b = LoraSpec(Path("a.safetensors"), 0.8), LoraSpec(Path("b.safetensors"), 0.8)
    tracker = WeightTracker()
    base([n for n in shape_of if n.endswith(".weight") and n[:-7].endswith(LORA_TARGETS)])  # "resident" weights

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    new_a = lora_weights([(spec_a, a)], shape_of, base)
    sync()
    t1 = time.perf_counter()
    plan_a = tracker.plan("a", new_a, base)
    t2 = time.perf_counter()
    assert plan_a is not None
    tracker.applied(plan_a)
    t3 = time.perf_counter()
    new_b = lora_weights([(spec_b, b)], shape_of, base)
    plan_b = tracker.plan("b", new_b, base)
    sync()
    t4 = time.perf_counter()
    assert plan_b is not None
    return RefitBench(
        family=family, device=device, dtype=str(dtype).replace("torch.", ""),
        unet_weights=len(shape_of), unet_bytes=sum(s.numel() for s in shape_of.values()) * dtype.itemsize,
        rank=rank, lora_layers=len(a), compute_s=t1 - t0, plan_s=t2 - t1,
        weights_touched=len(plan_a.weights), bytes_touched=sum(t.numel() * t.element_size()
                                                               for t in plan_a.weights.values()),
        switch_compute_s=t4 - t3, switch_weights_touched=len(plan_b.weights),
    )


def format_refit(rows: Sequence[RefitBench]) -> str:
    lines = [("family  device dtype    weights  GiB   rank layers  compute_s  plan_s  touched  MiB     switch_s "
              "switch_touched")]
    for r in rows:
        lines.append(f"{r.family:7} {r.device:6} {r.dtype:8} {r.unet_weights:7} {r.unet_bytes / 2**30:5.2f} "
                     f"{r.rank:4} {r.lora_layers:6} {r.compute_s:9.3f} {r.plan_s:7.4f} {r.weights_touched:7} "
                     f"{r.bytes_touched / 2**20:7.1f} {r.switch_compute_s:8.3f} {r.switch_weights_touched:7}")
    return "\n".join(lines)


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
    from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile, Shape
    from sdtrt.storage.registry import Registry
    from sdtrt.serving.session import EngineSession, engine_contract
    from sdtrt.serving.server import Counters, EngineSlot, UnetServer

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
                    registry.engine_dir(m.id), [f.name for f in m.files], session.ranges)
                if plain.needs_weights:
                    plain.refit({k: v for k, v in sd.items() if k in plain.weight_names()})
                fns["no_graphs"] = lambda: plain.infer(feeds, 0)
            samples = _interleaved(fns, repeats, device)
            graphs = dict(session.runner.stats().get("cuda_graphs", {}))
            # our layer alone: the same server path with the backend call replaced by returning its last output
            last = session.runner.infer(feeds, 0)
            # a real session (its lock is part of the path) around a runner that answers at once
            stub = EngineSession(m, SimpleNamespace(infer=lambda feeds, index: last),  # type: ignore[arg-type]
                                 session.profiles, session.ranges, session.contract, None)
            slot = EngineSlot(m, lambda _id: stub)
            server = UnetServer([slot], fallback=lambda *a, **k: last, counters=Counters(), notify=lambda r: None)
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
    from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile, Shape
    from sdtrt.storage.registry import Registry
    from sdtrt.serving.session import EngineSession, engine_contract

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

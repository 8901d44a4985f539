"""`python -m sdtrt bench refit`: what a LoRA costs on the host side for a full-size UNet (random weights, nothing
downloaded): computing the new weights of a rank-r LoRA on every attention and feed-forward Linear, planning the
refit, and the size of what would be sent to the engine; then switching to another LoRA (the previous one's weights
restored). Measured in one run, reported as numbers, never asserted by tests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtrt.constants import SD1_CONTEXT_DIM, SDXL_BASE_CONTEXT_DIM, SDXL_BASE_Y_WIDTH
from sdtrt.models.torch_unet import UNetModel, UNetSpec
from sdtrt.pipeline.lora import LoraSpec, lora_weights
from sdtrt.pipeline.refit import WeightTracker
from sdtrt.tools.tiny import standard_spec

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

"""Fake-only recorder: every UNet call (at the routed call site and inside the torch UNet) and every explicit
`.to(device)` of the UNet or its wrapper. Not part of A1111; the harness exposes it as `host.unet_calls`/`host.moves`."""

from __future__ import annotations

import threading

import torch

#: dicts: where ("routed": the wrapper's `diffusion_model(...)` call, "torch": the torch UNet's own forward),
#: x/context/y shapes, x/timesteps dtypes, how timesteps and y were passed, the active sd_unet label (routed only).
calls: list[dict] = []
#: (owner class name, device string) for each `.to()` with a device on a recording module.
moves: list[tuple[str, str]] = []


def _shape(t: object) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def record_call(where: str, x: torch.Tensor, timesteps: object, context: object, y: object,
                kwargs: dict, *, timesteps_positional: bool, engine: str | None = None) -> None:
    calls.append({
        "where": where,
        "x": _shape(x),
        "x_dtype": x.dtype,
        "timesteps": _shape(timesteps),
        "t_dtype": getattr(timesteps, "dtype", None),
        "t_values": timesteps.detach().float().cpu().tolist() if isinstance(timesteps, torch.Tensor) else timesteps,
        "timesteps_positional": timesteps_positional,
        "context": _shape(context),
        "context_dtype": getattr(context, "dtype", None),
        "y": _shape(y),
        "kwargs": sorted(kwargs),
        "engine": engine,
    })


class RecordsMoves:
    """Mixin for torch modules: records `.to(device)` calls made on this module itself."""

    def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            moves.append((type(self).__name__, str(device)))
        return super().to(*args, **kwargs)  # type: ignore[misc]


#: Fake-only: when set to an Event, a model load waits for it inside InitializeOnMeta (torch patched process-wide),
#: as a real load of a big checkpoint takes a while in that state. `loading` is set while one waits there.
load_gate: threading.Event | None = None
loading = threading.Event()


def wait_at_load_gate() -> None:
    gate = load_gate
    if gate is None:
        return
    loading.set()
    try:
        gate.wait(timeout=120)
    finally:
        loading.clear()


def clear() -> None:
    calls.clear()
    moves.clear()

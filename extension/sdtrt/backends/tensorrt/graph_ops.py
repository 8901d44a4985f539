"""CUDA graphs over a TensorRT execution context: the static buffers of one (profile, shapes) key and the GraphOps
(see backends/graphs.py, which keeps the per-key bookkeeping) that allocate, bind, launch, capture and replay them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from sdtrt.backends.tensorrt.tensors import dims

if TYPE_CHECKING:
    import tensorrt
    import torch


class ContextOwner(Protocol):
    """What the graph operations need of a runner (TensorRTRunner is one): its live context, streams, tensor names
    and dtypes, and how it selects a profile and runs."""

    device: torch.device
    inputs: list[str]
    outputs: list[str]
    main_output: str
    dtypes: dict[str, torch.dtype]

    def live(self) -> tuple[tensorrt.ICudaEngine, tensorrt.IExecutionContext]: ...

    def streams(self) -> tuple[torch.cuda.Stream, torch.cuda.Stream]: ...

    def select(self, profile_index: int, shapes: Mapping[str, tuple[int, ...]]) -> None: ...

    def execute(self, stream: torch.cuda.Stream) -> None: ...


@dataclass
class StaticBuffers:
    """One key's static buffers: the graph (or the bound context) reads and writes exactly these."""

    profile: int
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    main: torch.Tensor


class TensorRTGraphOps:
    """GraphOps over one runner's execution context and streams."""

    def __init__(self, runner: ContextOwner) -> None:
        self._r = runner
        self._capture_stream: torch.cuda.Stream | None = None

    def allocate(self, key: Hashable, feeds: Mapping[str, torch.Tensor]) -> StaticBuffers:
        import torch

        r = self._r
        _, context = r.live()
        profile = cast(tuple[Any, ...], key)[0]
        shapes = {n: tuple(feeds[n].shape) for n in r.inputs}
        r.select(profile, shapes)  # output shapes follow from the input shapes
        inputs = {n: torch.empty(shapes[n], dtype=r.dtypes[n], device=r.device) for n in r.inputs}
        outputs = {
            n: torch.empty(dims(context.get_tensor_shape(n)), dtype=r.dtypes[n], device=r.device) for n in r.outputs
        }
        return StaticBuffers(profile, inputs, outputs, outputs[r.main_output])

    def bind(self, buffers: StaticBuffers) -> None:
        r = self._r
        _, context = r.live()
        r.select(buffers.profile, {n: tuple(t.shape) for n, t in buffers.inputs.items()})
        for name, tensor in (*buffers.inputs.items(), *buffers.outputs.items()):
            context.set_tensor_address(name, tensor.data_ptr())

    def load(self, buffers: StaticBuffers, feeds: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in buffers.inputs.items():
            tensor.copy_(feeds[name], non_blocking=True)  # converts dtype and device on the caller's stream

    def launch(self) -> None:
        caller, stream = self._r.streams()
        self._r.execute(stream)
        if stream is not caller:
            caller.wait_stream(stream)

    def capture(self) -> Any:
        import torch

        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self._r.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's unrelated CUDA calls (a preview decode) do not break this capture.
        with torch.cuda.graph(graph, stream=self._capture_stream, capture_error_mode="thread_local"):
            self._r.execute(self._capture_stream)
        return graph

    def replay(self, graph: Any) -> None:
        graph.replay()  # on the caller's current stream, after the input copies queued there

    def release(self, graph: Any) -> None:
        graph.reset()

    def output(self, buffers: StaticBuffers) -> torch.Tensor:
        return buffers.main

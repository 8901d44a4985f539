"""ONNX export of a model, from a clean module, with initializers named after the model's state-dict keys.

The graph's inputs, output, dynamic axes and example inputs are the model contract's (`sdtrt.models`; for the
UNets: sample, timesteps in float32, context rows and, for SDXL, y; batch, latent size and token count dynamic).
Weights keep their
PyTorch names because constant folding is off (a Linear's weight reaches MatMul through a Transpose), so any weight
can later be refit by name. The graph's dtype is the export dtype: an fp16 graph carries its own precision (fp32
GroupNorm through Casts), which is what strongly typed TensorRT 11 and TensorRT-RTX need.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtrt.backends.base import ProgressCallback, no_progress
from sdtrt.constants import DEFAULT_OPSET, MIN_OPSET
from sdtrt.errors import ExportError
from sdtrt.models import ModelContract
from sdtrt.models.base import WRAPPED

#: Above this many bytes of weights the ONNX is written with one external data file (protobuf stops at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
ONNX_NAME = "unet.onnx"
WEIGHTS_NAME = "weights.json"

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class ExportSettings:
    """dtype: "float32" (exact; what ONNX Runtime on CPU runs) or "float16" (TensorRT, GPUs).
    opset: >= 17 so LayerNorm stays one node."""

    dtype: str = "float32"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"export dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.opset < MIN_OPSET:
            raise ExportError(f"opset {self.opset} is too old; use {MIN_OPSET} or newer")

    def to_dict(self) -> dict[str, object]:
        return {"dtype": self.dtype, "opset": self.opset, "exporter": f"torchscript/torch-{torch.__version__}"}


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    weight_names: list[str]
    external_data: bool


def _math_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, **_: Any) -> torch.Tensor:
    """Plain matmul-softmax-matmul: the pattern TensorRT fuses into its attention kernels."""
    if attn_mask is not None or is_causal or dropout_p:
        raise ExportError("attention masks, causal attention and dropout are not expected in an SD UNet export")
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.softmax((q @ k.transpose(-2, -1)) * s, dim=-1) @ v


@contextlib.contextmanager
def swapped_attention(attention: Callable[..., torch.Tensor]) -> Iterator[None]:
    """torch's SDPA replaced by `attention` (same signature) inside the block; restored even when it raises. The UNet
    looks SDPA up at call time, so this reaches every attention layer."""
    orig = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = attention  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


def plain_attention() -> AbstractContextManager[None]:
    """The plain matmul-softmax-matmul while tracing (the pattern TensorRT fuses)."""
    return swapped_attention(_math_sdpa)


@contextlib.contextmanager
def clean_module(unet: torch.nn.Module, dtype: torch.dtype, owned: bool = False) -> Iterator[torch.nn.Module]:
    """A CPU copy of `unet` in `dtype` in eval mode, without touching the original's weights.

    The original is moved to the CPU (lossless) to make the copy without doubling device memory, and moved back,
    with its training flag, in `finally`. `owned`: the caller gives `unet` up: it is converted in place (no copy)
    and its weights are released afterwards (it is left on the meta device, unusable)."""
    if owned:
        try:
            yield unet.to("cpu").to(dtype).eval().requires_grad_(False)
        finally:
            unet.to("meta")
        return
    params = list(unet.parameters())
    device = params[0].device if params else torch.device("cpu")
    training = unet.training
    try:
        unet.to("cpu")
        work = copy.deepcopy(unet).to(dtype).eval().requires_grad_(False)
        yield work
    finally:
        unet.to(device)
        unet.train(training)


@functools.cache
def cpu_computes(dtype: torch.dtype) -> bool:
    """Whether this torch has CPU kernels in `dtype` for every op a UNet trace runs (probed once on tiny tensors).
    torch 2.1 (A1111 1.10.1's) has no float16 CPU kernels for linear, conv2d, norms, softmax or resizing."""
    F = torch.nn.functional
    x = torch.ones(1, 4, 4, 4, dtype=dtype)
    try:
        F.conv2d(x, torch.ones(4, 4, 3, 3, dtype=dtype), padding=1)
        F.group_norm(x, 2)
        F.layer_norm(x, (4,))
        F.linear(x, torch.ones(4, 4, dtype=dtype))
        torch.softmax(x @ x, dim=-1)
        F.interpolate(x, scale_factor=2.0, mode="nearest")
    except RuntimeError:
        return False
    return True


def trace_device(dtype: torch.dtype) -> torch.device:
    """Where an export in `dtype` can trace: the CPU when torch computes `dtype` there (no device memory used),
    else the current CUDA GPU. Raises ExportError naming the way out when neither can."""
    if cpu_computes(dtype):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    name = str(dtype).replace("torch.", "")
    raise ExportError(f"this torch ({torch.__version__}) cannot compute {name} on the CPU and there is no CUDA GPU to "
                      f"trace the export on: export float32 instead, run the build on a machine with a GPU, or use a "
                      f"torch with {name} CPU kernels")


def torchscript_exporter(export: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The argument that picks the TorchScript exporter, where `torch.onnx.export` has a choice.

    torch >= 2.5 takes `dynamo=` (and from 2.9 defaults to the dynamo exporter, which renames weights and takes no
    dynamic_axes); torch 2.1-2.4 (A1111 1.10.1 ships 2.1.2) has only the TorchScript exporter and no such
    argument. Detected from the signature, never from the version number."""
    try:
        params = inspect.signature(export or torch.onnx.export).parameters
    except (TypeError, ValueError):  # a C function or a wrapper without a signature: pass nothing
        return {}
    return {"dynamo": False} if "dynamo" in params else {}


def _rename_from_wrapper(model: Any, prefix: str = WRAPPED + ".") -> None:
    """Strip the export wrapper's prefix from initializer names and their uses."""
    renames = {i.name: i.name[len(prefix):] for i in model.graph.initializer if i.name.startswith(prefix)}
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        for idx, name in enumerate(node.input):
            if name in renames:
                node.input[idx] = renames[name]


def _constants_to_nodes(model: Any, keep: set[str]) -> list[str]:
    """Turn initializers that are not UNet weights (folded shape constants) into Constant nodes, so every
    initializer of the graph is a refittable, named weight. Returns the names moved."""
    import onnx

    moved = []
    for init in list(model.graph.initializer):
        if init.name in keep:
            continue
        node = onnx.helper.make_node("Constant", [], [init.name], value=init, name=f"const_{len(moved)}")
        model.graph.node.insert(0, node)
        model.graph.initializer.remove(init)
        moved.append(init.name)
    return moved


def export_unet(
    unet: torch.nn.Module,
    contract: ModelContract,
    out_dir: Path,
    settings: ExportSettings = ExportSettings(),
    *,
    state_dict_keys: set[str] | None = None,
    hooks: Sequence[Callable[[], AbstractContextManager[Any]]] = (),
    progress: ProgressCallback = no_progress,
    owned: bool = False,
) -> ExportResult:
    """Export `unet` with the inputs and output of `contract` to `out_dir/unet.onnx` plus `weights.json`.

    `owned`: the caller gives `unet` up (see clean_module): no copy of its weights is made, and they are released
    once traced, before the ONNX graph is post-processed, so the weights are in memory once at any time.

    `hooks` are context-manager factories entered around the trace (the WebUI adapter turns A1111's attention
    optimizations off and its resizing `cat` on); each is exited in reverse order even when export fails.
    """
    import onnx

    dtype = DTYPES[settings.dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = state_dict_keys if state_dict_keys is not None else set(unet.state_dict().keys())
    names = contract.input_names()
    progress("export", 0.0)
    with tempfile.TemporaryDirectory(prefix="sdtrt-export-", dir=out_dir) as tmp:
        raw = Path(tmp) / ONNX_NAME
        try:
            with contextlib.ExitStack() as stack, warnings.catch_warnings():
                device = trace_device(dtype)
                if device.type == "cuda":  # runs last, once the copy is released
                    stack.callback(torch.cuda.empty_cache)
                work = stack.enter_context(clean_module(unet, dtype, owned)).to(device)
                stack.enter_context(plain_attention())
                for hook in hooks:
                    stack.enter_context(hook())
                feeds = {name: t.to(device) for name, t in contract.example_inputs(dtype).items()}
                # Head sizes become constants of the graph on purpose (they are fixed per layer); the tracer
                # warns about every such Python number, which would only bury real warnings.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                # The TorchScript exporter is chosen on purpose: with constant folding off it keeps every weight
                # under its parameter name and takes dynamic_axes; its deprecation notice is not actionable here.
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
                with torch.no_grad():
                    torch.onnx.export(
                        contract.export_module(work),
                        tuple(feeds[n] for n in names),
                        str(raw),
                        **torchscript_exporter(),
                        opset_version=settings.opset,
                        do_constant_folding=False,
                        input_names=names,
                        output_names=[contract.output().name],
                        dynamic_axes=contract.dynamic_axes(),
                    )
                del work
        except ExportError:
            raise
        except Exception as e:  # the exporter raises many types; the user needs the cause, not the trace
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {e}") from e
        progress("export", 0.6)
        model = onnx.load(str(raw), load_external_data=True)
    _rename_from_wrapper(model)
    _constants_to_nodes(model, keys)
    weight_names = [i.name for i in model.graph.initializer]
    unknown = sorted(set(weight_names) - keys)
    if unknown:
        raise ExportError(f"exported weights not named after UNet state-dict keys: {unknown[:5]}")
    onnx_path = out_dir / ONNX_NAME
    data_name = ONNX_NAME + ".data"
    nbytes = sum(_init_nbytes(i) for i in model.graph.initializer)
    external = nbytes > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(model, str(onnx_path))
    (out_dir / WEIGHTS_NAME).write_text(json.dumps(
        {i.name: {"shape": list(i.dims), "dtype": _np_dtype(i.data_type).name}
         for i in model.graph.initializer}, indent=1))
    progress("export", 1.0)
    return ExportResult(onnx_path, weight_names, external)


def _init_nbytes(init: Any) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n * _np_dtype(init.data_type).itemsize


def _np_dtype(data_type: int) -> Any:
    """numpy dtype of an ONNX tensor type; onnx < 1.13 (A1111's protobuf pin allows only 1.12) has only onnx.mapping."""
    import onnx

    if hasattr(onnx.helper, "tensor_dtype_to_np_dtype"):
        return onnx.helper.tensor_dtype_to_np_dtype(data_type)
    import numpy as np

    return np.dtype(onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[data_type])

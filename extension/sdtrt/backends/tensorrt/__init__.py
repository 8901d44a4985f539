"""TensorRT (10.x, 11.x, module `tensorrt`) and TensorRT-RTX (1.x, module `tensorrt_rtx`) behind one implementation.

Both libraries share the core API (builder, ONNX parser, profiles, refitter, runtime, execute_async_v3) and differ in
a few members. The library is an explicit handle (library.py's `LibraryHandle`) that the backend passes to the build
and the runner, so `tensorrt` and `tensorrt_rtx` can be used side by side in one process; mypy checks every call made
through a handle against tensorrt-stubs 10.13 (see library.py and mypy.ini). Features are detected by attribute and
enum names, never by version numbers.

    library.py    which library: import and check it, version, GPU, features by name; the handle
    messages.py   what the library logs, collected for error texts
    tensors.py    TensorRT shapes and data types as tuples and torch dtypes
    build.py      ONNX -> plan: parse, builder config, progress and cancel, plan check, write
    runner.py     plan -> running engine: deserialize, context, profiles and shapes, infer, refit, close
    graph_ops.py  CUDA graphs over an execution context (the bookkeeping is backends/graphs.py)
    backend.py    the two Backend classes: capabilities, probe, info, argument checks, delegation

Nothing is imported at import time: the library and torch are imported inside functions.
"""

from sdtrt.backends.tensorrt.backend import TensorRTBackend, TensorRTRTXBackend
from sdtrt.backends.tensorrt.build import PLAN_FILE, parse_onnx
from sdtrt.backends.tensorrt.tensors import TORCH_DTYPES

__all__ = ["PLAN_FILE", "TORCH_DTYPES", "TensorRTBackend", "TensorRTRTXBackend", "parse_onnx"]

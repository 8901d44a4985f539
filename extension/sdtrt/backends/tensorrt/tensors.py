"""TensorRT shapes and data types in Python terms: Dims as tuples, DataType members as torch dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from sdtrt.errors import SdtrtError

if TYPE_CHECKING:
    import tensorrt
    import torch

#: TensorRT DataType member name -> torch dtype name. The one table for inputs, outputs and refit weights.
TORCH_DTYPES: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}


def dims(value: tensorrt.Dims) -> tuple[int, ...]:
    return tuple(int(value[i]) for i in range(len(value)))


def torch_dtype(dtype: tensorrt.DataType) -> torch.dtype:
    import torch

    name = TORCH_DTYPES.get(dtype.name)
    if name is None or not hasattr(torch, name):
        raise SdtrtError(f"TensorRT data type {dtype.name} has no torch equivalent here")
    return cast("torch.dtype", getattr(torch, name))

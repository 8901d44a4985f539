"""Neo's `backend/args.py`: the backend's flags, parsed from sys.argv with `parse_known_args` (N :87 `--cpu` "Use the
CPU for everything"; `--disable-smart-memory`, `--reserve-vram`, `--cuda-stream`), and `dynamic_args`, a class whose
attributes the WebUI side sets at run time and which reads like a dict too (`.get(k)`, `[k]`; N `_DynamicArgsMeta`).
The fake always runs on the CPU, with `--cpu` or without (there is no GPU to find)."""

from __future__ import annotations

import argparse

parser = argparse.ArgumentParser(add_help=False)
parser.add_argument("--cpu", action="store_true")
parser.add_argument("--disable-smart-memory", action="store_true")
parser.add_argument("--reserve-vram", type=float, default=None)
parser.add_argument("--cuda-stream", type=int, default=None)
args, _ = parser.parse_known_args()


class _DynamicArgsMeta(type):
    def get(cls, key, default=None):  # type: ignore[no-untyped-def]
        return getattr(cls, key, default)

    def __getitem__(cls, key):  # type: ignore[no-untyped-def]
        return getattr(cls, key, None)

    def __setitem__(cls, key, value):  # type: ignore[no-untyped-def]
        setattr(cls, key, value)


class dynamic_args(metaclass=_DynamicArgsMeta):
    embedding_dir = None
    emphasis_name = None
    forge_unet_storage_dtype = None
    online_lora = False
    nunchaku = False
    wan = False
    pid = False

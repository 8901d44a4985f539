"""Shared fixtures: tiny random-weight checkpoints of every family, written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parents[1] / "extension"
if str(EXT) not in sys.path:
    sys.path.insert(0, str(EXT))

import torch

from sdtrt.pipeline.export import cpu_computes
from sdtrt.tools.tiny import TINY, write_tiny_checkpoint

FAMILIES = sorted(TINY)

#: A UNet in float16 runs on this machine: torch has float16 CPU kernels (torch 2.1, A1111 1.10.1's, has none) or
#: there is a GPU. Where it cannot, A1111 runs with --no-half and float16 exports trace on a GPU; the tests that
#: need float16 computation skip, and test_export checks the error an export gives there.
FP16_RUNS = cpu_computes(torch.float16) or torch.cuda.is_available()
needs_fp16 = pytest.mark.skipif(not FP16_RUNS, reason="this torch has no float16 CPU kernels (torch 2.1, as in A1111 "
                                "1.10.1) and there is no GPU: float16 runs only on a GPU here")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dir: Path):  # type: ignore[no-untyped-def]
    """tiny_checkpoint(family, seed=0) -> path of an A1111-format .safetensors with its yaml beside it."""
    made: dict[tuple[str, int], Path] = {}

    def make(family: str, seed: int = 0) -> Path:
        if (family, seed) not in made:
            made[(family, seed)] = write_tiny_checkpoint(family, tiny_dir, seed, stem=f"{family}-s{seed}")
        return made[(family, seed)]

    return make


#: Profile of the engines the WebUI tests share: 1-4 rows, 64-128 px, 1-2 prompt chunks.
WEBUI_PROFILE = "1x64x64x75:1x64x64x75:2x128x128x150"
WEBUI_FAMILIES = ("sd1", "sd1-inpaint", "sd2-v", "sdxl-base", "sdxl-refiner")


@pytest.fixture(scope="session")
def engines(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:  # type: ignore[no-untyped-def]
    """One onnxruntime engine per family, built from seed-0 checkpoints into a cache the WebUI tests share."""
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile

    cache = tmp_path_factory.mktemp("engines")
    ids = {}
    for family in WEBUI_FAMILIES:
        out = build_engine(tiny_checkpoint(family, 0), [Profile.parse(WEBUI_PROFILE)], cache, backend="onnxruntime")
        ids[family] = out.manifest.id
    return cache, ids

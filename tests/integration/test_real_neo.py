"""The extension in a real Forge Neo, offline on CPU: the same clone as in A1111 and lllyasviel's Forge.

Runs where SDTRT_NEO_DIR names a Neo `webui/` tree set up as docs/forge/NEO_SETUP.md says (its venv at
$SDTRT_NEO_DIR/venv, or SDTRT_NEO_PYTHON); skipped elsewhere. What was run: Neo v3.5 as vendored by
exo101/sd-webui-forge-neo-v3 @ 5692d2d (`modules_forge/forge_version.py`: version "neo", release "2.26"), not the
upstream `neo` branch (which could not be fetched here; docs/forge/NEO.md). The model is a tiny random SD1 checkpoint
Neo recognises (tests/integration/tiny_forge_model.py run through forge_host.NEO_MODEL_WRITER; or SDTRT_NEO_MODEL
names one already written). Neo starts API-only with `--cpu` and this repository linked into its extensions folder;
an engine is built over POST /sdtrt/v1/engines (onnxruntime) and every image is compared with SD Unet None
(PyTorch) on the same Neo.

    SDTRT_NEO_DIR=path/to/neo/webui python -m pytest -q -s -p no:cacheprovider tests/integration/test_real_neo.py
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import pytest

from .forge_host import CHECKPOINT, NEO, STEPS, Forge, needs_neo, prepare_data, running_forge, sdtrt_errors

np = pytest.importorskip("numpy")

PROFILE = "1x64x64x75:1x64x64x75:1x128x128x75"
#: the issue's bar for "PyTorch's image": mean absolute difference in 8-bit values
MEAN_LIMIT = 2.0
LORA = {"prompt": "a photo of a cat <lora:tinylora:1>"}

pytestmark = needs_neo


@pytest.fixture(scope="module")
def neo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forge]:
    data = tmp_path_factory.mktemp("neo-data")
    with running_forge(data, prepare_data(data, NEO), host=NEO) as host:
        yield host


def test_neo_starts_with_the_extension_and_without_its_errors(neo: Forge) -> None:
    log = neo.log_text()
    torch_line = re.search(r"PyTorch Version: (\S+)", log)
    print(f"\nFIGURE neo host: torch {torch_line.group(1) if torch_line else '?'}")
    assert "Device: cpu" in log  # --cpu took effect (Neo's flag; --always-cpu is Forge's)
    assert neo.get("/sdtrt/v1/status")["enabled"] is True  # our script loaded and mounted its API
    assert sdtrt_errors(log) == []
    models = neo.get("/sdapi/v1/sd-models")
    assert [m["model_name"] for m in models] == [CHECKPOINT], models
    assert neo.get("/sdtrt/v1/engines") == {"engines": []}


def test_an_engine_builds_over_the_api_in_neo(neo: Forge) -> None:
    state = neo.build({"checkpoint": CHECKPOINT, "profiles": [PROFILE], "backend": "onnxruntime"})
    (row,) = neo.get("/sdtrt/v1/engines")["engines"]
    assert row["id"] == state["engine_id"] and row["ok"] is True, row
    assert row["backend"] == "onnxruntime" and row["family"] == "sd1" and row["convention"] == "forge", row
    print(f"\nFIGURE neo build: {row['id']}, {row['size_bytes']} bytes, "
          f"{state['finished'] - state['started']:.1f} s")


def test_txt2img_runs_on_the_engine_with_pytorchs_image(neo: Forge) -> None:
    reference, calls, fallback, _ = neo.generate("None")
    assert (calls, fallback) == (0, 0)
    image, calls, fallback, params = neo.generate("Automatic")
    assert (calls, fallback) == (STEPS, 0), params
    mean = float(np.abs(image - reference).mean())
    print(f"\nFIGURE neo txt2img 64x64: engine calls {calls}, mean |diff| {mean:.5f}/255, max "
          f"{int(np.abs(image - reference).max())}")
    assert mean <= MEAN_LIMIT and "TensorRT fallback" not in params
    again, calls, _, _ = neo.generate("None")  # the engine's patch is gone after its generation
    assert calls == 0 and np.array_equal(again, reference)


def test_a_lora_runs_on_the_engine_and_neo_still_merges_it_afterwards(neo: Forge) -> None:
    """Neo's load-record trap (docs/forge/NEO.md §B): after an engine generation with a LoRA, Neo's records say
    "loaded, LoRA merged" for a UNet that got nothing; the next PyTorch generation with the same LoRA must still
    carry the LoRA."""
    plain, _, _, _ = neo.generate("None")
    reference, _, _, _ = neo.generate("None", **LORA)
    effect = float(np.abs(reference - plain).mean())
    assert effect > 1.0  # the LoRA changes the image
    before = neo.counters()["refits"]
    image, calls, fallback, params = neo.generate("Automatic", **LORA)
    assert (calls, fallback) == (STEPS, 0), params
    refits = neo.counters()["refits"] - before
    assert refits > 0  # Neo's LoRA weights went into the engine by refit
    mean = float(np.abs(image - reference).mean())
    again, calls, _, _ = neo.generate("None", **LORA)
    print(f"\nFIGURE neo LoRA: engine calls {STEPS}, refits {refits}, mean |diff| to PyTorch+LoRA {mean:.5f}/255 "
          f"(LoRA's own effect {effect:.2f}/255); SD Unet None + LoRA afterwards identical to its reference: "
          f"{bool(np.array_equal(again, reference))}")
    assert mean <= MEAN_LIMIT
    assert calls == 0 and np.array_equal(again, reference)
    back, calls, _, _ = neo.generate("Automatic")
    assert calls == STEPS and float(np.abs(back - plain).mean()) <= MEAN_LIMIT  # the LoRA is out of the engine


def test_a_size_outside_the_profile_runs_on_pytorch_with_the_notice(neo: Forge) -> None:
    reference, _, _, _ = neo.generate("None", width=192)
    image, calls, fallback, params = neo.generate("Automatic", width=192)
    assert (calls, fallback) == (0, STEPS), params
    note = params.get("TensorRT fallback", "")
    print(f"\nFIGURE neo 192x64 (outside the profile): engine calls {calls}, PyTorch calls {fallback}, notice {note!r}")
    assert "no engine profile covers this call" in note, params
    assert np.array_equal(image, reference)


def test_neo_logged_no_error_of_the_extension(neo: Forge) -> None:
    assert sdtrt_errors(neo.log_text()) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

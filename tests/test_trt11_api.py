"""TensorRT 11: the backend uses no name that TensorRT 11 removed, checked against TensorRT 11.4's own Python
bindings (read from the wheel, not imported: its libraries are not on PyPI), beside the mypy check against the
10.13 stubs (test_tensorrt_backend.py). See trt_api.py for how names are read."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import pytest

from test_tensorrt_backend import REPO, write_fixed_stubs
from trt_api import binding_names, defined, missing_names, own_names, stub_names, used_names

BACKEND = REPO / "extension/sdtrt/backends/tensorrt"
#: Names TensorRT 11 removed (its migration notes): none may be used, and the 11.4 bindings must lack them
#: (which also shows the reading of the wheel tells a defined name from a removed one).
REMOVED_IN_11 = ("FP16", "EXPLICIT_BATCH", "EXPLICIT_PRECISION", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS", "device_memory_size", "get_device_memory_size_for_profile",
                 "create_execution_context_without_device_memory", "IStreamReader", "weight_streaming_budget",
                 "max_workspace_size", "build_engine", "execute_async_v2", "num_bindings", "get_binding_index")
#: Names the backend relies on that TensorRT 11 keeps (a positive control for the reading).
KEPT_IN_11 = ("STRONGLY_TYPED", "STRIP_PLAN", "INCLUDE_REFIT", "create_network", "build_serialized_network",
              "execute_async_v3", "set_input_shape", "refit_cuda_engine_async", "get_weights_prototype",
              "serialize_with_config", "IProgressMonitor", "device_memory_size_v2")


def _wheel() -> Path | None:
    given = os.environ.get("SDTRT_TRT11_BINDINGS")
    if given:
        return Path(given)
    found = sorted(glob.glob(os.path.join(sys.prefix, "sdtrt-wheels", "tensorrt_cu1*_bindings-11.*.whl")))
    return Path(found[-1]) if found else None


@pytest.fixture(scope="module")
def release() -> list[str]:
    wheel = _wheel()
    if wheel is None or not wheel.is_file():
        pytest.skip("TensorRT 11 bindings wheel not here: `bash run.sh setup` downloads it (pip download --no-deps "
                    "tensorrt-cu12-bindings==11.4.0.106), or set SDTRT_TRT11_BINDINGS to its path")
    return binding_names(wheel)


@pytest.fixture(scope="module")
def trt_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    stubs = write_fixed_stubs(tmp_path_factory.mktemp("stubs"))
    if stubs is None:
        pytest.skip("tensorrt-stubs are not installed, or do not parse even after repair")
    return stub_names(stubs)


def _sources() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(BACKEND.glob("*.py"))}


def _ignored() -> set[str]:
    return own_names(REPO / "extension/sdtrt")


def test_the_wheel_reading_tells_removed_from_kept_names(release: list[str]) -> None:
    assert len(release) > 5000
    assert [n for n in KEPT_IN_11 if not defined(n, release)] == []
    assert [n for n in REMOVED_IN_11 if defined(n, release)] == []


def test_backend_uses_no_name_tensorrt_11_removed(release: list[str], trt_names: set[str]) -> None:
    used, detected = used_names(_sources())
    checked = {n for n in used if n in trt_names}
    assert len(checked) > 40, sorted(checked)  # the backend's calls are really looked at
    assert missing_names(_sources(), trt_names, release, _ignored()) == {}
    assert [n for n in REMOVED_IN_11 if n in used or n in detected] == []


@pytest.mark.parametrize(("module", "call", "removed"), [
    ("runner.py", "engine.create_execution_context(", "create_execution_context_without_device_memory"),
    ("build.py", "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED", "EXPLICIT_BATCH"),
    ("build.py", "trt.BuilderFlag.REFIT)", "FP16"),
])
def test_the_check_catches_a_removed_name(release: list[str], trt_names: set[str], module: str, call: str,
                                          removed: str) -> None:
    """Negative control: the backend with one call changed to a name TensorRT 11 removed fails the check."""
    sources = _sources()
    assert call in sources[module]
    replaced = call.replace(call.rstrip("(").rstrip(")").rsplit(".", 1)[-1], removed, 1)
    sources[module] = sources[module].replace(call, replaced, 1)
    assert missing_names(sources, trt_names, release, _ignored()) == {removed: {module}}

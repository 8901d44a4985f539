"""A build requested the moment the WebUI's API answers.

A1111 1.10.1 loads the start-up checkpoint in a background thread and answers the API meanwhile; while it loads it
changes torch globally (meta-device initialisation, patched layer constructors), so an ONNX export that runs then
fails ("'NoneType' object has no attribute 'eval'", "tensor on device meta"; 2 of 5 starts before the fix). Each
run here starts a fresh WebUI (fresh engine cache, so the build really exports), posts the build as soon as the API
answers, without waiting for the model, and then requires: the job ends "done", the model load itself did not fail,
and a txt2img through the engine gives PyTorch's image with every step on the engine.

With the tiny model the start-up load (~3 s) usually ends before the API answers, so left alone the race is rarely
met. Two of every three runs therefore hold the load open: a test-only extension (written into the data dir,
`HOLD_SCRIPT`) makes A1111's `InitializeOnMeta` (the part of the load during which torch's layer constructors
allocate on the meta device) last HOLD_SECONDS longer, so the build request surely arrives mid-load, exactly where
an export used to break; there the job must also say that it waits for the model load. The third run keeps the
natural timing. SDTRT_BUILD_AT_START_RUNS sets the number of runs (default 3); each prints whether the model was
still loading when the build was requested.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .a1111_host import MODEL_FAILED, MODEL_LOADED, WebUIHost
from .test_real_webui_sdtrt import (
    BUILD_TIMEOUT,
    MAX_8BIT_DIFF,
    MAX_DIFFERING_FRACTION,
    PROFILE,
    STEPS,
    compare,
    fallback_notices,
    generate,
    sdtrt_config,
)

pytestmark = pytest.mark.integration

RUNS = int(os.environ.get("SDTRT_BUILD_AT_START_RUNS", "3"))
WAITING_PHASE = "waiting for the WebUI to finish loading the model"
HOLD_SECONDS = 15
HOLD_EXTENSION = "sdtrt-test-hold-model-load"
HOLDING, RELEASED = "sdtrt-test: holding the model load open", "sdtrt-test: model load released"
#: scripts/hold_model_load.py of the test-only extension: the first InitializeOnMeta of the process (the start-up
#: load's model creation) stays entered, torch patched, for HOLD_SECONDS.
HOLD_SCRIPT = f'''"""Test-only extension written by sd-webui-trt's integration tests (test_real_webui_build_at_start.py)."""
import time

from modules import sd_disable_initialization

_enter = sd_disable_initialization.InitializeOnMeta.__enter__
_held = []


def _enter_and_hold(self):
    result = _enter(self)
    if not _held:
        _held.append(True)
        print("{HOLDING} for {HOLD_SECONDS} s", flush=True)
        time.sleep({HOLD_SECONDS})
        print("{RELEASED}", flush=True)
    return result


sd_disable_initialization.InitializeOnMeta.__enter__ = _enter_and_hold
'''


def write_hold_extension(data_dir: Path) -> None:
    script = data_dir / "extensions" / HOLD_EXTENSION / "scripts" / "hold_model_load.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(HOLD_SCRIPT, encoding="utf-8")


def follow_job(host: WebUIHost, job_id: str, timeout: float = BUILD_TIMEOUT) -> tuple[dict[str, Any], list[str]]:
    """(final job, the distinct phases seen in order), polling fast so that short phases are seen too."""
    deadline = time.monotonic() + timeout
    phases: list[str] = []
    while True:
        job: dict[str, Any] = host.get(f"/sdtrt/v1/jobs/{job_id}", timeout=60)
        phase = str(job.get("phase") or "")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        if job["state"] not in ("queued", "running"):
            return job, phases
        if time.monotonic() > deadline:
            pytest.fail(f"build job {job_id} still {job['state']} after {timeout:.0f}s: {job}; phases {phases}")
        time.sleep(0.1)


def wait_model_loaded(host: WebUIHost, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while MODEL_LOADED not in host.log_text_since_start():
        assert MODEL_FAILED not in host.log_text_since_start(), host.log_tail(150)
        assert host.running, host.log_tail(150)
        if time.monotonic() > deadline:
            pytest.fail(f"the model did not load in {timeout:.0f}s\n{host.log_tail(150)}")
        time.sleep(0.2)


@pytest.mark.parametrize("run", range(RUNS))
def test_a_build_requested_the_moment_the_api_answers_ends_done_and_serves(
        run: int, webui_factory: Callable[..., WebUIHost], tmp_path_factory: pytest.TempPathFactory) -> None:
    held = run % 3 != 2
    data_dir = tmp_path_factory.mktemp(f"a1111-start{run}")
    if held:
        write_hold_extension(data_dir)
    host = webui_factory(data_dir=data_dir, config=sdtrt_config(tmp_path_factory.mktemp(f"sdtrt-cache-start{run}")),
                         wait_model=False)
    try:
        log = host.log_text_since_start()
        loading = MODEL_LOADED not in log
        if held:
            assert HOLDING in log and RELEASED not in log, host.log_tail(150)  # the request below meets the load
        t0 = time.monotonic()
        status, answer = host.request("POST", "/sdtrt/v1/engines", {
            "checkpoint": host.checkpoint.stem,  # type: ignore[union-attr]
            "profiles": [PROFILE], "backend": "onnxruntime"}, timeout=120)
        assert status == 202, answer
        job, phases = follow_job(host, answer["job_id"])
        build_s = time.monotonic() - t0
        print(f"start {run} ({'load held open' if held else 'natural timing'}): API up after "
              f"{host.start_seconds:.1f}s, model still loading when the build was requested: {loading}; job "
              f"{job['state']} after {build_s:.1f}s; waited for the model load: {WAITING_PHASE in phases}; "
              f"phases {phases}")
        assert job["state"] == "done", f"job {job['state']}: {job.get('error')}; phases {phases}"
        assert job["engine_id"] and job["error"] is None, job
        if held:
            assert WAITING_PHASE in phases, phases

        wait_model_loaded(host)
        log = host.log_text_since_start()
        assert MODEL_FAILED not in log, host.log_tail(150)
        assert host.extension_errors() == [], host.log_tail(150)

        _, reference, ref_delta = generate(host, "None")
        assert ref_delta["engine_calls"] == 0, ref_delta
        assert len(set(reference)) > 8, "constant image"
        out, pixels, delta = generate(host, "Automatic")
        worst, frac = compare(reference, pixels)
        print(f"start {run}: engine vs PyTorch max 8-bit diff {worst}, differing {frac:.5%}; counters {delta}")
        assert delta["engine_calls"] == STEPS, delta
        assert delta["fallback_calls"] == 0 and fallback_notices(out) == [], (delta, out["info"][:500])
        assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (worst, frac)
        status_doc = host.get("/sdtrt/v1/status")
        assert status_doc["active"]["engines"] == [job["engine_id"]], status_doc
        assert status_doc["counters"]["last_error"] is None, status_doc
    finally:
        host.stop()

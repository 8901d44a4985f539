"""The status line in the real A1111 UI (javascript/sdtrt.js), in headless Chromium: it appears under Generate in
txt2img and img2img, says the engine serves the current size, flips to PyTorch when the width leaves the engine's
profile, builds an engine for the new size with one click (progress in place) and turns to "serves"; a generation
then shows what really ran, and the switch turns the extension off and on.

Screenshots of each state go to $SDTRT_ARTIFACTS (default: a temp folder); docs/ holds copies.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from .a1111_host import WebUIHost
from .browser import PAGE_TIMEOUT, wait_for

pytestmark = pytest.mark.integration

PROFILE = "1x64x64x75"
BUILD_TIMEOUT = 900.0
LINE_TIMEOUT = 60.0


def line(d: Any, tab: str) -> str:
    return str(d.execute_script(
        f"const e = document.querySelector('#sdtrt_status_{tab} .sdtrt-status-text'); return e ? e.textContent : ''")
        or "")


def build_button_shown(d: Any, tab: str) -> bool:
    return bool(d.execute_script(
        f"const b = document.querySelector('#sdtrt_status_{tab} .sdtrt-build');"
        "return !!b && b.style.display !== 'none' && b.offsetParent !== null"))


def set_number(d: Any, elem_id: str, value: int) -> None:
    """Type into a gradio slider's number box, as a user does (input and change events)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value))
    box.send_keys(Keys.TAB)


def open_tab(d: Any, name: str) -> None:
    d.execute_script("Array.from(document.querySelectorAll('#tabs > .tab-nav > button'))"
                     f".find(b => b.textContent.trim() === '{name}').click()")


def test_status_line_predicts_flips_builds_and_reports(ui_host: WebUIHost, driver: Any, artifacts: Path) -> None:
    from selenium.webdriver.common.by import By

    d = driver
    assert ui_host.checkpoint is not None
    # an engine for 64x64, built over the API
    status, job = ui_host.request("POST", "/sdtrt/v1/engines", {"checkpoint": ui_host.checkpoint.name,
                                                                "profiles": [PROFILE], "backend": "onnxruntime"})
    assert status == 202, job
    deadline = time.monotonic() + BUILD_TIMEOUT
    while (state := ui_host.get(f"/sdtrt/v1/jobs/{job['job_id']}"))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state["state"] == "done", state
    first_engine = state["engine_id"]

    d.get(ui_host.base_url)
    wait_for("the txt2img status line", lambda: d.find_element(By.ID, "sdtrt_status_txt2img"), PAGE_TIMEOUT, 0.5)
    set_number(d, "txt2img_width", 64)
    set_number(d, "txt2img_height", 64)
    served = wait_for("the line to say the engine serves 64x64", lambda: (
        t := line(d, "txt2img")) == f"TensorRT: {first_engine} profile 1 serves 64x64, batch 1" and t, LINE_TIMEOUT)
    assert not build_button_shown(d, "txt2img")
    d.save_screenshot(str(artifacts / "status-line-served.png"))

    # no layout shift: the line's box keeps its height whatever it says
    height = d.execute_script("return document.getElementById('sdtrt_status_txt2img').offsetHeight")

    # beyond the profile: the first pass runs on PyTorch, and a build is offered
    set_number(d, "txt2img_width", 128)
    flipped = wait_for("the line to flip to PyTorch", lambda: (
        t := line(d, "txt2img")).startswith("TensorRT: the first pass (128x64) will run on PyTorch") and t,
        LINE_TIMEOUT)
    assert "no profile covers it" in flipped
    wait_for("the build button", lambda: build_button_shown(d, "txt2img"), LINE_TIMEOUT)
    assert d.execute_script("return document.getElementById('sdtrt_status_txt2img').offsetHeight") == height
    d.save_screenshot(str(artifacts / "status-line-pytorch.png"))

    # one click: a build job whose progress shows in place, then the line says the new engine serves it
    d.find_element(By.CSS_SELECTOR, "#sdtrt_status_txt2img .sdtrt-build").click()
    progress = wait_for("build progress in the line", lambda: (t := line(d, "txt2img")).startswith("building") and t,
                        LINE_TIMEOUT, 0.1)
    d.save_screenshot(str(artifacts / "status-line-building.png"))
    built = wait_for("the line to say the new engine serves 128x64", lambda: (
        t := line(d, "txt2img")).startswith("TensorRT: ") and "serves 128x64, batch 1" in t and t, BUILD_TIMEOUT, 0.5)
    new_engine = re.match(r"TensorRT: (\S+) profile", built)
    assert new_engine and new_engine.group(1) != first_engine, built
    assert {e["id"] for e in ui_host.get("/sdtrt/v1/engines")["engines"]} == {first_engine, new_engine.group(1)}
    d.save_screenshot(str(artifacts / "status-line-built.png"))

    # a generation: the line then shows what really ran (every UNet call on the engine)
    before = ui_host.get("/sdtrt/v1/status")["generations"]
    set_number(d, "txt2img_steps", 4)
    d.find_element(By.ID, "txt2img_generate").click()
    outcome = wait_for("the outcome of the generation", lambda: (
        t := line(d, "txt2img")) and "last generation:" in t and t, BUILD_TIMEOUT, 0.5)
    last = ui_host.get("/sdtrt/v1/status")
    assert last["generations"] == before + 1 and last["last_generation"]["fallback_calls"] == 0
    calls = last["last_generation"]["engine_calls"]
    assert f"last generation: {calls} UNet calls on the engine, 0 on PyTorch" in outcome and calls >= 4
    d.save_screenshot(str(artifacts / "status-line-after-generation.png"))

    # the switch: off for the next generation, then on again
    toggle = d.find_element(By.CSS_SELECTOR, "#sdtrt_status_txt2img input[type=checkbox]")
    assert toggle.is_selected()
    toggle.click()
    wait_for("TensorRT off", lambda: line(d, "txt2img").startswith("TensorRT off"), LINE_TIMEOUT)
    assert ui_host.get("/sdtrt/v1/status")["enabled"] is False
    d.save_screenshot(str(artifacts / "status-line-off.png"))
    d.find_element(By.CSS_SELECTOR, "#sdtrt_status_txt2img input[type=checkbox]").click()
    wait_for("the line back on the engine", lambda: "serves 128x64" in line(d, "txt2img"), LINE_TIMEOUT)
    assert ui_host.get("/sdtrt/v1/status")["enabled"] is True

    # img2img has its own line, asking with its own kind
    open_tab(d, "img2img")
    wait_for("the img2img status line", lambda: line(d, "img2img").startswith("TensorRT"), LINE_TIMEOUT)
    d.save_screenshot(str(artifacts / "status-line-img2img.png"))
    assert ui_host.extension_errors() == [], ui_host.log_tail(150)
    print(f"\nstates: {served!r} / {flipped!r} / {progress!r} / {built!r} / {outcome!r}; screenshots in {artifacts}")

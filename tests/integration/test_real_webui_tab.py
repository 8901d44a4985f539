"""The TensorRT tab in the real A1111 UI (gradio 3.41), driven by headless Chromium through Selenium: the tab
renders, a build from the tab shows the progress bar and its result, and the engine table lists the engine.

Needs, besides SDTRT_A1111_DIR, Chromium through Selenium (see browser.py). Screenshots go to $SDTRT_ARTIFACTS
(default: the test's tmp dir); their paths are printed.
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
TAB_BUTTONS = "#tabs > .tab-nav > button"


def tab_names(d: Any) -> list[str]:
    names: list[str] = d.execute_script(
        f"return Array.from(document.querySelectorAll('{TAB_BUTTONS}')).map(b => b.textContent.trim())")
    return names


def choose(d: Any, elem_id: str, text: str) -> str:
    """Pick the option of a gradio 3.41 dropdown whose text starts with `text`; returns the value shown."""
    from selenium.webdriver.common.by import By

    d.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    items = wait_for(f"the options of #{elem_id}",
                     lambda: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} ul.options li"), 30)
    labels = [li.get_attribute("data-value") for li in items]
    matching = [li for li, label in zip(items, labels) if label and label.startswith(text)]
    assert matching, f"#{elem_id}: no option starting with {text!r} in {labels}"
    matching[0].click()
    return str(wait_for(f"#{elem_id} to show {text!r}", lambda: (
        (v := d.find_element(By.CSS_SELECTOR, f"#{elem_id} input").get_attribute("value")).startswith(text) and v),
        30))


def message(d: Any) -> str:
    return str(d.execute_script("return document.querySelector('#sdtrt_message textarea').value") or "")


def table_text(d: Any) -> str:
    return str(d.execute_script("return document.getElementById('sdtrt_engines').innerText") or "")


def progress_shown(d: Any) -> str | None:
    """The progress text gradio draws over the outputs while the build runs, when shown."""
    text = d.execute_script(
        "const m = document.querySelector('#sdtrt_message .progress-level, #sdtrt_message .progress-text');"
        "return m ? document.querySelector('#sdtrt_message .wrap').innerText : null")
    return str(text) if text else None


def test_tab_builds_an_engine_with_progress_and_lists_it(ui_host: WebUIHost, driver: Any, artifacts: Path) -> None:
    from selenium.webdriver.common.by import By

    d = driver
    t0 = time.monotonic()
    d.get(ui_host.base_url)
    wait_for("the TensorRT tab button", lambda: "TensorRT" in tab_names(d), PAGE_TIMEOUT, 0.5)
    d.execute_script(f"Array.from(document.querySelectorAll('{TAB_BUTTONS}'))"
                     ".find(b => b.textContent.trim() === 'TensorRT').click()")
    wait_for("the Build button", lambda: d.find_element(By.ID, "sdtrt_build").is_displayed(), 60)
    page_seconds = time.monotonic() - t0

    # the tab renders: its controls, and the engine table with its headers (empty cache)
    for elem_id in ("sdtrt_checkpoint", "sdtrt_backend", "sdtrt_preset", "sdtrt_profiles", "sdtrt_build",
                    "sdtrt_message", "sdtrt_engines", "sdtrt_delete_id", "sdtrt_delete", "sdtrt_refresh",
                    "sdtrt_rebuild"):
        assert d.find_element(By.ID, elem_id).is_displayed(), elem_id
    assert d.find_element(By.ID, "sdtrt_build").text.strip() == "Build"
    headers = table_text(d)
    assert all(h in headers for h in ("id", "status", "profiles", "backend")), headers
    d.save_screenshot(str(artifacts / "sdtrt_tab_empty.png"))

    assert ui_host.checkpoint is not None
    choose(d, "sdtrt_checkpoint", ui_host.checkpoint.name)
    choose(d, "sdtrt_backend", "onnxruntime")
    d.find_element(By.CSS_SELECTOR, "#sdtrt_profiles textarea").send_keys(PROFILE)
    d.find_element(By.ID, "sdtrt_build").click()

    # the progress bar: screenshot it once it shows a build phase (else its first appearance)
    progress_shot = artifacts / "sdtrt_tab_progress.png"
    phases: list[str] = []
    phase_shot = False
    deadline = time.monotonic() + BUILD_TIMEOUT
    while not message(d) and time.monotonic() < deadline:
        shown = progress_shown(d)
        in_phase = bool(shown and re.search(r"(export|build) - \d", shown))
        if shown and (not phases or (in_phase and not phase_shot)):
            d.save_screenshot(str(progress_shot))
            phase_shot = in_phase
        if shown and (not phases or phases[-1] != shown):
            phases.append(shown)
        time.sleep(0.1)
    result = wait_for("the build result", lambda: message(d), 30)
    build_seconds = time.monotonic() - t0 - page_seconds
    match = re.fullmatch(r"(?:Built|Already in the cache:) engine (\S+) \(.+\)", result)
    assert match, result
    engine_id = match.group(1)
    assert phases, "no progress bar was seen during the build"

    # the engine table lists the new engine, ok, with its profile and backend
    wait_for("the engine in the table", lambda: engine_id in table_text(d), 60)
    rows = table_text(d)
    assert "ok" in rows and PROFILE in rows and "onnxruntime" in rows, rows
    after_shot = artifacts / "sdtrt_tab_built.png"
    d.save_screenshot(str(after_shot))

    # the same engine over the REST API (UI mode with --api)
    (row,) = ui_host.get("/sdtrt/v1/engines")["engines"]
    assert row["id"] == engine_id and row["ok"] and row["profiles"] == [PROFILE], row
    assert ui_host.extension_errors() == [], ui_host.log_tail(150)
    print(f"\npage + tab {page_seconds:.1f}s, build from the tab {build_seconds:.1f}s; progress seen: {phases}")
    print(f"screenshots: {artifacts / 'sdtrt_tab_empty.png'}, "
          f"{progress_shot if progress_shot.exists() else '(no progress screenshot)'}, {after_shot}")

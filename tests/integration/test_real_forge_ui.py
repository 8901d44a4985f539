"""The TensorRT tab and the status line in the real lllyasviel's Forge (main dfdcbab, gradio 4.40), offline on CPU,
driven by headless Chromium through Selenium: the same clone of the extension as in A1111 (whose gradio 3.41 UI is
tested by test_real_webui_tab.py and test_real_webui_status_line.py).

- The tab: its controls render, a build from it (onnxruntime, 1x64x64x75) shows gradio's progress and its result,
  the engine table and GET /sdtrt/v1/engines list the engine, and Forge's SD Unet setting offers it.
- The status line under Generate in txt2img and img2img: the engine serves 64x64; 72 px wide runs on PyTorch,
  saying why as POST /sdtrt/v1/coverage does (an engine computing as A1111 does is refused at sizes that are not
  multiples of 64 px in Forge, without a build offer: hosts/forge.py; one computing as Forge does is just outside
  its profile, with one); 128 px is outside the profile (PyTorch, with the one-click
  build); after Generate the line says how many UNet calls ran on the engine, as the status API counts them; its
  build button then builds an engine for 128x64 and the line says that engine serves it.

Runs where SDTRT_FORGE_DIR names a Forge checkout set up as docs/forge/SETUP.md says (SDTRT_FORGE_MODEL: the tiny
checkpoint already written) and Selenium with Chromium is there (browser.py); skipped otherwise. Screenshots go to
$SDTRT_ARTIFACTS (default: a temp folder); docs/forge/ holds copies.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .browser import PAGE_TIMEOUT, wait_for
from .forge_host import CHECKPOINT, FORGE, NEO, STEPS, Forge, HostSpec, prepare_data, running_forge, sdtrt_errors

PROFILE = "1x64x64x75"
BUILD_TIMEOUT = 900.0
LINE_TIMEOUT = 60.0
TAB_BUTTONS = "#tabs > .tab-nav > button"
HOSTS = [pytest.param(spec, id=spec.name.replace(" ", "-").lower(), marks=pytest.mark.skipif(
    not spec.dir, reason=f"{spec.dir_env} is not set ({spec.name} set up as docs/forge/ says)")) for spec in (FORGE, NEO)]


@pytest.fixture(scope="module", params=HOSTS)
def forge_ui(request: pytest.FixtureRequest, browser_binaries: tuple[str, str],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forge]:
    """lllyasviel's Forge, then Forge Neo (each where its folder is given), with its UI."""
    spec: HostSpec = request.param
    data = tmp_path_factory.mktemp("forge-ui-data")
    # Forge serves its own script.js and javascript/ from gradio's allowed paths, which default to --data-dir only:
    # with a data folder outside the host's checkout its UI scripts (onUiLoaded, ...) would answer 403
    ui_args = ("--gradio-allowed-path", spec.dir)
    with running_forge(data, prepare_data(data, spec), ui=True, extra_args=ui_args, host=spec) as host:
        yield host


# ---- the page ---------------------------------------------------------------------------------------------------
def open_page(d: Any, forge: Forge) -> None:
    d.get(forge.url)
    wait_for("Forge's UI with the txt2img status line",
             lambda: d.execute_script("return !!document.getElementById('sdtrt_status_txt2img')"), PAGE_TIMEOUT, 0.5)


def tab_names(d: Any) -> list[str]:
    names: list[str] = d.execute_script(
        f"return Array.from(document.querySelectorAll('{TAB_BUTTONS}')).map(b => b.textContent.trim())")
    return names


def open_tab(d: Any, name: str, buttons: str = TAB_BUTTONS) -> None:
    assert d.execute_script(f"const b = Array.from(document.querySelectorAll('{buttons}'))"
                            f".find(b => b.textContent.trim().toLowerCase() === '{name.lower()}'); if (b) b.click(); return !!b"), name


def options(d: Any, elem_id: str) -> list[Any]:
    """The open options of a dropdown (gradio 4: li[aria-label]; gradio 3.41: li[data-value])."""
    from selenium.webdriver.common.by import By

    return list(d.find_elements(By.CSS_SELECTOR, f"#{elem_id} ul.options li"))


def option_label(li: Any) -> str:
    return str(li.get_attribute("aria-label") or li.get_attribute("data-value") or "").strip()


def dropdown_labels(d: Any, elem_id: str) -> list[str]:
    from selenium.webdriver.common.by import By

    d.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    labels = [option_label(li) for li in wait_for(f"the options of #{elem_id}", lambda: options(d, elem_id), 30)]
    d.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()  # closes it again
    return labels


def choose(d: Any, elem_id: str, text: str) -> str:
    """Pick the option of a dropdown whose label starts with `text`; returns the value shown."""
    from selenium.webdriver.common.by import By

    d.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    items = wait_for(f"the options of #{elem_id}", lambda: options(d, elem_id), 30)
    labels = [option_label(li) for li in items]
    matching = [li for li, label in zip(items, labels) if label.startswith(text)]
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
    """The progress gradio draws over the result box while the build runs (gradio 4: its status tracker, e.g.
    "1.2s / export - 0.0%"), when shown."""
    text = d.execute_script(
        "const w = document.querySelector('#sdtrt_message .wrap');"
        "return w && !w.classList.contains('hide') ? w.innerText.trim() : null")
    return str(text) if text else None


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


def page_errors(d: Any) -> list[str]:
    """Errors in the browser's console that come from our script."""
    try:
        logs = d.get_log("browser")
    except Exception:  # noqa: BLE001 - a driver without the log API
        return []
    return [str(e.get("message")) for e in logs if e.get("level") == "SEVERE" and "sdtrt" in str(e.get("message"))]


def coverage(forge: Forge, tab: str, **fields: Any) -> dict[str, Any]:
    """What POST /sdtrt/v1/coverage answers for the tab's defaults with `fields` (as the line asks it)."""
    body = {"prompt": "", "negative_prompt": "", "steps": 20, "batch_size": 1, "n_iter": 1, **fields}
    status, answer = forge.call("POST", f"/sdtrt/v1/coverage?kind={tab}", body)
    assert status == 200, answer
    return dict(answer)


def served_text(engine_id: str, size: str) -> str:
    return f"TensorRT: {engine_id} profile 1 serves {size}, batch 1"


def check_line(d: Any, forge: Forge, tab: str, engine_id: str, artifacts: Path) -> dict[str, str]:
    """The line of `tab` at 64x64, 72x64 and 128x64: what it says at each."""
    texts: dict[str, str] = {}
    open_tab(d, tab.capitalize())
    wait_for(f"the {tab} status line shown", lambda: d.execute_script(
        f"return document.getElementById('sdtrt_status_{tab}').offsetParent !== null"), LINE_TIMEOUT)
    set_number(d, f"{tab}_width", 64)
    set_number(d, f"{tab}_height", 64)
    texts["64"] = wait_for(f"the {tab} line to say the engine serves 64x64", lambda: (
        t := line(d, tab)) == served_text(engine_id, "64x64") and t, LINE_TIMEOUT)
    assert not build_button_shown(d, tab)
    d.save_screenshot(str(artifacts / f"forge-status-line-{tab}-served.png"))
    height = d.execute_script(f"return document.getElementById('sdtrt_status_{tab}').offsetHeight")

    # 72 px wide (not a multiple of 64 px): PyTorch. Which reason depends on the engine's convention: an engine
    # computing as A1111 does is refused at such sizes in Forge (the notice; no build offered, as no engine of
    # that convention would serve it); one computing as Forge does is just outside its 64x64 profile (build
    # offered). The line shows what POST /sdtrt/v1/coverage answers for the same request.
    set_number(d, f"{tab}_width", 72)
    texts["72"] = wait_for(f"the {tab} line to flip to PyTorch at 72x64", lambda: (
        t := line(d, tab)).startswith("TensorRT: the first pass (72x64) will run on PyTorch") and t, LINE_TIMEOUT)
    answer = coverage(forge, tab, width=72, height=64)
    assert texts["72"] == answer["message"], (texts, answer)
    if "multiples of 64 px" in texts["72"]:
        assert answer["build"] is None, answer
    else:
        assert "no profile covers it" in texts["72"] and answer["build"], answer
    wait_for(f"the {tab} build button {'shown' if answer['build'] else 'hidden'} at 72x64",
             lambda: build_button_shown(d, tab) == bool(answer["build"]), LINE_TIMEOUT)
    d.save_screenshot(str(artifacts / f"forge-status-line-{tab}-72.png"))

    # 128 px wide: outside the profile, PyTorch, and a one-click build is offered
    set_number(d, f"{tab}_width", 128)
    texts["128"] = wait_for(f"the {tab} line to flip to PyTorch at 128x64", lambda: (
        t := line(d, tab)).startswith("TensorRT: the first pass (128x64) will run on PyTorch") and t, LINE_TIMEOUT)
    assert "no profile covers it" in texts["128"], texts
    wait_for(f"the {tab} build button", lambda: build_button_shown(d, tab), LINE_TIMEOUT)
    # no layout shift: the line's box keeps its height whatever it says or offers
    assert d.execute_script(f"return document.getElementById('sdtrt_status_{tab}').offsetHeight") == height
    d.save_screenshot(str(artifacts / f"forge-status-line-{tab}-pytorch.png"))
    return texts


# ---- the tests --------------------------------------------------------------------------------------------------
def test_the_tab_builds_an_engine_that_the_table_the_api_and_sd_unet_list(forge_ui: Forge, driver: Any,
                                                                       artifacts: Path) -> None:
    from selenium.webdriver.common.by import By

    d = driver
    assert forge_ui.get("/sdtrt/v1/engines") == {"engines": []}
    t0 = time.monotonic()
    open_page(d, forge_ui)
    wait_for("the TensorRT tab button", lambda: "TensorRT" in tab_names(d), PAGE_TIMEOUT, 0.5)
    open_tab(d, "TensorRT")
    wait_for("the Build button", lambda: d.find_element(By.ID, "sdtrt_build").is_displayed(), 60)
    page_seconds = time.monotonic() - t0

    # the tab renders in gradio 4: its controls, and the engine table with its headers (empty cache)
    for elem_id in ("sdtrt_checkpoint", "sdtrt_backend", "sdtrt_preset", "sdtrt_profiles", "sdtrt_build",
                    "sdtrt_message", "sdtrt_engines", "sdtrt_delete_id", "sdtrt_delete", "sdtrt_refresh",
                    "sdtrt_rebuild"):
        assert d.find_element(By.ID, elem_id).is_displayed(), elem_id
    assert d.find_element(By.ID, "sdtrt_build").text.strip() == "Build"
    headers = table_text(d)
    assert all(h in headers for h in ("id", "status", "profiles", "backend")), headers
    assert "onnxruntime" in dropdown_labels(d, "sdtrt_backend")

    choose(d, "sdtrt_checkpoint", CHECKPOINT)
    choose(d, "sdtrt_backend", "onnxruntime")
    d.find_element(By.CSS_SELECTOR, "#sdtrt_profiles textarea").send_keys(PROFILE)
    d.find_element(By.ID, "sdtrt_build").click()

    # gradio's progress over the result while the build runs: screenshot it once it shows a build phase
    progress_shot = artifacts / "forge-tab-progress.png"
    phases: list[str] = []
    deadline = time.monotonic() + BUILD_TIMEOUT
    while not message(d) and time.monotonic() < deadline:
        shown = progress_shown(d)
        phase = shown and re.search(r"(queued|starting|waiting[^-]*|export|build\w*|\w+) - \d+(\.\d+)?%", shown)
        if phase and (not phases or phases[-1] != phase.group(1)):
            phases.append(phase.group(1))
            if phase.group(1) in ("export", "build") and not progress_shot.exists():
                d.save_screenshot(str(progress_shot))
        time.sleep(0.1)
    result = wait_for("the build result", lambda: message(d), 30)
    build_seconds = time.monotonic() - t0 - page_seconds
    match = re.match(r"Built engine (\S+) \(.+\)", result)  # (notes may follow on lines of their own)
    assert match, result
    engine_id = match.group(1)
    assert "export" in phases, f"the progress did not show the export phase: {phases}"

    # the engine table lists the new engine, ok, with its profile and backend
    wait_for("the engine in the table", lambda: engine_id in table_text(d), 60)
    rows = table_text(d)
    assert "ok" in rows and PROFILE in rows and "onnxruntime" in rows, rows
    built_shot = artifacts / "forge-tab-built.png"
    d.save_screenshot(str(built_shot))

    # the same engine over the REST API
    (row,) = forge_ui.get("/sdtrt/v1/engines")["engines"]
    assert row["id"] == engine_id and row["ok"] and row["profiles"] == [PROFILE], row
    assert row["backend"] == "onnxruntime" and row["checkpoint"].startswith(CHECKPOINT), row

    # Forge's SD Unet setting offers it (after its refresh button, as a user would)
    open_tab(d, "Settings")
    open_tab(d, "Stable Diffusion", "#settings .tab-nav button")
    wait_for("the SD Unet setting", lambda: d.find_element(By.ID, "setting_sd_unet").is_displayed(), 60)
    d.find_element(By.ID, "refresh_sd_unet").click()
    unets = wait_for("the engine in SD Unet", lambda: (
        labels := dropdown_labels(d, "setting_sd_unet")) and f"[TRT] {engine_id}" in labels and labels, 60, 1)
    assert f"[TRT] {CHECKPOINT}" in unets and "Automatic" in unets and "None" in unets, unets

    assert page_errors(d) == []
    assert sdtrt_errors(forge_ui.log_text()) == []
    print(f"\npage + tab {page_seconds:.1f}s, build from the tab {build_seconds:.1f}s; progress phases: {phases}; "
          f"SD Unet: {unets}")
    print(f"screenshots: {progress_shot if progress_shot.exists() else '(no progress screenshot)'}, {built_shot}")


def test_the_status_line_predicts_flips_reports_and_builds_in_txt2img_and_img2img(forge_ui: Forge, driver: Any,
                                                                           artifacts: Path) -> None:
    from selenium.webdriver.common.by import By

    d = driver
    engines = forge_ui.get("/sdtrt/v1/engines")["engines"]
    if not any(e["ok"] and e["profiles"] == [PROFILE] for e in engines):  # (this test alone: build over the API)
        forge_ui.build({"checkpoint": CHECKPOINT, "profiles": [PROFILE], "backend": "onnxruntime"}, BUILD_TIMEOUT)
        engines = forge_ui.get("/sdtrt/v1/engines")["engines"]
    (engine_id,) = [e["id"] for e in engines if e["ok"] and e["profiles"] == [PROFILE]]

    open_page(d, forge_ui)
    texts = {f"{tab} {size}": text for tab in ("txt2img", "img2img")
             for size, text in check_line(d, forge_ui, tab, engine_id, artifacts).items()}

    # back to 64x64 in txt2img and Generate: the line then says what really ran, as the status API counts it
    open_tab(d, "Txt2img")
    set_number(d, "txt2img_width", 64)
    set_number(d, "txt2img_steps", STEPS)
    wait_for("the line back on the engine", lambda: line(d, "txt2img") == served_text(engine_id, "64x64"),
             LINE_TIMEOUT)
    before = forge_ui.get("/sdtrt/v1/status")["generations"]
    d.find_element(By.ID, "txt2img_generate").click()
    outcome = wait_for("the outcome of the generation", lambda: (
        t := line(d, "txt2img")) and "last generation:" in t and t, BUILD_TIMEOUT, 0.5)
    last = forge_ui.get("/sdtrt/v1/status")
    assert last["generations"] == before + 1, last
    calls = last["last_generation"]["engine_calls"]
    assert (calls, last["last_generation"]["fallback_calls"]) == (STEPS, 0), last["last_generation"]
    assert outcome == f"{served_text(engine_id, '64x64')} · last generation: {calls} UNet calls on the engine, " \
                      "0 on PyTorch", outcome
    d.save_screenshot(str(artifacts / "forge-status-line-after-generation.png"))

    # one click on the line's build button at 128x64: a build job whose progress shows in place, then the line
    # says the new engine serves it
    set_number(d, "txt2img_width", 128)
    wait_for("the build button at 128x64", lambda: build_button_shown(d, "txt2img"), LINE_TIMEOUT)
    d.find_element(By.CSS_SELECTOR, "#sdtrt_status_txt2img .sdtrt-build").click()
    progress = wait_for("build progress in the line", lambda: (
        t := line(d, "txt2img")).startswith("building") and t, LINE_TIMEOUT, 0.1)
    d.save_screenshot(str(artifacts / "forge-status-line-building.png"))
    built = wait_for("the line to say the new engine serves 128x64", lambda: (
        t := line(d, "txt2img")).startswith("TensorRT: ") and "serves 128x64, batch 1" in t and t, BUILD_TIMEOUT, 0.5)
    new_engine = re.match(r"TensorRT: (\S+) profile", built)
    assert new_engine and new_engine.group(1) != engine_id, built
    assert {e["id"] for e in forge_ui.get("/sdtrt/v1/engines")["engines"]} == {engine_id, new_engine.group(1)}
    d.save_screenshot(str(artifacts / "forge-status-line-built.png"))

    assert page_errors(d) == []
    assert sdtrt_errors(forge_ui.log_text()) == []
    print(f"\nstates: {texts!r}; after Generate: {outcome!r}; one-click build: {progress!r} -> {built!r}; "
          f"screenshots in {artifacts}")

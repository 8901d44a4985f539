"""Headless Chromium for the real-WebUI tests (Selenium): the binaries (or a skip naming what to install), a
driver, where screenshots go, and waiting on a page that gradio re-renders.

Needs the `selenium` Python package and Chromium with its driver (Debian: `apt-get install chromium
chromium-driver`); `SDTRT_CHROMIUM` / `SDTRT_CHROMEDRIVER` name other binaries. Screenshots go to
$SDTRT_ARTIFACTS (default: a pytest temp folder).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = ("pip install selenium; apt-get install chromium chromium-driver (or set SDTRT_CHROMIUM and "
                "SDTRT_CHROMEDRIVER)")
PAGE_TIMEOUT = 300.0


def find_binary(env: str, names: tuple[str, ...]) -> str | None:
    given = os.environ.get(env, "").strip()
    if given:
        return given if os.access(given, os.X_OK) else None
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver), or skip saying what to install. Checked before any WebUI starts."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip(f"selenium is not installed: {INSTALL_HINT}")
    chromium = find_binary("SDTRT_CHROMIUM", ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"))
    driver = find_binary("SDTRT_CHROMEDRIVER", ("chromedriver",))
    if chromium is None or driver is None:
        pytest.skip(f"no {'Chromium' if chromium is None else 'chromedriver'} found: {INSTALL_HINT}")
    return chromium, driver


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("SDTRT_ARTIFACTS", "").strip()
    out = Path(given) if given else tmp_path_factory.mktemp("sdtrt-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


@pytest.fixture
def driver(browser_binaries: tuple[str, str]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_binaries
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(chromedriver))
    d.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield d
    finally:
        d.quit()


def wait_for(what: str, fn: Callable[[], Any], timeout: float, poll: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - gradio re-renders; stale elements are retried
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)

"""Fixtures for tests against a real AUTOMATIC1111 WebUI (see a1111_host.py).

They run only where SDTRT_A1111_DIR names an A1111 checkout with its venv (SDTRT_A1111_PYTHON overrides the
Python); elsewhere every test here is skipped with a reason naming the variable, so CI on a clean machine stays
green. All of them carry the `integration` marker: `pytest -m "not integration"` leaves them out.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .a1111_host import DEFAULT_CONFIG, ENV_DIR, ENV_PYTHON, A1111Install, WebUIHost, write_tiny_model
from .browser import artifacts, browser_binaries, driver  # noqa: F401 - fixtures of the browser tests

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"integration: runs the real A1111 WebUI (needs {ENV_DIR}; skipped otherwise)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    """On a failure, attach the end of every running WebUI's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for host in _HOSTS:
            report.sections.append((f"WebUI log ({host.data_dir.name})", host.log_tail(120)))


_HOSTS: list[WebUIHost] = []


@pytest.fixture(scope="session")
def a1111_install() -> A1111Install:
    install = A1111Install.from_env()
    if install is None:
        pytest.skip(f"{ENV_DIR} is not set (an A1111 v1.10 checkout with its venv; {ENV_PYTHON} overrides "
                    f"the Python, default $SDTRT_A1111_DIR/venv/bin/python)")
    problems = install.problems()
    if problems:
        pytest.fail("; ".join(problems))
    return install


@pytest.fixture(scope="session")
def tiny_webui_checkpoint(a1111_install: A1111Install, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 model (checkpoint + yaml + local CLIP folder), written once per session."""
    return write_tiny_model(a1111_install, tmp_path_factory.mktemp("a1111-models"))


@pytest.fixture(scope="session")
def webui_factory(a1111_install: A1111Install, tiny_webui_checkpoint: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WebUIHost]]:
    """webui_factory(ui=False, data_dir=None, **WebUIHost kwargs) -> a started WebUI over `data_dir` (default: a
    fresh one; a given one may hold files written before the start), stopped at the end of the session, or earlier
    with host.stop()."""
    started: list[WebUIHost] = []

    def make(ui: bool = False, data_dir: Path | None = None, **kw: Any) -> WebUIHost:
        kw.setdefault("checkpoint", tiny_webui_checkpoint)
        if data_dir is None:
            data_dir = tmp_path_factory.mktemp("a1111-ui" if ui else "a1111-api")
        host = WebUIHost(a1111_install, data_dir, ui=ui, **kw)
        started.append(host)
        _HOSTS.append(host)
        host.start()
        return host

    try:
        yield make
    finally:
        for host in started:
            host.stop()
            if host in _HOSTS:
                _HOSTS.remove(host)


@pytest.fixture(scope="session")
def webui(webui_factory: Callable[..., WebUIHost]) -> WebUIHost:
    """One API-only WebUI (--api --nowebui) with this repository as an extension, shared by the session."""
    return webui_factory()


@pytest.fixture(scope="module")
def ui_host(request: pytest.FixtureRequest, webui_factory: Callable[..., WebUIHost],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIHost]:
    """A WebUI with its UI (for the browser tests), the extension on, and an empty engine cache of its own."""
    request.getfixturevalue("browser_binaries")  # skips, naming what to install, before a WebUI starts
    config = {**DEFAULT_CONFIG, "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
              "sdtrt_cache_dir": str(tmp_path_factory.mktemp("sdtrt-cache-ui"))}
    h = webui_factory(ui=True, config=config)
    yield h
    h.stop()

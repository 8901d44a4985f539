"""preload.py: A1111 runs it before parsing its command line; SDTRT_API_AUTH_FILE becomes --api-auth's default,
so the credentials come from a (Secret) file and never appear on the command line or in the start-up log."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _preload():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("sdtrt_preload", ROOT / "preload.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _a1111_parser() -> argparse.ArgumentParser:
    """The two options of A1111 1.10.1's modules/cmd_args.py this touches, declared as it declares them."""
    p = argparse.ArgumentParser()
    p.add_argument("--api-auth", type=str, default=None)
    p.add_argument("--api", action="store_true")
    return p


def test_the_file_becomes_the_default_of_api_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "auth"
    secret.write_text(" svc:pw1 ,\r\nops:pw2\n\n")
    monkeypatch.setenv("SDTRT_API_AUTH_FILE", str(secret))
    parser = _a1111_parser()
    _preload().preload(parser)
    assert parser.parse_args(["--api"]).api_auth == "svc:pw1,ops:pw2"
    assert parser.parse_args(["--api-auth", "cli:given"]).api_auth == "cli:given"  # the command line still wins


def test_without_the_variable_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDTRT_API_AUTH_FILE", raising=False)
    parser = _a1111_parser()
    _preload().preload(parser)
    assert parser.parse_args([]).api_auth is None


@pytest.mark.parametrize(("content", "message"), [
    (None, "No such file or directory"),
    ("\n , \n", "it is empty"),
    ("svc:pw1,nopassword", "entry 2 is not user:password"),
    ("svc:pw:1", "entry 1 is not user:password"),
])
def test_an_unusable_file_stops_the_start_without_showing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          content: str | None, message: str) -> None:
    secret = tmp_path / "auth"
    if content is not None:
        secret.write_text(content)
    monkeypatch.setenv("SDTRT_API_AUTH_FILE", str(secret))
    with pytest.raises(SystemExit) as e:
        _preload().preload(_a1111_parser())
    text = str(e.value)
    assert message in text and "SDTRT_API_AUTH_FILE" in text and "pw" not in text.replace(str(secret), "")

"""deploy/README.md: its picture is made from deploy/docs/fleet.dot and shows what the source says, and every file
it points to exists."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _labels(dot: str) -> list[str]:
    """The first line of every node and cluster label of a dot source."""
    return [m.split("\\n")[0] for m in re.findall(r'label="((?:[^"\\]|\\.)*)"', dot) if m]


def _svg_text(svg: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(" ".join(re.findall(r">([^<]+)</text>", svg))))


def test_the_picture_shows_every_label_of_its_source() -> None:
    dot = (DEPLOY / "docs" / "fleet.dot").read_text(encoding="utf-8")
    text = _svg_text((DEPLOY / "docs" / "fleet.svg").read_text(encoding="utf-8"))
    missing = [label for label in _labels(dot) if label.replace('\\"', '"') not in text]
    assert missing == [], f"deploy/docs/fleet.svg is older than fleet.dot: regenerate it ({missing[:3]})"


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz (dot) is not installed")
def test_the_picture_renders_from_its_source(tmp_path: Path) -> None:
    out = subprocess.run(["dot", "-Tsvg", str(DEPLOY / "docs" / "fleet.dot")], capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _svg_text(out.stdout) == _svg_text((DEPLOY / "docs" / "fleet.svg").read_text(encoding="utf-8"))


def test_every_path_the_deploy_readme_names_exists() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:helm|docker|docs)/[^`\s]+)`", readme))
    named |= {m for m in re.findall(r"\]\(([^)#]+)\)", readme) if "://" not in m}
    assert named and [p for p in sorted(named) if not (DEPLOY / p).exists()] == []
    root = DEPLOY.parent
    for test_file in re.findall(r"`(tests/[\w/]+\.py)`", readme):
        assert (root / test_file).exists(), test_file

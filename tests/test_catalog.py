"""The engine catalog: one list of engines with whether each can serve here, shared by the CLI, the API, the tab
and the service. A build node lists engines for GPUs it lacks as not stale (CLI "OK"); the WebUI does not offer
them (not ok here)."""

from __future__ import annotations

import json
from pathlib import Path

from sdtrt.pipeline.build import build_engine
from sdtrt.profiles import Profile
from sdtrt.serving.catalog import BackendProbe, engine_rows
from sdtrt.storage.registry import Registry


def test_rows_tell_stale_from_unavailable_here(tiny_checkpoint, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = build_engine(tiny_checkpoint("sd1"), [Profile.parse("1x64x64x75")], tmp_path, backend="onnxruntime")
    registry = Registry(tmp_path)
    [row] = engine_rows(registry, BackendProbe())
    assert row.ok and row.id == out.manifest.id and row.size_bytes == sum(f.size for f in out.manifest.files)
    assert list(row.manifest.key.profiles) == ["1x64x64x75"] and row.ok is True

    probe = BackendProbe()
    monkeypatch.setattr(probe, "info", lambda name: "no GPU here")  # the backend cannot run on this machine
    [row] = engine_rows(registry, probe)
    assert not row.ok and row.stale is None and row.reason == "backend onnxruntime cannot run here: no GPU here"

    [row] = engine_rows(registry, BackendProbe(), refused=lambda m: "files do not match")
    assert not row.ok and row.reason == "files do not match"

    manifest = tmp_path / out.manifest.id / "manifest.json"
    data = json.loads(manifest.read_text())
    data["key"]["profiles"] = ["1x64x64x150"]  # edited: the id no longer matches the key
    manifest.write_text(json.dumps(data))
    [row] = engine_rows(registry, BackendProbe())
    assert not row.ok and row.stale is not None

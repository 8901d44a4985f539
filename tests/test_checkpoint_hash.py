"""Checkpoint hashes are read once per file version: builds that hit the cache, checks and the WebUI ask again and
again for the hash of multi-GB files."""

from __future__ import annotations

import builtins
from pathlib import Path

from sdtrt.pipeline import checkpoint


def test_a_files_hash_is_read_once_until_the_file_changes(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 1000)
    reads: list[str] = []

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", counting_open, raising=False)
    first = checkpoint.file_sha256(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert checkpoint.file_sha256(path) == first
    assert checkpoint.file_sha256(tmp_path / "." / "model.safetensors") == first  # same file, other spelling
    assert reads == [str(path)]
    path.write_bytes(b"b" * 1001)  # a new version: size and mtime change
    assert checkpoint.file_sha256(path) == hashlib.sha256(b"b" * 1001).hexdigest()
    assert len(reads) == 2

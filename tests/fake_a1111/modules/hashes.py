"""sha256 of files with a cache in <data-dir>/cache.json keyed by title and mtime (like hashes.py/cache.py)."""

from __future__ import annotations

import hashlib
import json
import os


def _cache_file() -> str:
    from modules.paths_internal import data_path

    return os.path.join(data_path, "cache.json")


def _load() -> dict:
    try:
        with open(_cache_file(), encoding="utf8") as f:
            return json.load(f)
    except Exception:  # noqa: BLE001
        return {}


def calculate_sha256(filename: str) -> str:
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_from_cache(filename: str, title: str, use_addnet_hash: bool = False) -> str | None:
    entry = _load().get("hashes", {}).get(title)
    if entry is None or os.path.getmtime(filename) > entry.get("mtime", 0):
        return None
    return entry["sha256"]


def sha256(filename: str, title: str, use_addnet_hash: bool = False) -> str | None:
    from modules import shared

    cached = sha256_from_cache(filename, title)
    if cached is not None:
        return cached
    if shared.cmd_opts.no_hashing:
        return None
    value = calculate_sha256(filename)
    data = _load()
    data.setdefault("hashes", {})[title] = {"mtime": os.path.getmtime(filename), "sha256": value}
    with open(_cache_file(), "w", encoding="utf8") as f:
        json.dump(data, f, indent=2)
    return value

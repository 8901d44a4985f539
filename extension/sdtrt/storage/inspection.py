"""Checking one engine folder against its manifest: present, intact-looking (sizes) or intact (sha256), and why not.
Returns the reason instead of raising, so listing, loading, publishing and cleanup each decide what a damaged entry
means for them."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from sdtrt.errors import ManifestError, StaleEngine
from sdtrt.fsutil import read_regular_file, sha256_and_size
from sdtrt.storage.key import ENGINE_DIR_RE
from sdtrt.storage.layout import CacheLayout
from sdtrt.storage.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest


@dataclass
class Inspection:
    manifest: Manifest | None
    reason: str | None
    inode: int
    manifest_problem: bool = False
    #: The folder is an orphan: no manifest.json at all, or a valid manifest whose files are gone. Never made by
    #: a publish (which renames a complete folder), so `cleanup` removes it after its grace period.
    orphan: bool = False

    def error(self, text: str) -> StaleEngine:
        """ManifestError when the manifest itself is the problem, StaleEngine otherwise."""
        return (ManifestError if self.manifest_problem else StaleEngine)(f"{text}: {self.reason}")




def inspect(layout: CacheLayout, engine_id: str, *, deep: bool) -> Inspection:
    """Check one entry: manifest parses and matches the folder, every file is a regular file of the recorded
    size and (deep) sha256. Returns the reason instead of raising; raises EngineNotFound if absent."""
    d = layout.engine_dir(engine_id)
    if not ENGINE_DIR_RE.match(engine_id):  # e.g. an operator's "logs" folder: never an engine
        raise layout.not_found(engine_id)
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise layout.not_found(engine_id) from None
    if stat.S_ISLNK(st.st_mode):
        return Inspection(None, "the engine folder is a symlink; engines must be real folders in the cache", 0)
    if not stat.S_ISDIR(st.st_mode):
        return Inspection(None, "not a folder", st.st_ino)
    ino = st.st_ino
    try:
        raw = read_regular_file(d / MANIFEST_NAME, MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        reason = "no manifest.json (an incomplete folder, not made by sd-webui-trt)"
        return Inspection(None, reason, ino, True, orphan=True)
    except OSError as e:
        return Inspection(None, f"cannot read manifest.json: {e}", ino, True)
    if len(raw) > MAX_MANIFEST_BYTES:
        return Inspection(None, f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes", ino, True)
    try:
        m = Manifest.from_json(raw)
    except ManifestError as e:
        return Inspection(None, str(e), ino, True)
    if m.id != engine_id:
        reason = f"folder {engine_id} holds the manifest of {m.id} (renamed or copied by hand)"
        return Inspection(m, reason, ino, True)
    for entry in m.files:
        p = d / entry.name
        try:
            fst = os.lstat(p)
        except FileNotFoundError:
            return Inspection(m, f"{entry.name} is missing", ino, orphan=True)
        except OSError as e:
            return Inspection(m, f"cannot read {entry.name}: {e}", ino)
        if not stat.S_ISREG(fst.st_mode):
            return Inspection(m, f"{entry.name} is not a regular file (symlink or folder)", ino)
        if fst.st_size != entry.size:
            return Inspection(
                m,
                f"{entry.name} is {fst.st_size} bytes but the manifest says size {entry.size} (truncated "
                "or replaced)",
                ino,
            )
        if deep:
            try:
                digest, _ = sha256_and_size(p)
            except OSError as e:
                return Inspection(m, f"cannot read {entry.name}: {e}", ino)
            if digest != entry.sha256:
                return Inspection(
                    m,
                    f"{entry.name} has sha256 {digest[:16]}... but the manifest says {entry.sha256[:16]}... "
                    "(corrupted or replaced)",
                    ino,
                )
    return Inspection(m, None, ino)

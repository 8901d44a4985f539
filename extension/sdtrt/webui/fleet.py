"""Fleet mode: many WebUI replicas over one shared engine cache that a pre-build Job fills.

Set by the deployment through environment variables (read when the service starts):

- `SDTRT_BUILDS=off`: this replica never builds, rebuilds or deletes engines (the API answers 409 naming the
  pre-build Job, the tab says so) and writes nothing to the cache (no garbage collection either), so it works on a
  read-only mount. Anything but on/off (1/0, true/false, yes/no) is taken as off, with a warning: a replica that
  was meant not to write must not start writing because of a typo.
- `SDTRT_RESCAN_S` (default 10): engines another process published into the cache, or removed from it, are noticed
  at the start of a generation at most this often, and `POST /sdtrt/v1/rescan` notices them at once. A look is
  one directory listing and one stat per engine (nothing read or hashed); when something changed, the host's SD Unet
  list is rebuilt, and A1111 applies it in that same generation (its `apply_unet` runs after the scripts' `process`),
  so "Automatic" serves a new engine from that generation on and drops a removed one, never mid-generation.
- `SDTRT_REQUIRE_ENGINE=1`: GET /sdtrt/v1/ready answers 200 only with an engine for the loaded checkpoint loaded
  (see readiness.py).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdtrt.errors import SdtrtError
from sdtrt.storage.key import ENGINE_DIR_RE
from sdtrt.storage.manifest import MANIFEST_NAME

log = logging.getLogger("sdtrt")

BUILDS_ENV = "SDTRT_BUILDS"
RESCAN_ENV = "SDTRT_RESCAN_S"
REQUIRE_ENGINE_ENV = "SDTRT_REQUIRE_ENGINE"
DEFAULT_RESCAN_S = 10.0
_ON = ("on", "1", "true", "yes")
_OFF = ("off", "0", "false", "no")


class BuildsOff(SdtrtError):
    """This replica does not build (SDTRT_BUILDS=off): the API answers 409."""


@dataclass(frozen=True)
class FleetSettings:
    builds: bool = True
    rescan_s: float = DEFAULT_RESCAN_S
    #: GET /sdtrt/v1/ready answers 200 only with an engine for the loaded checkpoint loaded
    require_engine: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FleetSettings:
        env = os.environ if env is None else env
        builds_text = env.get(BUILDS_ENV, "").strip().lower()
        builds = True
        if builds_text in _OFF:
            builds = False
        elif builds_text and builds_text not in _ON:
            log.warning("sdtrt: %s=%r is neither on nor off; this replica will not build (as with off)",
                        BUILDS_ENV, env.get(BUILDS_ENV))
            builds = False
        rescan_s = DEFAULT_RESCAN_S
        rescan_text = env.get(RESCAN_ENV, "").strip()
        if rescan_text:
            try:
                rescan_s = float(rescan_text)
            except ValueError:
                rescan_s = math.nan
            if not (math.isfinite(rescan_s) and rescan_s >= 0):
                log.warning("sdtrt: %s=%r is not a number of seconds >= 0; using %g", RESCAN_ENV, rescan_text,
                            DEFAULT_RESCAN_S)
                rescan_s = DEFAULT_RESCAN_S
        require_engine = env.get(REQUIRE_ENGINE_ENV, "").strip().lower() in _ON
        return cls(builds, rescan_s, require_engine)

    def require_builds(self, what: str) -> None:
        """BuildsOff naming the pre-build Job, when this replica does not build."""
        if not self.builds:
            raise BuildsOff(f"this WebUI does not {what} engines ({BUILDS_ENV}=off): engines are built into the "
                            "shared cache by the pre-build Job (or `python -m sdtrt build` on a machine that can "
                            "write the cache); new ones are picked up by themselves, or at once with "
                            "POST /sdtrt/v1/rescan")


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(root: Path) -> Fingerprint:
    """What identifies the engines in a cache folder now: (name, folder inode, manifest mtime) per engine folder.
    A publish, a delete and a replacement (a rebuilt engine under the same id) each change it."""
    out = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return ()
    for entry in entries:
        if not ENGINE_DIR_RE.match(entry.name) or ".." in entry.name:
            continue
        try:
            inode = entry.inode()
            mtime = os.stat(os.path.join(entry.path, MANIFEST_NAME)).st_mtime_ns
        except OSError:
            inode, mtime = -1, -1  # half-visible (being deleted) or not an engine: still a change when it goes
        out.append((entry.name, inode, mtime))
    return tuple(sorted(out))


class CacheWatcher:
    """Whether the engines of the cache changed since the SD Unet list was last built from it."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._seen: tuple[Path, Fingerprint] | None = None
        self._checked = -math.inf

    def listed(self, root: Path) -> None:
        """The list was just built from `root` as it is now."""
        self._seen = (root, fingerprint(root))
        self._checked = self._clock()

    @property
    def seen(self) -> tuple[Path, Fingerprint] | None:
        """The cache as the SD Unet list was last built from it (None: not built yet): what anything derived from
        the list (readiness) is keyed on, so it is redone when the list is, and not at every probe."""
        return self._seen

    def changed(self, root: Path, *, now: bool = False) -> bool:
        """Whether `root` differs from what the list was built from; looks at most every `every_s` seconds unless
        `now`. Never raises (an unreadable cache is an empty one)."""
        if not now and self._clock() - self._checked < self.every_s:
            return False
        self._checked = self._clock()
        return self._seen is None or self._seen != (root, fingerprint(root))

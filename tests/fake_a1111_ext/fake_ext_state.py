"""State of the fake-host test extension, shared with the tests through `sys.modules["fake_ext_state"]` (a helper
module imported by the extension's script lands in sys.modules under its bare name, as in A1111)."""

from __future__ import annotations

#: one entry per SdUnet.forward call: shapes, dtypes, kwargs names, positional args count
calls: list[dict] = []
#: lifecycle and hook events, in order: (name, details...)
events: list[tuple] = []
#: every SdUnet instance created
unets: list = []
#: how many times the extension's script file was executed (load_scripts / Reload UI)
loads = 0


def names(kind: str) -> list[tuple]:
    return [e for e in events if e[0] == kind]

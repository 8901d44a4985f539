"""A1111 runs `preload(parser)` of every extension before it parses its command line (modules/shared_cmd_options.py).

SDTRT_API_AUTH_FILE: the API credentials (`user:password`, several separated by commas or new lines) read from a
file, e.g. a Kubernetes Secret mounted read-only, and made the default of A1111's own `--api-auth`. Passing them as
`--api-auth` would put the password on the process's command line and into the log (A1111 prints its arguments at
start). A named but unusable file stops the start: an API that was meant to need credentials never runs without."""

from __future__ import annotations

import os
from typing import Any

AUTH_FILE_ENV = "SDTRT_API_AUTH_FILE"


def read_api_auth(path: str) -> str:
    """`user:password[,user:password...]` from the file: entries separated by commas or new lines, trimmed. Raises
    ValueError naming the entry (never its content) when one is not exactly `user:password`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    entries = [e.strip() for line in text.replace("\r", "").split("\n") for e in line.split(",")]
    entries = [e for e in entries if e]
    if not entries:
        raise ValueError("it is empty: it must hold user:password[,user:password...]")
    for n, entry in enumerate(entries, 1):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password or ":" in password:
            raise ValueError(f"entry {n} is not user:password (exactly one ':'; A1111 splits on ',' then ':')")
    return ",".join(entries)


def preload(parser: Any) -> None:
    path = os.environ.get(AUTH_FILE_ENV, "").strip()
    if not path:
        return
    try:
        auth = read_api_auth(path)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SystemExit(f"sd-webui-trt: {AUTH_FILE_ENV}={path}: {why}; not starting an API that was meant to need "
                         "credentials without them") from None
    parser.set_defaults(api_auth=auth)  # an explicit --api-auth on the command line still wins

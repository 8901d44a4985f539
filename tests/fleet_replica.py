"""One fleet replica for tests/test_fleet_replicas.py: a fake AUTOMATIC1111 1.10.1 (tests/fakehost.py) with
sd-webui-trt, in a process of its own (the extension's service is one per process and reads SDTRT_* from the
environment when made), driven by JSON lines.

    python tests/fleet_replica.py WORKDIR CHECKPOINT CACHE     (env: SDTRT_BUILDS, SDTRT_RESCAN_S, ...)

Commands arrive on stdin, one JSON object a line, each with an "id"; every command runs in a thread of its own
(as A1111 serves HTTP requests in a thread pool while a generation holds the queue lock), and its answer is one
JSON line {"id": ..., ...} on the original stdout. Everything else the process prints goes to stderr.

- {"op": "txt2img", "unet": "Automatic" | "None", "seed": 77, "steps": 3}
    -> {"ok": true, "latents": [...], "shape": [...], "engine_calls": n, "t0": ..., "t1": ...}
       (engine_calls: those this generation made; t0, t1: time.time() at its start and end)
    or {"ok": false, "error": "..."}
- {"op": "http", "method": "GET", "path": "/sdtrt/v1/ready", "json": null}
    -> {"status": 503, "body": {...}, "t": time.time() when answered}
- {"op": "quit"}

The first line written is {"id": "boot", "boot_s": ...} once the WebUI has booted with its checkpoint loaded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _p in (str(ROOT / "extension"), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def main(workdir: str, checkpoint: str, cache: str) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the answers; anything printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    write_lock = threading.Lock()

    def say(answer: dict[str, Any]) -> None:
        with write_lock:
            out.write(json.dumps(answer) + "\n")
            out.flush()

    import torch

    torch.set_num_threads(1)  # three replicas, a build Job and the FUSE servers share two cores
    import sdtrt.webui.service as service_module
    from fakehost import FakeHost

    t0 = time.monotonic()
    cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_cache_dir": cache}
    host = FakeHost.boot(Path(workdir), [Path(checkpoint)], config=cfg, args=["--no-half"],
                         extensions={"sd-webui-trt": ROOT})
    client = host.client()

    def engine_calls() -> int:
        return int(service_module.service().counters.snapshot()["engine_calls"])

    def txt2img(cmd: dict[str, Any]) -> dict[str, Any]:
        before = engine_calls()
        start = time.time()
        result = host.txt2img(prompt="a photo of a cat", negative_prompt="blurry", steps=int(cmd.get("steps", 3)),
                              width=64, height=64, seed=int(cmd.get("seed", 77)),
                              override_settings={"sd_unet": cmd.get("unet", "Automatic")})
        latents = result.latents.detach().float()
        return {"ok": True, "latents": latents.flatten().tolist(), "shape": list(latents.shape),
                "engine_calls": engine_calls() - before, "t0": start, "t1": time.time()}

    def http(cmd: dict[str, Any]) -> dict[str, Any]:
        r = client.request(cmd["method"], cmd["path"], json=cmd.get("json"))
        try:
            body = r.json()
        except ValueError:
            body = r.text
        return {"status": r.status_code, "body": body, "t": time.time()}

    def run(cmd: dict[str, Any]) -> None:
        try:
            answer = {"txt2img": txt2img, "http": http}[cmd["op"]](cmd)
        except Exception as e:  # noqa: BLE001 - the test sees every failure as an answer
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        say({"id": cmd["id"], **answer})

    say({"id": "boot", "boot_s": time.monotonic() - t0, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        threading.Thread(target=run, args=(cmd,), daemon=True).start()
    say({"id": "bye"})
    out.close()
    os._exit(0)  # daemon threads (a readiness warm-up) and the host's state die with the process


if __name__ == "__main__":
    main(*sys.argv[1:4])

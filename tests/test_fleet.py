"""Fleet mode in the fake A1111 1.10.1: a replica that never builds (SDTRT_BUILDS=off) and writes nothing to the cache,
and engines that another process publishes into (or removes from) the shared cache picked up without a restart: by
themselves at the start of a generation (SDTRT_RESCAN_S) and at once after POST /sdtrt/v1/rescan. Every generation is
compared with SD Unet None (PyTorch)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import sdtrt.webui.service as service_module
from conftest import WEBUI_PROFILE
from fakehost import FakeHost
from sdtrt.pipeline.build import build_engine
from sdtrt.profiles import Profile
from sdtrt.storage.registry import Registry
from sdtrt.webui import tab
from sdtrt.webui.fleet import CacheWatcher, FleetSettings, fingerprint
from webui_support import close_webuis

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    hosts: list[FakeHost] = []

    def make(checkpoint: Path, cache: Path, **env: str) -> FakeHost:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        service_module._SERVICE = None  # one service per WebUI process; it reads the environment when made
        cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_cache_dir": str(cache)}
        host = FakeHost.boot(tmp_path / f"host{len(hosts)}", [checkpoint], config=cfg, args=["--no-half"],
                             extensions={"sd-webui-trt": ROOT})
        hosts.append(host)
        return host

    yield make
    close_webuis(hosts)


def engine_calls() -> int:
    return int(service_module.service().counters.snapshot()["engine_calls"])


def generate(host: FakeHost, unet: str = "Automatic") -> tuple[torch.Tensor, int]:
    """(latents, engine calls) of one txt2img."""
    before = engine_calls()
    result = host.txt2img(prompt="a photo of a cat", negative_prompt="blurry", steps=STEPS, width=64, height=64,
                          seed=77, override_settings={"sd_unet": unet})
    return result.latents, engine_calls() - before


def assert_pytorch_image(host: FakeHost, latents: torch.Tensor) -> None:
    reference, calls = generate(host, unet="None")
    assert calls == 0
    scale = reference.abs().max().item()
    assert scale > 0.1 and (latents - reference).abs().max().item() <= 1e-3 * scale


def publish(checkpoint: Path, cache: Path) -> str:
    """What the pre-build Job does: build into the shared cache from another process (here: the same code)."""
    return build_engine(checkpoint, [Profile.parse(WEBUI_PROFILE)], cache, backend="onnxruntime").manifest.id


def test_the_tab_says_nothing_about_fleets_where_the_replica_builds() -> None:
    assert tab.fleet_notice(FleetSettings(builds=True)) is None
    assert "every 3 s" in str(tab.fleet_notice(FleetSettings(builds=False, rescan_s=3.0)))


def test_settings_are_read_from_the_environment_and_typos_never_start_writes(caplog: Any) -> None:
    assert FleetSettings.from_env({}) == FleetSettings(True, 10.0)
    assert FleetSettings.from_env({"SDTRT_BUILDS": "off", "SDTRT_RESCAN_S": "2.5"}) == FleetSettings(False, 2.5)
    assert FleetSettings.from_env({"SDTRT_BUILDS": "ON"}).builds
    with caplog.at_level(logging.WARNING, logger="sdtrt"):
        assert FleetSettings.from_env({"SDTRT_BUILDS": "of", "SDTRT_RESCAN_S": "-1"}) == FleetSettings(False, 10.0)
    assert "SDTRT_BUILDS='of'" in caplog.text and "SDTRT_RESCAN_S='-1'" in caplog.text


def test_the_watcher_sees_publish_replace_and_delete_and_looks_at_most_every_interval(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    clock = [0.0]
    watcher = CacheWatcher(10.0, clock=lambda: clock[0])
    watcher.listed(cache)
    engine = cache / "sd1-onnxruntime-0123456789abcdef"
    engine.mkdir()
    (engine / "manifest.json").write_text("{}")
    (cache / "logs").mkdir()  # not an engine: never counts
    assert not watcher.changed(cache)  # within the interval: not even looked at
    clock[0] = 10.0
    assert watcher.changed(cache)
    watcher.listed(cache)
    assert not watcher.changed(cache, now=True)
    os.utime(engine / "manifest.json", ns=(1, 1))  # replaced in place (a rebuild under the same id)
    assert watcher.changed(cache, now=True)
    watcher.listed(cache)
    (engine / "manifest.json").unlink()
    engine.rmdir()
    assert watcher.changed(cache, now=True) and fingerprint(cache) == ()


def test_a_replica_that_does_not_build_refuses_builds_and_writes_nothing(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "shared-cache"
    engine_id = publish(tiny_checkpoint("sd1"), cache)
    dead = cache / f".tmp-{engine_id}-otherhost-1-abcd"  # what a killed build elsewhere left: not ours to remove
    dead.mkdir()
    os.utime(dead, (time.time() - 7200,) * 2)
    before = sorted(p.name for p in cache.rglob("*"))
    host = boot(tiny_checkpoint("sd1"), cache, SDTRT_BUILDS="off")
    client = host.client()
    r = client.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s0", "profiles": ["1x64x64x75"]})
    assert r.status_code == 409 and "SDTRT_BUILDS=off" in r.json()["detail"] and "pre-build Job" in r.json()["detail"]
    assert client.delete(f"/sdtrt/v1/engines/{engine_id}").status_code == 409
    assert client.post(f"/sdtrt/v1/engines/{engine_id}/rebuild").status_code == 409
    assert service_module.service().collect_garbage(max_age_s=0) == []
    svc = service_module.service()
    notice = tab.fleet_notice(svc.state.fleet)  # the tab says so above its (disabled) Build button
    assert notice is not None and "SDTRT_BUILDS=off" in notice and "pre-build Job" in notice
    refused = tab.run_build(svc, "sd1-s0", "1x64x64x75", "onnxruntime", lambda f, d: None)
    assert refused.startswith("Not started: this WebUI does not build engines (SDTRT_BUILDS=off)")
    latents, calls = generate(host)  # it serves the engine the Job built
    assert calls == STEPS
    assert_pytorch_image(host, latents)
    assert sorted(p.name for p in cache.rglob("*")) == before  # no lock, lease, temp folder or cleanup


def test_an_engine_published_by_another_process_is_served_from_the_next_generation(boot, tiny_checkpoint,  # type: ignore[no-untyped-def]
                                                                                   tmp_path) -> None:
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    ckpt = tiny_checkpoint("sd1")
    host = boot(ckpt, cache, SDTRT_BUILDS="off", SDTRT_RESCAN_S="0")
    latents, calls = generate(host)
    assert calls == 0  # no engine yet: PyTorch
    engine_id = publish(ckpt, cache)
    latents, calls = generate(host)  # no restart, no call: the generation's own look at the cache
    assert calls == STEPS
    assert service_module.service().status().active.engines == [engine_id]
    assert_pytorch_image(host, latents)
    generate(host)  # on the engine again (the comparison ran with SD Unet None)
    Registry(cache).delete(engine_id)  # removed by another process: dropped at the next generation, no error
    latents, calls = generate(host)
    assert calls == 0 and service_module.service().counters.snapshot()["last_error"] is None
    assert_pytorch_image(host, latents)


def test_rescan_picks_up_a_new_engine_at_once_between_the_periodic_looks(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    ckpt = tiny_checkpoint("sd1")
    host = boot(ckpt, cache, SDTRT_BUILDS="off", SDTRT_RESCAN_S="3600")
    generate(host)
    engine_id = publish(ckpt, cache)
    _, calls = generate(host)
    assert calls == 0  # the next periodic look is an hour away
    r = host.client().post("/sdtrt/v1/rescan")
    assert r.status_code == 200 and r.json() == {"changed": True, "engines": [engine_id]}
    assert host.client().post("/sdtrt/v1/rescan").json()["changed"] is False  # nothing new since
    latents, calls = generate(host)
    assert calls == STEPS
    assert_pytorch_image(host, latents)


def ready(host: FakeHost) -> tuple[int, dict[str, Any]]:
    r = host.client().get("/sdtrt/v1/ready")
    return r.status_code, r.json()


def test_without_require_engine_a_replica_is_ready_on_pytorch_and_says_so(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), tmp_path / "empty-cache")
    code, body = ready(host)
    assert code == 200 and body["ready"] and body["reasons"] == []
    assert body["serving"] == "pytorch" and body["engine"] is None and body["checkpoint"].startswith("sd1-s0")


def test_with_require_engine_ready_waits_for_the_engine_and_loads_it_itself(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    ckpt = tiny_checkpoint("sd1")
    host = boot(ckpt, cache, SDTRT_BUILDS="off", SDTRT_RESCAN_S="0", SDTRT_REQUIRE_ENGINE="1")
    code, body = ready(host)
    assert code == 503 and not body["ready"] and "no engine for sd1-s0" in body["reasons"][0]
    engine_id = publish(ckpt, cache)  # the pre-build Job
    deadline = time.monotonic() + 120
    while (answer := ready(host))[0] != 200 and time.monotonic() < deadline:
        assert answer[0] == 503 and answer[1]["engine"] == engine_id, answer  # found, loading
        time.sleep(0.2)
    code, body = answer
    assert code == 200 and body["loaded"] and body["serving"] == "engine" and body["engine"] == engine_id
    latents, calls = generate(host)  # no rescan call, no restart: the first generation is on the engine
    assert calls == STEPS
    assert_pytorch_image(host, latents)


def test_an_engine_for_another_backend_version_is_never_loaded_and_ready_says_why(boot, tiny_checkpoint,  # type: ignore[no-untyped-def]
                                                                                  tmp_path, monkeypatch) -> None:
    from sdtrt.engine_types import BackendInfo

    cache = tmp_path / "shared-cache"
    ckpt = tiny_checkpoint("sd1")
    engine_id = publish(ckpt, cache)
    host = boot(ckpt, cache, SDTRT_BUILDS="off", SDTRT_REQUIRE_ENGINE="1")
    svc = service_module.service()
    monkeypatch.setattr(svc.probe, "info", lambda name: BackendInfo(name, "0.0.0-another", "cpu"))
    svc.refresh_list()
    code, body = ready(host)
    assert code == 503 and engine_id in body["reasons"][0] and "0.0.0-another" in body["reasons"][0]
    latents, calls = generate(host)
    assert calls == 0 and svc.status().active is None  # listed nowhere, never loaded: PyTorch
    assert_pytorch_image(host, latents)

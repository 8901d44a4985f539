"""The GPU runbook's CPU dry run (what CI can run of it): every step recorded in one JSON within its budget, wheels
split into parts joined and installed without an index, the baselines measured; and `bench build` on small
models (its figures are measured in child processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import FP16_RUNS
from sdtrt.tools.runbook import join_parts, run

REPO = Path(__file__).resolve().parents[1]


def _wheel(dest: Path, name: str, payload: bytes) -> Path:
    """A real (pure-Python) wheel of package `name` whose module holds PAYLOAD_SIZE = len(payload)."""
    dist = f"{name}-1.0"
    path = dest / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", f"PAYLOAD_SIZE = {len(payload)}\n")
        zf.writestr(f"{name}/blob.bin", payload)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_split_wheels_are_joined_in_order(tmp_path: Path) -> None:
    import random

    payload = random.Random(0).randbytes(300_000)
    whole = _wheel(tmp_path, "sdtrt_probe_whole", b"x")
    big = _wheel(tmp_path, "sdtrt_probe_split", payload)
    data = big.read_bytes()
    for i, suffix in enumerate(("aa", "ab", "ac")):  # as `split -b N big big.part-` names them
        Path(f"{big}.part-{suffix}").write_bytes(data[i * 120_000:(i + 1) * 120_000])
    big.unlink()
    wheels = join_parts(tmp_path, tmp_path / "joined")
    assert sorted(w.name for w in wheels) == sorted([whole.name, big.name])
    joined = next(w for w in wheels if w.name == big.name)
    assert joined.read_bytes() == data and zipfile.ZipFile(joined).testzip() is None


def test_dry_run_records_every_step(tmp_path: Path) -> None:
    """The runbook on the CPU: machine, wheels (a split wheel joined and installed with no index), baselines,
    the TensorRT-RTX attempt (recorded whatever happens), the GPU tests and bench latency, in one JSON."""
    import random

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    big = _wheel(wheels, "sdtrt_probe_rb", random.Random(1).randbytes(200_000))
    data = big.read_bytes()
    Path(f"{big}.part-aa").write_bytes(data[:100_000])
    Path(f"{big}.part-ab").write_bytes(data[100_000:])
    big.unlink()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "runbook", "--dry-run", "--wheels", str(wheels),
                           "--out", str(out), "--total-seconds", "400"],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO / "extension")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu-runbook.json").read_text())
    assert report["dry_run"] is True and report["device"] == "cpu" and report["seconds"] <= 400
    for step in ("machine", "wheels", "baselines", "tensorrt_rtx", "tests", "bench"):
        assert step in report and "seconds" in report[step], step
    assert report["machine"]["ok"] and report["machine"]["result"]["torch"]
    wheels_result = report["wheels"]["result"]
    assert wheels_result["installed"] == [big.name] and wheels_result["returncode"] == 0, wheels_result
    baselines = report["baselines"]["result"]
    assert [b["model"] for b in baselines] == ["tiny", "small"]
    assert all(b["median_ms"] > 0 and b["unet_batch"] == 2 and b["p10_ms"] <= b["median_ms"] <= b["p90_ms"]
               for b in baselines)
    rtx = report["tensorrt_rtx"]
    assert rtx["ok"] and ("unavailable" in rtx["result"] or "import_error" in rtx["result"])  # no GPU: recorded
    assert "returncode" in report["tests"]["result"] or "timed_out_s" in report["tests"]["result"]
    bench = report["bench"]["result"]
    assert bench.get("returncode") == 0, bench
    assert bench["json"]["latency"][0]["model"] == "tiny" and bench["json"]["latency"][0]["engine"]["median_ms"] > 0


def test_bench_build_measures_export_and_aot_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdtrt.tools.cli import main

    dtype = "float16" if FP16_RUNS else "float32"  # torch 2.1 (A1111's) traces float16 only on a GPU
    code = main(["bench", "build", "--model", "tiny", "--work", str(tmp_path), "--dtype", dtype, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    [row] = json.loads(out)["build"]
    assert row["model"] == "tiny" and row["params"] > 100_000 and row["dtype"] == dtype
    assert row["export_s"] > 0 and 0.1 < row["export_peak_rss_gb"] < 8 and row["onnx_gb"] > 0
    try:
        import tensorrt_rtx  # noqa: F401

        assert row["build_s"] > 0 and row["plan_mb"] > 1 and row["library"].startswith("tensorrt-rtx"), row
    except ImportError:
        assert row["build_s"] is None and "TensorRT-RTX build" in row["note"]

"""`python -m sdtrt bench build`: what building costs on the host for full-size UNets (or the small test ones) (random weights, nothing
downloaded): ONNX export time and peak host memory (RSS), then a TensorRT-RTX ahead-of-time build (no GPU needed)
time and peak RSS. Each phase runs in a child process of its own, so its peak RSS is its own (read with wait4),
the way a user's export or build would run, and a phase that runs out of memory is reported, not fatal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtrt.errors import SdtrtError

_GB = 1 << 30


@dataclass(frozen=True)
class BuildBenchRow:
    model: str
    params: int
    checkpoint_gb: float  # the fp16 checkpoint the export reads
    dtype: str
    export_s: float | None
    export_peak_rss_gb: float | None
    onnx_gb: float | None
    build_s: float | None  # None: not built (no TensorRT-RTX here, or the export failed)
    build_peak_rss_gb: float | None
    plan_mb: float | None
    targets: str
    library: str | None
    note: str | None = None


def _phase(args: Sequence[str], timeout: float) -> tuple[float, float | None, dict[str, Any] | None, str]:
    """Run one phase in a child: (seconds, peak RSS in GB (None where os.wait4 is missing, e.g. Windows), its JSON
    result or None, what went wrong)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    peak: float | None = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "sdtrt.tools.bench_build", *args], stdout=out, stderr=err, env=env)
        try:
            if hasattr(os, "wait4"):
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        proc.returncode = os.waitstatus_to_exitcode(status)
                        peak = usage.ru_maxrss * 1024 / _GB  # KiB on Linux
                        break
                    if time.perf_counter() - start > timeout:
                        raise subprocess.TimeoutExpired(proc.args, timeout)
                    time.sleep(0.2)
            else:
                proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return time.perf_counter() - start, None, None, f"timed out after {timeout:.0f} s"
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, tail = out.read().decode(errors="replace"), err.read().decode(errors="replace")[-2000:]
    result = None
    if proc.returncode == 0 and text.strip():
        try:
            result = json.loads(text.strip().splitlines()[-1])
        except ValueError:
            tail = f"no result line: {text.strip()[-300:]}"
    if proc.returncode != 0:
        tail = f"exit {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0 else "") + \
            f": {tail.strip().splitlines()[-1] if tail.strip() else ''}"
    return seconds, peak, result, tail


def build_bench(model: str, work: Path, *, targets: Sequence[str] = ("sm89",), dtype: str = "float16",
                timeout: float = 3600) -> BuildBenchRow:
    """Checkpoint (not measured), export (measured), ahead-of-time build (measured) of one full-size model."""
    from sdtrt.tools.bench import LATENCY_MODELS

    if model not in LATENCY_MODELS:
        raise SdtrtError(f"unknown model {model!r}; choose from {', '.join(LATENCY_MODELS)}")
    pixels = LATENCY_MODELS[model][1]
    profile = f"1x{pixels}x{pixels}x75"  # one image at the model's native size (the UNet sees CFG batch 2)
    work = Path(work) / model
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "bench.safetensors"
    _, _, made, err = _phase(["checkpoint", model, str(ckpt)], timeout)
    if made is None:
        raise RuntimeError(f"could not write the {model} checkpoint: {err}")
    export_s, export_rss, exported, err = _phase(["export", str(ckpt), str(work / "onnx"), dtype], timeout)
    row: dict[str, Any] = dict(model=model, params=made["params"], checkpoint_gb=ckpt.stat().st_size / _GB,
                               dtype=dtype, export_s=export_s, export_peak_rss_gb=export_rss, onnx_gb=None,
                               build_s=None, build_peak_rss_gb=None, plan_mb=None, targets=",".join(targets),
                               library=None)
    if exported is None:
        return BuildBenchRow(**dict(row, export_s=None, export_peak_rss_gb=export_rss, note=f"export failed: {err}"))
    row["onnx_gb"] = exported["onnx_bytes"] / _GB
    ckpt.unlink()
    build_s, build_rss, built, err = _phase(["build", exported["onnx"], profile, str(work / "plan"),
                                             ",".join(targets), exported["contract"]], timeout)
    if built is None:
        return BuildBenchRow(**dict(row, note=f"TensorRT-RTX build: {err}"))
    return BuildBenchRow(**dict(row, build_s=build_s, build_peak_rss_gb=build_rss,
                                plan_mb=built["plan_bytes"] / (1 << 20), library=built["library"]))


def format_build(rows: Sequence[BuildBenchRow]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{'model':6} {'params':>7} {'ckpt GB':>7} {'export s':>8} {'peak GB':>7} {'onnx GB':>7} "
             f"{'build s':>8} {'peak GB':>7} {'plan MB':>8}  targets"]
    for r in rows:
        lines.append(f"{r.model:6} {r.params / 1e9:6.2f}B {r.checkpoint_gb:7.2f} {num(r.export_s, '8.1f')} "
                     f"{num(r.export_peak_rss_gb, '7.2f')} {num(r.onnx_gb, '7.2f')} {num(r.build_s, '8.1f')} "
                     f"{num(r.build_peak_rss_gb, '7.2f')} {num(r.plan_mb, '8.1f')}  {r.targets}"
                     + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def to_dict(row: BuildBenchRow) -> dict[str, Any]:
    return asdict(row)


# ---- the phases, each in its own process --------------------------------------------------------------------------

def _write_checkpoint(model: str, path: Path) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    from sdtrt.tools.bench import LATENCY_MODELS
    from sdtrt.tools.tiny import write_checkpoint

    path = write_checkpoint(LATENCY_MODELS[model][0], path.parent, path.stem, dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        return {"params": sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _export(ckpt: Path, out: Path, dtype: str) -> dict[str, Any]:
    """What a build's export does (pipeline.build_engine's first half)."""
    from sdtrt.fsutil import onnx_files
    from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
    from sdtrt.pipeline.export import ExportSettings, export_unet

    checkpoint, sd = open_checkpoint(ckpt)
    keys = set(sd)
    contract = checkpoint.info.contract_for(False)
    unet = build_unet(checkpoint.info, sd, share=True)
    del sd
    exported = export_unet(unet, contract, out, ExportSettings(dtype=dtype), state_dict_keys=keys, owned=True)
    return {"onnx": str(exported.onnx_path), "onnx_bytes": sum(p.stat().st_size for p in onnx_files(exported.onnx_path)),
            "contract": json.dumps(contract.record())}


def _build(onnx: Path, profile: str, out: Path, targets: str, record: str) -> dict[str, Any]:
    from sdtrt.backends import get_backend
    from sdtrt.backends.base import BuildOptions
    from sdtrt.models import bind_record
    from sdtrt.profiles import Profile
    from sdtrt.targets import parse_targets

    contract = bind_record(json.loads(record))
    options = BuildOptions(refit=False, strip_weights=False, targets=parse_targets(targets))
    backend = get_backend("tensorrt-rtx", targets=options.targets)
    options, _ = backend.build_options(options)
    out.mkdir(parents=True, exist_ok=True)
    result = backend.build(onnx, [contract.engine_ranges(Profile.parse(profile))], out, options)
    info = backend.build_info(options)
    return {"plan_bytes": sum((out / f).stat().st_size for f in result.files), "library": f"{info.name} {info.version}"}


def _main(argv: Sequence[str]) -> None:
    phase, *rest = argv
    if phase == "checkpoint":
        result = _write_checkpoint(rest[0], Path(rest[1]))
    elif phase == "export":
        result = _export(Path(rest[0]), Path(rest[1]), rest[2])
    elif phase == "build":
        result = _build(Path(rest[0]), rest[1], Path(rest[2]), rest[3], rest[4])
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])

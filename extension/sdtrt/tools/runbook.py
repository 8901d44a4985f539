"""The GPU runbook (`python -m sdtrt runbook`, or `bash run.sh gpu-runbook`): on a machine with an NVIDIA GPU and
no package index, in at most 8 minutes, one JSON with

1. the machine (nvidia-smi, torch, compute capability, free memory);
2. the wheels brought along (`--wheels DIR`: *.whl, and wheels split into parts `NAME.whl.part-*` of at most
   64 MiB, joined in name order), installed without an index into a folder of the run's own;
3. PyTorch baselines the way A1111 runs them: full-size SD1.5 at 512x512 and SDXL base at 1024x1024, fp16, SDPA,
   CFG batch 2, median ms per UNet call over 20+ calls after warm-up (CUDA events), peak memory;
4. an attempt to build and run a TensorRT-RTX engine of a tiny UNet on this GPU through the project's own code,
   compared with PyTorch; everything that happens is recorded, errors word for word (Hopper, sm90, is not among
   TensorRT-RTX 1.x's documented targets);
5. the project's GPU tests and `bench latency`, each in a child process with its share of the time left.

Every step has a time budget and is recorded whether it worked or not; the run never stops at a failed step.
`--dry-run` does the same on the CPU with tiny models and short budgets (CI runs it)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The whole run's budget, and each step's share (seconds); a step gets at most what is left.
TOTAL_S = 480.0
BUDGETS = {"machine": 20.0, "wheels": 60.0, "baselines": 120.0, "tensorrt_rtx": 110.0, "tests": 80.0, "bench": 80.0}
PART_MARK = ".part-"


def join_parts(wheels: Path, into: Path) -> list[Path]:
    """Every wheel in `wheels`: whole ones as they are, split ones (`NAME.whl.part-aa`, `-ab`, ... as `split -b
    60M NAME.whl NAME.whl.part-` names them) joined into `into`, in name order. Returns the wheel paths."""
    out = sorted(wheels.glob("*.whl"))
    parts: dict[str, list[Path]] = {}
    for p in sorted(wheels.glob(f"*.whl{PART_MARK}*")):
        parts.setdefault(p.name.split(PART_MARK)[0], []).append(p)
    into.mkdir(parents=True, exist_ok=True)
    for name, pieces in sorted(parts.items()):
        target = into / name
        with open(target, "wb") as f:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 22)
        out.append(target)
    return out


def install_wheels(wheels: Sequence[Path], site: Path, timeout: float) -> dict[str, Any]:
    """pip install the wheels into `site` without an index or dependencies; what pip said."""
    if not wheels:
        return {"installed": [], "note": "no wheels given"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
           "--target", str(site), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return {"installed": [w.name for w in wheels], "returncode": proc.returncode,
            "output": (proc.stdout + proc.stderr)[-3000:]}


def _machine(dry_run: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "cpu_count": os.cpu_count()}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,memory.free,compute_cap",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        info["nvidia_smi"] = (q.stdout or q.stderr).strip()
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=torch.cuda.get_device_name(), compute_capability=".".join(
            map(str, torch.cuda.get_device_capability())), free_gb=free / 2**30, total_gb=total / 2**30)
    return info


def baseline(model: str, device: str, repeats: int, warmup: int = 3) -> dict[str, Any]:
    """Median ms per UNet call of a random-weight UNet (CFG batch 2, SDPA, fp16 on a GPU) and peak memory."""
    import torch

    from sdtrt.models import LdmUNet, SgmUNet, TensorIO, bind
    from sdtrt.models.torch_unet import UNetModel
    from sdtrt.profiles import Shape
    from sdtrt.tools.bench import LATENCY_MODELS
    from sdtrt.tools.tiny import randomize_

    spec, pixels = LATENCY_MODELS[model]
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = randomize_(UNetModel(spec).eval().requires_grad_(False), 0).to(device, dtype)
    contract = bind(SgmUNet.name if spec.adm_in_channels is not None else LdmUNet.name,
                    TensorIO(spec.in_channels, spec.context_dim, spec.adm_in_channels))
    feeds = contract.random_feeds(contract.call_dims(Shape(1, pixels, pixels, 75)), device, dtype,
                                  torch.Generator().manual_seed(0))
    args, kwargs = contract.host_args(feeds)
    times: list[float] = []
    with torch.no_grad():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            unet(*args, **kwargs)
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                unet(*args, **kwargs)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                unet(*args, **kwargs)
                times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    out = {"model": model, "pixels": pixels, "unet_batch": 2, "dtype": str(dtype).replace("torch.", ""),
           "attention": "sdpa", "calls": repeats, "median_ms": times[len(times) // 2],
           "p10_ms": times[len(times) // 10], "p90_ms": times[(9 * len(times)) // 10]}
    if device == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del unet
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def tensorrt_rtx_attempt(work: Path) -> dict[str, Any]:
    """Build a TensorRT-RTX engine of a tiny SD1 UNet for this GPU with the project's code, run it, compare it
    with PyTorch. Records each stage; the first failure ends the attempt with its exact text."""
    out: dict[str, Any] = {"stage": "probe"}
    try:
        _attempt(work, out)
    except Exception as e:  # noqa: BLE001 - what happened is the result
        out.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    return out


def _attempt(work: Path, out: dict[str, Any]) -> None:
    from sdtrt.backends import backend_class

    cls = backend_class("tensorrt-rtx")
    out["unavailable"] = cls.unavailable_reason()
    try:
        import tensorrt_rtx

        out["version"] = getattr(tensorrt_rtx, "__version__", "?")
        out["targets"] = [n for n in dir(tensorrt_rtx.ComputeCapability) if n.startswith("SM")]
    except Exception as e:  # noqa: BLE001 - recorded
        out["import_error"] = f"{type(e).__name__}: {e}"
        return
    if out["unavailable"] is not None:
        return
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile, Shape
    from sdtrt.tools.check import check_engine
    from sdtrt.tools.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint("sd1", work)
    out["stage"] = "build"
    t0 = time.perf_counter()
    built = build_engine(ckpt, [Profile.parse("1x64x64x75:2x96x96x75:2x128x128x150")], work / "cache",
                         backend="tensorrt-rtx")
    out.update(build_s=time.perf_counter() - t0, engine=built.manifest.id, plan_bytes=built.manifest.files[0].size)
    out["stage"] = "run"
    rows = check_engine(work / "cache", built.manifest.id, ckpt, [Shape.parse("1x64x64x75"), Shape.parse("2x96x96x75")])
    out["check"] = [r.to_dict() for r in rows]
    out["matches_pytorch"] = all(r.rel_diff < 2e-2 for r in rows)
    out["stage"] = "done"


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _child(cmd: Sequence[str], timeout: float, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run `cmd` with at most `timeout` seconds; its output (and its JSON document, when it printed one)."""
    if timeout < 1.0:
        return {"cmd": list(cmd), "skipped": "no time left in the run's budget"}
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        return {"cmd": list(cmd), "timed_out_s": timeout, "output": (_text(e.stdout) + _text(e.stderr))[-3000:]}
    result: dict[str, Any] = {"cmd": list(cmd), "returncode": proc.returncode,
                              "output": (proc.stdout + proc.stderr)[-3000:]}
    try:
        result["json"] = json.loads(proc.stdout)  # a command that prints one JSON document (bench --json)
    except ValueError:
        pass
    return result


def run(out_dir: Path, wheels: Path | None = None, *, dry_run: bool = False,
        total_s: float = TOTAL_S, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Do every step within `total_s`, write `out_dir/gpu-runbook.json`, and return what it holds."""
    import torch

    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    report: dict[str, Any] = {"dry_run": dry_run, "device": device, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                                time.gmtime())}
    repo = Path(__file__).resolve().parents[2]
    work = Path(tempfile.mkdtemp(prefix="sdtrt-runbook-"))
    site = work / "site"
    env = dict(os.environ)

    def left(step: str) -> float:
        return max(0.0, min(BUDGETS[step], total_s - (time.monotonic() - started)))

    def step(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.monotonic()
        log(f"[runbook] {name} ...")
        try:
            report[name] = {"ok": True, "result": fn()}
        except Exception as e:  # noqa: BLE001 - every failure is a result (Ctrl-C still stops the run)
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-4000:]}
        report[name]["seconds"] = round(time.monotonic() - t0, 1)
        _write(out_dir, report)

    step("machine", lambda: _machine(dry_run))

    def wheels_step() -> dict[str, Any]:
        found = join_parts(wheels, work / "joined") if wheels else []
        result = install_wheels(found, site, left("wheels"))
        if found:
            sys.path.insert(0, str(site))
            env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
        return result

    step("wheels", wheels_step)

    env["PYTHONPATH"] = os.pathsep.join([str(repo / "extension"), env.get("PYTHONPATH", "")])

    def in_child(name: str, *args: str) -> Any:
        """A step of this module run in a child process, so that its budget holds even if it hangs."""
        done = _child([sys.executable, "-m", "sdtrt.tools.runbook", name, *args], left(name), env, repo)
        if "json" not in done:
            raise RuntimeError(f"{name} gave no result: {done.get('skipped') or done.get('timed_out_s') and 'timed out'}"
                               f" {done.get('output', '')[-1500:]}")
        return done["json"]

    step("baselines", lambda: in_child("baselines", device))
    step("tensorrt_rtx", lambda: in_child("tensorrt_rtx", str(work / "rtx")))
    tests = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_tensorrt_backend.py",
             "-k", "build_run_refit or cuda_graphs or cancelled"]
    step("tests", lambda: _child(tests, left("tests"), env, repo))
    bench = [sys.executable, "-m", "sdtrt", "bench", "latency", "--model", "tiny" if dry_run else "sd15",
             "--batch", "1", "--repeats", "3" if dry_run else "20", "--json",
             "--backend", "onnxruntime" if dry_run else "auto"]
    step("bench", lambda: _child(bench, left("bench"), env, repo))
    report["seconds"] = round(time.monotonic() - started, 1)
    shutil.rmtree(work, ignore_errors=True)
    _write(out_dir, report)
    return report


def _write(out_dir: Path, report: dict[str, Any]) -> None:
    path = out_dir / "gpu-runbook.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _step_main(argv: Sequence[str]) -> None:
    """`python -m sdtrt.tools.runbook STEP ARGS`: one step in a child process, its result as one JSON line."""
    name, *args = argv
    if name == "baselines":
        device = args[0]
        models = ("tiny", "small") if device == "cpu" else ("sd15", "sdxl")
        result: Any = [baseline(m, device, repeats=5 if device == "cpu" else 20) for m in models]
    elif name == "tensorrt_rtx":
        result = tensorrt_rtx_attempt(Path(args[0]))
    else:
        raise SystemExit(f"unknown step {name!r}")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    _step_main(sys.argv[1:])

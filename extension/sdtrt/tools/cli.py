"""`python -m sdtrt`: export, build, prebuild, list, delete, check, demo. Also the headless path for servers: a job can
pre-build engines into a shared cache before WebUI replicas start.

With --json, stdout carries exactly one JSON document; errors go to stderr with exit code 1 (2 for bad usage)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdtrt.constants import CACHE_ENV
from sdtrt.errors import SdtrtError
from sdtrt.locations import default_cache_dir


def default_cache() -> Path:
    return default_cache_dir()


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        print(text)


def _progress(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    last = {"phase": None}

    def report(phase: str, fraction: float) -> None:
        if phase != last["phase"]:
            print(f"[sdtrt] {phase} ...", file=sys.stderr, flush=True)
            last["phase"] = phase

    return report


def cmd_export(args: argparse.Namespace) -> int:
    from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
    from sdtrt.pipeline.export import ExportSettings, export_unet

    ckpt, sd = open_checkpoint(args.checkpoint, args.config)
    keys = set(sd)
    unet = build_unet(ckpt.info, sd, share=True)  # one copy of the weights in memory: the export owns the module
    del sd
    result = export_unet(unet, ckpt.info.contract, args.out, ExportSettings(dtype=args.dtype, opset=args.opset),
                         state_dict_keys=keys, progress=_progress(args), owned=True)
    data = {"onnx": str(result.onnx_path), "weights": len(result.weight_names), "external_data": result.external_data,
            "family": ckpt.info.family_id, "architecture": ckpt.info.describe()}
    _emit(args, data, f"exported {ckpt.info.describe()} to {result.onnx_path} ({len(result.weight_names)} weights)")
    return 0


def _parse_profiles(specs: Sequence[str]) -> list[Any]:
    from sdtrt.profiles import Profile

    return [Profile.parse(s) for s in specs]


def cmd_build(args: argparse.Namespace) -> int:
    from sdtrt.backends.base import BuildOptions
    from sdtrt.models.convention import A1111
    from sdtrt.pipeline.build import build_engine
    from sdtrt.targets import parse_targets

    options = BuildOptions(refit=not args.no_refit, strip_weights=not (args.no_strip or args.no_refit),
                           cache_dir=Path(args.cache) / ".cache", targets=parse_targets(args.target))
    outcome = build_engine(args.checkpoint, _parse_profiles(args.profile), args.cache, config=args.config,
                           backend=args.backend, dtype=args.dtype, options=options, progress=_progress(args),
                           controlnet=args.controlnet, convention=args.convention or A1111)
    m = outcome.manifest
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    data = {"id": m.id, "built": outcome.built, "manifest": m.to_dict(), "notes": list(outcome.notes)}
    _emit(args, data, m.id)
    return 0


def cmd_prebuild(args: argparse.Namespace) -> int:
    from sdtrt.backends import NAMES
    from sdtrt.tools.prebuild import load_plan, run_plan, summary

    plan = load_plan(args.plan, NAMES)
    reports = run_plan(plan, args.models, args.cache, log=lambda m: print(f"[sdtrt] {m}", file=sys.stderr, flush=True))
    data = summary(reports)
    _emit(args, data, f"{data['built']} built, {data['present']} already present, {data['failed']} failed")
    return 1 if data["failed"] else 0


def cmd_list(args: argparse.Namespace) -> int:
    from sdtrt.serving.catalog import BackendProbe, engine_rows
    from sdtrt.storage.registry import Registry

    rows = []
    for row in engine_rows(Registry(args.cache), BackendProbe()):
        # a build node lists engines for GPUs it does not have: "OK" means not stale, whether or not it runs here
        m = row.manifest
        rows.append({
            "id": row.id, "ok": row.stale is None, "reason": row.stale,
            "family": m.key.family if m else None,
            "profiles": list(m.key.profiles) if m else [],
            "backend": f"{m.key.backend} {m.key.backend_version}" if m else None,
            "device": m.key.device if m else None,
            "targets": list(m.key.targets) if m else [],
            "weights": m.key.weights.value if m else None,
            "size": row.size_bytes,
            "checkpoint": m.source_checkpoint.get("name") if m else None,
            "controlnet": row.controlnet, "convention": row.convention,
        })
    lines = [f"{'OK   ' if r['ok'] else 'STALE'} {r['id']}  {r['family'] or '?'}"
             f"{' +ControlNet' if r['controlnet'] else ''}  {r['convention'] or '?'}  {r['backend'] or '?'}"
             f"{' for ' + ','.join(r['targets']) if r['targets'] else ''}  "
             f"{', '.join(r['profiles'])}" + ("" if r["ok"] else f"  ({r['reason']})") for r in rows]
    _emit(args, {"cache": str(args.cache), "engines": rows}, "\n".join(lines) or f"no engines in {args.cache}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from sdtrt.storage.registry import Registry

    Registry(args.cache).delete(args.id)
    _emit(args, {"deleted": args.id}, f"deleted {args.id}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from sdtrt.storage.registry import Registry

    removed = Registry(args.cache).cleanup(max_age_s=args.older_than)
    _emit(args, {"cache": str(args.cache), "removed": removed},
          "\n".join(f"removed {n}" for n in removed) or "nothing to remove")
    return 0


def _check_text(rows: Sequence[Any]) -> str:
    head = f"{'shape':<18} {'max|diff|':>11} {'max|out|':>10} {'rel':>9} {'torch ms':>9} {'engine ms':>10}"
    return "\n".join([head] + [
        f"{r.shape:<18} {r.max_abs_diff:11.3e} {r.max_abs_out:10.4f} {r.rel_diff:9.2e} {r.torch_ms:9.2f} "
        f"{r.engine_ms:10.2f}" for r in rows])


def cmd_check(args: argparse.Namespace) -> int:
    from sdtrt.pipeline.lora import LoraSpec
    from sdtrt.profiles import Shape
    from sdtrt.tools.check import check_engine

    rows = check_engine(args.cache, args.id, args.checkpoint, [Shape.parse(s) for s in args.shape],
                        config=args.config, loras=[LoraSpec.parse(x) for x in args.lora])
    _emit(args, {"id": args.id, "rows": [r.to_dict() for r in rows]}, _check_text(rows))
    return 0


def _bench_build(args: argparse.Namespace, device: str) -> None:
    import torch

    from sdtrt.targets import parse_targets
    from sdtrt.tools.bench_build import build_bench, format_build, to_dict

    targets = parse_targets(args.target or "sm89")
    with tempfile.TemporaryDirectory(prefix="sdtrt-bench-build-", dir=args.work) as tmp:
        rows = [build_bench(m, Path(tmp), targets=targets, dtype=args.dtype) for m in (args.model or ["sd15", "sdxl"])]
    _emit(args, {"build": [to_dict(r) for r in rows], "torch": torch.__version__}, format_build(rows))


def _bench_refit(args: argparse.Namespace, device: str) -> None:
    from sdtrt.tools.bench import to_dicts
    from sdtrt.tools.bench_refit import format_refit, refit_bench

    rows = [refit_bench(f, rank=args.rank, device=device) for f in (args.family or ["sd15", "sdxl"])]
    _emit(args, {"refit": to_dicts(rows)}, format_refit(rows))


def _bench_latency(args: argparse.Namespace, device: str) -> None:
    import torch

    from sdtrt.tools.bench import (
        LATENCY_MODELS,
        controlnet_bench,
        format_controlnet,
        format_latency,
        latency_bench,
        latency_chart,
        to_dicts,
    )

    models = args.model or (["sd15", "sd21", "sdxl"] if device == "cuda" else ["tiny", "small"])
    unknown = sorted(set(models) - set(LATENCY_MODELS))
    if unknown:
        raise SdtrtError(f"unknown model {unknown}; choose from {', '.join(LATENCY_MODELS)}")
    with tempfile.TemporaryDirectory(prefix="sdtrt-bench-") as tmp:
        lat = [latency_bench(m, b, Path(tmp), backend=args.backend, repeats=args.repeats)
               for m in models for b in (args.batch or [1, 4])]
        # one ControlNet row per model, at the first batch size
        cn = [controlnet_bench(m, (args.batch or [1])[0], Path(tmp), backend=args.backend, repeats=args.repeats)
              for m in models]
    chart = str(latency_chart(lat, args.chart)) if args.chart else None
    _emit(args, {"latency": to_dicts(lat), "controlnet": to_dicts(cn), "chart": chart, "torch": torch.__version__},
          format_latency(lat) + "\n" + format_controlnet(cn) + (f"\nchart: {chart}" if chart else ""))


#: `bench WHAT`: latency (engine vs PyTorch per UNet call), refit (host-side cost of a LoRA), build (export and
#: ahead-of-time build time and peak host memory)
BENCHES = {"latency": _bench_latency, "refit": _bench_refit, "build": _bench_build}


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    BENCHES[args.what](args, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return 0


#: The demo's profile and shapes: batches 1-4, sizes that are multiples of 8 but not of 64, 75 and 150 tokens.
DEMO_PROFILE = "1x64x64x75:2x128x192x75:4x256x256x150"
DEMO_SHAPES = ("1x64x64x75", "2x136x200x150", "4x256x248x75")


def cmd_runbook(args: argparse.Namespace) -> int:
    from sdtrt.tools.runbook import TOTAL_S, run

    report = run(args.out, args.wheels, dry_run=args.dry_run, total_s=args.total_seconds or TOTAL_S,
                 log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report, indent=2, default=str))
    print(f"written: {args.out / 'gpu-runbook.json'}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile, Shape
    from sdtrt.tools.check import check_engine
    from sdtrt.tools.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="sdtrt-demo-") as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        ckpt = args.checkpoint or write_tiny_checkpoint(args.family, work / "models")
        cache = args.cache if args.cache_given else work / "engines"
        outcome = build_engine(ckpt, [Profile.parse(DEMO_PROFILE)], cache, config=args.config,
                               backend=args.backend, progress=_progress(args))
        m = outcome.manifest
        rows = check_engine(cache, m.id, ckpt, [Shape.parse(s) for s in DEMO_SHAPES], config=args.config)
        data = {"id": m.id, "backend": f"{m.key.backend} {m.key.backend_version}", "device": m.key.device,
                "family": m.key.family, "rows": [r.to_dict() for r in rows]}
        text = (f"engine {m.id}: {m.key.family} on {m.key.backend} {m.key.backend_version} ({m.key.device}), "
                f"profile {DEMO_PROFILE}\n" + _check_text(rows))
        _emit(args, data, text)
    return 0


def parser() -> argparse.ArgumentParser:
    from sdtrt.backends import NAMES

    p = argparse.ArgumentParser(prog="python -m sdtrt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, cache: bool = True) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        if cache:
            sp.add_argument("--cache", type=Path, default=None,
                            help=f"engine cache folder (default ${CACHE_ENV} or {default_cache()})")

    def ckpt(sp: argparse.ArgumentParser, positional: bool = True) -> None:
        if positional:
            sp.add_argument("checkpoint", type=Path, help="A1111 .safetensors checkpoint")
        sp.add_argument("--config", type=Path, default=None, help="config yaml (default: <checkpoint>.yaml)")

    sp = sub.add_parser("export", help="export the UNet to ONNX")
    ckpt(sp)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--dtype", choices=("float32", "float16"), default="float16")
    sp.add_argument("--opset", type=int, default=17)
    common(sp, cache=False)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("build", help="build an engine into the cache and print its id")
    ckpt(sp)
    sp.add_argument("--backend", choices=("auto", *NAMES), default="auto")
    sp.add_argument("--profile", action="append", required=True,
                    help="BxHxWxT or min:opt:max (batch = images, pixels, tokens); repeat for more profiles")
    sp.add_argument("--dtype", choices=("float32", "float16"), default=None,
                    help="graph precision (default: float32 on CPU, float16 on GPUs)")
    sp.add_argument("--no-strip", action="store_true",
                    help="keep the weights in the TensorRT plan (default: weight-stripped, filled by refit at load)")
    sp.add_argument("--controlnet", action="store_true",
                    help="engine with ControlNet inputs: serves sd-webui-controlnet's ControlNet and T2I-Adapter "
                         "units on the engine, and plain generations too")
    sp.add_argument("--convention", default=None, metavar="a1111|forge",  # checked by the build (one list)
                    help="whose UNet numerics the engine follows at sizes that are not multiples of 64 px: a1111 "
                         "(upsample x2, resize in the skip concatenation; default) or forge (upsample to the skip's "
                         "size: Forge's)")
    sp.add_argument("--no-refit", action="store_true",
                    help="a non-refittable engine: no checkpoint switching or LoRA, possibly faster")
    sp.add_argument("--target", default=None, metavar="SM,...",
                    help="GPU compute capabilities to build for ahead of time, e.g. sm86,sm89,sm120 (TensorRT-RTX; "
                         "works without a GPU, the engine then embeds the checkpoint's weights); default: current, "
                         "the GPU of this machine")
    common(sp)
    sp.set_defaults(func=cmd_build)

    sp = sub.add_parser("prebuild", help="build every engine a JSON plan names, skipping those already in the cache "
                                         "(a fleet's pre-build Job: re-running it is a no-op)")
    sp.add_argument("plan", type=Path, help='JSON {"builds": [{"checkpoint", "profiles", "backend", "targets", '
                                            '"controlnet", "refit", "dtype", "config", "convention"}]}')
    sp.add_argument("--models", type=Path, default=Path("."),
                    help="folder the plan's relative checkpoint paths start from (default: the current folder)")
    common(sp)
    sp.set_defaults(func=cmd_prebuild)

    sp = sub.add_parser("list", help="list engines with ok/stale and the reason")
    common(sp)
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("delete", help="delete an engine")
    sp.add_argument("id")
    common(sp)
    sp.set_defaults(func=cmd_delete)

    sp = sub.add_parser("gc", help="remove what dead builds left behind (temp folders, orphan engine folders)")
    sp.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS",
                    help="only what nothing touched for this long (default 3600; live builds touch theirs)")
    common(sp)
    sp.set_defaults(func=cmd_gc)

    sp = sub.add_parser("check", help="compare an engine with the PyTorch UNet")
    sp.add_argument("id")
    sp.add_argument("--checkpoint", type=Path, required=True)
    ckpt(sp, positional=False)
    sp.add_argument("--shape", action="append", required=True, help="BxHxWxT; repeat")
    sp.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="merge a LoRA/LoCon file into both the engine (refit) and the PyTorch UNet; repeat")
    common(sp)
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("bench", help="benchmarks (numbers measured in one run)")
    sp.add_argument("what", choices=tuple(BENCHES),
                    help="latency: engine vs PyTorch per UNet call; refit: host-side cost of a LoRA; build: export "
                         "and TensorRT-RTX ahead-of-time build time and peak host memory (--model sd15 and sdxl)")
    sp.add_argument("--family", action="append", choices=("sd15", "sdxl"), default=None, help="refit: UNets")
    sp.add_argument("--rank", type=int, default=32, help="refit: LoRA rank")
    sp.add_argument("--model", action="append", default=None,
                    help="latency: tiny, small (CPU default), sd15, sd21, sdxl (GPU default); repeat")
    sp.add_argument("--batch", action="append", type=int, default=None, help="latency: images (default 1 and 4)")
    sp.add_argument("--backend", choices=("auto", *NAMES), default="auto")
    sp.add_argument("--repeats", type=int, default=10)
    sp.add_argument("--chart", type=Path, default=None, help="latency: write a PNG chart here")
    sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    sp.add_argument("--target", default=None, metavar="SM,...",
                    help="build: TensorRT-RTX ahead-of-time targets (default sm89; no GPU needed)")
    sp.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="build: graph precision")
    sp.add_argument("--work", type=Path, default=None,
                    help="build: folder for the multi-GB checkpoints and ONNX files (default: the temp folder)")
    sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("runbook", help="the GPU runbook: baselines, a TensorRT-RTX attempt, GPU tests, bench "
                                        "latency, in at most 8 minutes, as one JSON")
    sp.add_argument("--out", type=Path, default=Path("runbook-out"), help="folder for gpu-runbook.json")
    sp.add_argument("--wheels", type=Path, default=None,
                    help="folder of wheels to install first (no index needed); split ones as NAME.whl.part-aa, ...")
    sp.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny models (CI)")
    sp.add_argument("--total-seconds", type=float, default=None, help="time budget of the whole run (default 480)")
    sp.set_defaults(func=cmd_runbook)

    sp = sub.add_parser("demo", help="build an engine for an embedded tiny model and check it")
    sp.add_argument("checkpoint", type=Path, nargs="?", default=None)
    ckpt(sp, positional=False)
    sp.add_argument("--family", default="sd1", help="tiny model family when no checkpoint is given")
    sp.add_argument("--backend", choices=("auto", *NAMES), default="auto")
    sp.add_argument("--out", type=Path, default=None, help="keep the tiny model and engine here")
    common(sp)
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if hasattr(args, "cache"):
        args.cache_given = args.cache is not None
        args.cache = args.cache or default_cache()
    try:
        return int(args.func(args))
    except SdtrtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""ONNX Runtime backend: the engine is the exported ONNX itself; CPU everywhere, CUDA provider when present.

It follows the same contract as TensorRT (profiles are enforced by the caller, weights are refit by name) so CI
proves export, profiles and weight handling end to end without a GPU. Refit recreates the session from the model
with the named initializers replaced. (`SessionOptions.add_initializer` is not used: ONNX Runtime constant-folds
some original initializers, e.g. behind a Transpose, before applying such overrides, which silently mixes old
and new weights.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtrt.backends.base import (
    Backend,
    BackendInfo,
    BuildOptions,
    BuildResult,
    Capabilities,
    EngineProfile,
    EngineRunner,
    ProgressCallback,
    check_weight_names,
    no_progress,
)
from sdtrt.engine_types import RefitMode, WeightsMode
from sdtrt.errors import BuildError, RefitError, StaleEngine


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner(EngineRunner):
    #: A failed refit changes nothing: the new session is made completely before it replaces the old one.
    refit_is_atomic: ClassVar[bool] = True
    #: Above this, a refitted model goes through a temporary file with external data (protobuf stops at 2 GiB).
    IN_MEMORY_LIMIT = 1 << 30

    def __init__(self, onnx_path: Path):
        import onnx
        import onnxruntime as ort

        self._ort = ort
        self._path = onnx_path
        header = onnx.load(str(onnx_path), load_external_data=False)
        self._weights = {i.name: tuple(i.dims) for i in header.graph.initializer}
        table = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16}
        self._dtypes = {i.name: table.get(i.data_type, torch.float32) for i in header.graph.initializer}
        self._overrides: dict[str, Any] = {}  # name -> numpy array in the initializer's dtype
        self._session = self._make_session({})
        self._inputs = {i.name: i.type for i in self._session.get_inputs()}

    def _make_session(self, overrides: Mapping[str, Any]) -> Any:
        import tempfile

        import onnx
        from onnx import numpy_helper

        opts = self._ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            if not overrides:
                return self._checked(self._ort.InferenceSession(str(self._path), sess_options=opts,
                                                                providers=_providers()))
            model = onnx.load(str(self._path), load_external_data=True)
            for init in model.graph.initializer:
                if init.name in overrides:
                    init.CopyFrom(numpy_helper.from_array(overrides[init.name], init.name))
            if model.ByteSize() < self.IN_MEMORY_LIMIT:
                return self._checked(self._ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                                                providers=_providers()))
            with tempfile.TemporaryDirectory(prefix="sdtrt-refit-") as tmp:
                path = Path(tmp) / "unet.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location="unet.onnx.data")
                return self._checked(self._ort.InferenceSession(str(path), sess_options=opts,
                                                                providers=_providers()))
        except StaleEngine:
            raise
        except Exception as e:  # onnxruntime raises its own exception types
            raise StaleEngine(f"ONNX Runtime cannot load {self._path.name}: {e}") from e

    def _checked(self, session: Any) -> Any:
        if session is None:  # never seen from onnxruntime, but a runtime answering None must not crash later
            raise StaleEngine(f"ONNX Runtime returned no session for {self._path.name}; rebuild the engine")
        return session

    def infer(self, feeds: Mapping[str, torch.Tensor], profile_index: int) -> torch.Tensor:
        session = self._session
        if session is None:
            raise StaleEngine(f"engine {self._path.parent.name} was closed; load it again")
        arrays = {}
        for name, t in feeds.items():
            dtype = torch.float16 if self._inputs[name] == "tensor(float16)" else torch.float32
            arrays[name] = t.detach().to("cpu", dtype).contiguous().numpy()
        out = session.run(None, arrays)[0]
        return torch.from_numpy(out)

    def weight_names(self) -> set[str]:
        return set(self._weights)

    def refit(self, weights: Mapping[str, torch.Tensor],
              fill: Callable[[Sequence[str]], Mapping[str, torch.Tensor]] | None = None) -> None:
        check_weight_names(weights, set(self._weights))
        bad = [n for n, t in weights.items() if tuple(t.shape) != self._weights[n]]
        if bad:
            n = bad[0]
            raise RefitError(f"weight {n} has shape {tuple(weights[n].shape)}, the engine expects {self._weights[n]}")
        overrides = dict(self._overrides)
        for name, t in weights.items():
            overrides[name] = t.detach().to("cpu", self._dtypes[name]).contiguous().numpy()
        try:
            session = self._make_session(overrides)  # raises before anything changes
        except StaleEngine as e:
            raise RefitError(str(e)) from e
        self._session, self._overrides = session, overrides

    def close(self) -> None:
        self._session = None
        self._overrides = {}


class OrtBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    #: The CUDA provider where onnxruntime has it and torch sees a GPU, else the CPU. No weight stripping: the engine
    #: is the ONNX file with its weights.
    capabilities: ClassVar[Capabilities] = Capabilities(
        devices=("cpu", "cuda"), refit=True, atomic_refit=OrtRunner.refit_is_atomic
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "the onnxruntime package is not installed (pip install onnxruntime)"
        return None

    def info(self) -> BackendInfo:
        import onnxruntime as ort

        providers = _providers()
        if providers[0] == "CUDAExecutionProvider":
            major, minor = torch.cuda.get_device_capability()
            return BackendInfo(self.name, ort.__version__, f"{torch.cuda.get_device_name()} (sm{major}{minor})",
                               f"{major}.{minor}")
        return BackendInfo(self.name, ort.__version__, "cpu", None)

    def build(self, onnx_path: Path, profiles: Sequence[EngineProfile], out_dir: Path, options: BuildOptions,
              progress: ProgressCallback = no_progress) -> BuildResult:
        from sdtrt.fsutil import copy_onnx

        progress("build", 0.0)
        files = copy_onnx(onnx_path, out_dir)
        try:
            OrtRunner(Path(out_dir) / files[0]).close()  # the engine must load here, before it is published
        except StaleEngine as e:
            raise BuildError(str(e)) from e
        progress("build", 1.0)
        return BuildResult(files=files, weights=WeightsMode.EMBEDDED,
                           refit_mode=RefitMode.REFIT if options.refit else RefitMode.NONE)

    def load(self, engine_dir: Path, files: Sequence[str], profiles: Sequence[EngineProfile], *,
             digests: Mapping[str, str] | None = None) -> EngineRunner:
        # digests: ONNX Runtime reads the files itself (a graph, not executable code); Registry.verify checked them
        onnx_name = next((f for f in files if f.endswith(".onnx")), None)
        if onnx_name is None:
            raise StaleEngine(f"engine folder {engine_dir} has no .onnx file")
        return OrtRunner(Path(engine_dir) / onnx_name)

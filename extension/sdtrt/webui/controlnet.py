"""ControlNet generations on an engine with ControlNet inputs (`sdtrt.models.control`).

sd-webui-controlnet (Mikubill, 1.1.x) hooks the UNet by setting its instance `forward` to a `forward_webui` function
bound to the UNet. That function runs the control models, scales and sums their residuals (weights, control modes,
guidance window, masks, pooling, cond/uncond layout, several units), then runs the UNet's blocks itself, adding the
residuals to the skips, and post-processes the output (colorfix, inpaint_only). We keep all of that, and replace
only the blocks: `forward_webui`'s function is called with a stand-in for the UNet (`_Recorder`) whose blocks
compute nothing. They return zero tensors of the real blocks' shapes (stride-0 views, no memory), so what reaches
each of them is exactly what the hook added: the sample and context the UNet would see (after an inpaint or
ReVision change), each skip's residual (arriving through the decoder's concatenation), the hidden-state additions
of T2I-Adapters. The stand-in's `out` then runs the engine on those inputs and returns its output, which the hook
post-processes as usual. The control models themselves run on PyTorch (an engine for them would slot in here).

Depends on sd-webui-controlnet only through what it exposes, found by feature detection: a `forward_webui`
function whose closure holds the hook (`outer`) with its `control_params`, each with a `control_model_type` enum
and a `preprocessor` dict. Unit types that change the UNet's inside (reference-only/adain, IP-Adapter,
ControlLLLite, SparseCtrl, style align) or that we do not know, modules of the UNet patched by anyone, or a hook
that adds something where the engine has no input: that pass runs on PyTorch (through the hook, as without us),
with the reason told to the user.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdtrt.errors import NoMatchingProfile
from sdtrt.models import ControlFeeds, ControlledUNet, split_unet_call, unet_host_call
from sdtrt.serving.server import SWITCHED_OFF, UnetServer

log = logging.getLogger("sdtrt")

#: sd-webui-controlnet unit types (ControlModelType member names) whose effect is residuals, adapter features,
#: extra context tokens, a changed `y`/sample or post-processing of the output: the engine serves them.
SERVED_TYPES = frozenset({"ControlNet", "ControlLoRA", "ControlNetUnion", "T2I_Adapter", "T2I_StyleAdapter",
                          "ReVision"})
NO_CONTROL_ENGINE = ("a ControlNet unit is active and the engine has no ControlNet inputs; build one with "
                     "'ControlNet inputs' in the TensorRT tab (or --controlnet) to run ControlNet on the engine")


class RunOnPyTorch(Exception):
    """This call goes to PyTorch through the hook (the reason has been counted and told)."""


@dataclass(frozen=True)
class Hook:
    """sd-webui-controlnet's live hook on a UNet: its `forward_webui` function, the bound method set on the UNet,
    and the UnetHook object (`outer`) holding the units of this generation."""

    func: Callable[..., Any]
    bound: Any
    outer: Any

    def params(self) -> list[Any]:
        return list(getattr(self.outer, "control_params", None) or [])


def _closure(func: Any) -> dict[str, Any]:
    code = getattr(func, "__code__", None)
    cells = getattr(func, "__closure__", None) or ()
    out = {}
    for name, cell in zip(getattr(code, "co_freevars", ()), cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return out


def installed_wrapper(unet: torch.nn.Module) -> Any:
    """Our own forward on `unet` (see `install`), or None."""
    inst = vars(unet).get("forward")
    return inst if getattr(inst, "sdtrt_wraps", None) is not None else None


def recognise(unet: torch.nn.Module) -> Hook | None:
    """sd-webui-controlnet's live hook on `unet` (looking through our own wrapper), or None."""
    inst = vars(unet).get("forward")
    inst = getattr(inst, "sdtrt_wraps", inst)
    func = getattr(inst, "__func__", None)
    if func is None or getattr(inst, "__self__", None) is not unet or func is getattr(type(unet), "forward", None):
        return None
    if getattr(func, "__name__", "") != "forward_webui":
        return None
    outer = _closure(func).get("outer")
    if outer is None or not hasattr(outer, "control_params"):
        return None
    return Hook(func, inst, outer)


def unsupported(hook: Hook) -> str | None:
    """Why this hook's units must run on PyTorch, or None when the engine can serve every one of them."""
    for p in hook.params():
        kind = getattr(getattr(p, "control_model_type", None), "name", None)
        pre = getattr(p, "preprocessor", None)
        pre_name = str(pre.get("name", "")) if isinstance(pre, dict) else ""
        if kind is None:
            return ("this version of sd-webui-controlnet is not one sd-webui-trt knows (its units carry no "
                    "control_model_type); ControlNet runs on PyTorch")
        if kind not in SERVED_TYPES:
            return f"ControlNet unit type {kind} changes the UNet's inside, which the engine cannot; it runs on PyTorch"
        if pre_name.startswith("reference"):
            return (f"ControlNet {pre_name} changes the UNet's attention, which the engine cannot; it runs on "
                    "PyTorch")
    return None


#: What a unit's preprocessor or model name says about its type, for a prediction before the units are loaded
#: (`request_problem`): these change the UNet's inside, as `unsupported` finds once they run.
_UNSERVED_NAMES = ("reference", "ip-adapter", "ip_adapter", "ipadapter", "instant_id", "instantid", "lllite",
                   "sparsectrl", "revision_ignore")


def request_problem(units: Sequence[Mapping[str, Any]], takes_control: bool) -> str | None:
    """Why an API request's enabled ControlNet units (`alwayson_scripts.controlnet.args`) will run on PyTorch,
    judged from their preprocessor and model names (the prediction's counterpart of `unsupported`)."""
    for unit in units:
        names = f"{unit.get('module') or ''} {unit.get('model') or ''}".lower()
        hit = next((n for n in _UNSERVED_NAMES if n in names), None)
        if hit is not None:
            return (f"ControlNet unit {unit.get('module') or unit.get('model')} changes the UNet's inside, which the "
                    "engine cannot; it runs on PyTorch")
    if units and not takes_control:
        return NO_CONTROL_ENGINE
    return None


def _restored(inst: Any, module: torch.nn.Module, attr: str) -> bool:
    return (getattr(inst, "__self__", None) is module
            and getattr(inst, "__func__", None) is getattr(type(module), attr, None))


def patched_module(unet: torch.nn.Module) -> str | None:
    """A submodule of `unet` whose `forward` (or a transformer block's `_forward`) was replaced on the instance and
    not restored: IP-Adapter, ControlLLLite, reference-only and style align do this."""
    for name, module in unet.named_modules():
        if module is unet:
            continue
        own = vars(module)
        for attr in ("forward", "_forward"):
            inst = own.get(attr)
            if inst is not None and not _restored(inst, module, attr):
                return (f"another extension replaced the UNet's {name}.{attr} (e.g. IP-Adapter, ControlLLLite, "
                        "reference-only); the engine cannot reproduce it, so this pass runs on PyTorch")
    return None


def install(unet: torch.nn.Module, hook: Hook, call: Callable[..., torch.Tensor]) -> None:
    """Put our forward in front of the hook's for this pass. sd-webui-controlnet's restore sets its saved forward
    back over it; `uninstall` does so too (and only if ours is still there)."""
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return call(hook, args, kwargs)

    forward.sdtrt_wraps = hook.bound  # type: ignore[attr-defined]
    unet.forward = forward  # type: ignore[method-assign]


def uninstall(unet: torch.nn.Module) -> None:
    ours = installed_wrapper(unet)
    if ours is not None:
        unet.forward = ours.sdtrt_wraps  # type: ignore[method-assign]


class Unexpected(Exception):
    """The hook did something this module does not know how to hand to the engine."""


class _Recorder:
    """Stands in for the UNet inside the hook's forward: blocks that record what reaches them and return zeros of
    the real blocks' shapes; `out` runs the engine. Attributes it lacks are read from the real UNet; attributes the
    hook sets (its bookkeeping) stay on the stand-in."""

    def __init__(self, unet: torch.nn.Module, skips: tuple[tuple[int, int], ...], adapters: tuple[int, ...],
                 x: torch.Tensor, engine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, ControlFeeds],
                                                   torch.Tensor], timesteps: torch.Tensor):
        from sdtrt.models.control import level_hw

        d = self.__dict__
        d["_unet"], d["_engine"], d["_timesteps"] = unet, engine, timesteps
        n, _, h, w = x.shape
        d["_n_in"] = len(skips) - 1
        d["_adapters"] = adapters
        d["_shapes"] = [(n, c, *level_hw(h, w, level)) for c, level in skips]
        d["_outs"] = [None] * len(skips)
        d["_skip"] = [None] * len(skips)
        d["_added"] = {}
        d["_x"] = d["_context"] = d["_y"] = None
        d["_hw"] = (h, w)
        d["model_channels"] = getattr(unet, "model_channels", None)
        # plain callables, not modules: the hook only calls and iterates them, and this runs on every step
        d["time_embed"] = lambda t_emb: t_emb
        d["label_emb"] = self._label
        d["input_blocks"] = [self._input(i) for i in range(d["_n_in"])]
        d["middle_block"] = self._middle
        d["output_blocks"] = [self._output(j) for j in range(d["_n_in"])]
        d["out"] = self._out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_unet"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[name] = value

    def _zeros(self, index: int, like: torch.Tensor) -> torch.Tensor:
        z = torch.zeros((), dtype=like.dtype, device=like.device).expand(self._shapes[index])
        self._outs[index] = z
        return z

    def _label(self, y: torch.Tensor) -> torch.Tensor:
        self.__dict__["_y"] = y
        return torch.zeros((), dtype=y.dtype, device=y.device)

    def _arrived(self, index: int, h: torch.Tensor) -> None:
        """`h` reached the block after input block `index`: anything but that block's zeros was added to it."""
        if h is not self._outs[index]:
            self._added[index] = h

    def _input(self, i: int) -> Callable[..., torch.Tensor]:
        def block(h: torch.Tensor, emb: Any, context: torch.Tensor, *rest: Any) -> torch.Tensor:
            if i == 0:
                self.__dict__["_x"], self.__dict__["_context"] = h, context
            else:
                self._arrived(i - 1, h)
            return self._zeros(i, h)
        return block

    def _middle(self, h: torch.Tensor, emb: Any, context: torch.Tensor, *rest: Any) -> torch.Tensor:
        self._arrived(self._n_in - 1, h)
        return self._zeros(self._n_in, h)

    def _output(self, j: int) -> Callable[..., torch.Tensor]:
        def block(hcat: torch.Tensor, emb: Any, context: torch.Tensor, *rest: Any) -> torch.Tensor:
            skip_index = self._n_in - 1 - j
            c = self._shapes[skip_index][1]
            if j == 0:  # the middle block's output with what was added after it, then the deepest skip
                self._skip[self._n_in] = hcat[:, : hcat.shape[1] - c]
            elif hcat.shape[1] != c:
                raise Unexpected(f"output block {j} received {hcat.shape[1]} channels, not the skip's {c}")
            self._skip[skip_index] = hcat[:, hcat.shape[1] - c:]
            # the next concatenation's first part: no channels, the next skip's size (the last: the sample's)
            nxt = self._shapes[skip_index - 1] if skip_index > 0 else (hcat.shape[0], 0, *self._hw)
            return hcat.new_zeros((nxt[0], 0, nxt[2], nxt[3]))
        return block

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        unknown = sorted(set(self._added) - set(self._adapters))
        if unknown:
            raise Unexpected(f"the hook added features after input block(s) {unknown}, where the engine has no input")
        if self._x is None or any(s is None for s in self._skip):
            raise Unexpected("the hook did not run every UNet block")
        feeds = ControlFeeds([s.contiguous() for s in self._skip],
                             [self._added.get(i) for i in self._adapters])
        return self._engine(self._x, self._timesteps, self._context, self._y, feeds)


def serve(hook: Hook, args: tuple[Any, ...], kwargs: dict[str, Any], unet: torch.nn.Module,
          skips: tuple[tuple[int, int], ...], adapters: tuple[int, ...], x: torch.Tensor, timesteps: Any,
          engine: Callable[[torch.Tensor, Any, torch.Tensor, torch.Tensor | None, ControlFeeds], torch.Tensor]
          ) -> torch.Tensor:
    """One UNet call `forward(*args, **kwargs)` (whose sample is `x`) through the hook with the blocks on the engine.
    `engine(sample, timesteps, context, y, feeds)` runs the engine (or raises RunOnPyTorch); Unexpected when the
    hook did something the engine has no input for."""
    out_dtype = x.dtype

    def run(sample: torch.Tensor, t: Any, context: torch.Tensor, y: torch.Tensor | None,
            feeds: ControlFeeds) -> torch.Tensor:
        return engine(sample, t, context, y, feeds).to(out_dtype)

    recorder = _Recorder(unet, skips, adapters, x, run, timesteps)
    return hook.func(recorder, *args, **kwargs)


def serve_call(server: UnetServer | None, unet: torch.nn.Module | None, hook: Hook, args: tuple[Any, ...],
           kwargs: dict[str, Any], to_device: Callable[[torch.nn.Module], None], notify: Callable[[str], None]
           ) -> torch.Tensor:
    """One UNet call of a ControlNet pass: the hook's code, the blocks on `server`'s engine with ControlNet inputs.
    Whatever the engine cannot take runs through the hook on the PyTorch UNet (`to_device` puts it back on the
    device), told (`notify`) and counted."""
    slot = None if server is None else next((s for s in server.slots if s.broken is None
                                             and isinstance(s.contract, ControlledUNet)), None)
    if server is None or unet is None:
        return hook.bound(*args, **kwargs)

    def through_hook(*_: Any, **__: Any) -> torch.Tensor:
        to_device(unet)
        return hook.bound(*args, **kwargs)

    reason = server.unusable or server.problem or server.bypass or (
        None if slot is not None else NO_CONTROL_ENGINE)
    if not server.enabled() or reason is not None or slot is None:
        return server.to_pytorch(reason or SWITCHED_OFF, args, kwargs, user=server.enabled(),
                                 fallback=through_hook)
    contract = slot.contract
    assert isinstance(contract, ControlledUNet)  # the slot was chosen for it

    def pytorch(*_: Any, **__: Any) -> torch.Tensor:
        raise RunOnPyTorch()

    def engine(sample: torch.Tensor, t: Any, context: torch.Tensor, y: torch.Tensor | None,
               feeds: ControlFeeds) -> torch.Tensor:
        return server.serve(*unet_host_call(sample, t, context, y), pytorch, control=feeds)

    x, timesteps, _, _ = split_unet_call(args, kwargs)
    try:
        return serve(hook, args, kwargs, unet, contract.io.skips, contract.adapters, x, timesteps, engine)
    except RunOnPyTorch:
        pass
    except NoMatchingProfile:
        raise  # the fallback policy is "error": the user asked for a failed generation over a slow one
    except Unexpected as e:
        reason = f"sd-webui-controlnet did something the engine has no input for ({e}); this call ran on PyTorch"
        server.counters.fallback(reason)
        notify(reason)
    except Exception as e:  # noqa: BLE001 - e.g. a unit that needs the PyTorch UNet on the device
        log.exception("sdtrt: a ControlNet call failed with the engine serving it")
        reason = (f"a ControlNet call failed with the engine serving it ({type(e).__name__}: {e}); it ran on "
                  "PyTorch")
        server.counters.fallback(reason)
        server.counters.error(reason)
        notify(reason)
    to_device(unet)
    return hook.bound(*args, **kwargs)

"""Fake `backend/patcher/controlnet.py`: Forge's ControlNet units as the sampling sees them.

- `ControlBase`: the linked list of units (`previous_controlnet`), `set_cond_hint(hint, strength, (start, end))`,
  `pre_run` turning the percent range into a sigma range (a unit answers its predecessors' control alone outside
  it), `get_models`, `cleanup`, and `control_merge` as Forge builds the dict the UNet consumes: adapter features
  (`control_input`) go to 'input' in reversed order (`insert(0, ...)`), ControlNet outputs to 'output' in order
  with the last one to 'middle', each times the unit's strength; the previous units' lists are summed in entry by
  entry (a None entry takes the other's).
- `ControlNet`: its control model runs at every call on the c_in-scaled latent, the hint, the 0..999 timestep and
  the text context, giving one residual per skip connection of the UNet plus the middle one.
- `T2IAdapter`: features computed once per hint size, in Forge's SD1 layout: None, None, feature per level (so a
  feature after input blocks 2, 5, 8, 11).
- `apply_controlnet_advanced(unet, controlnet, image_bchw, strength, start_percent, end_percent)`: a clone of the
  UNet patcher with a copy of the unit added (`add_patched_controlnet`).
The control models are small deterministic functions (fake-only); advanced weightings are not modelled."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _level_hw(h, w, level):  # type: ignore[no-untyped-def]
    f = 2 ** level
    return -(-h // f), -(-w // f)


def _pattern(seed, c, h, w):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(c, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return 0.2 * torch.sin(3 * xx + 2 * yy + seed % 7)[None, None] * proj[None, :, None, None]


class ControlBase:
    def __init__(self, device=None):  # type: ignore[no-untyped-def]
        self.cond_hint_original = None
        self.strength = 1.0
        self.timestep_percent_range = (0.0, 1.0)
        self.timestep_range = None
        self.transformer_options: dict = {}
        self.previous_controlnet = None

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0)):  # type: ignore[no-untyped-def]
        self.cond_hint_original = cond_hint
        self.strength = strength
        self.timestep_percent_range = timestep_percent_range
        return self

    def pre_run(self, model, percent_to_timestep_function):  # type: ignore[no-untyped-def]
        self.timestep_range = (percent_to_timestep_function(self.timestep_percent_range[0]),
                               percent_to_timestep_function(self.timestep_percent_range[1]))
        self.layout = model.diffusion_model.spec.skip_layout()  # fake-only: the shapes to produce
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_timestep_function)

    def set_previous_controlnet(self, controlnet):  # type: ignore[no-untyped-def]
        self.previous_controlnet = controlnet
        return self

    def cleanup(self):  # type: ignore[no-untyped-def]
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()
        self.timestep_range = None

    def get_models(self):  # type: ignore[no-untyped-def]
        return self.previous_controlnet.get_models() if self.previous_controlnet is not None else []

    def copy_to(self, c):  # type: ignore[no-untyped-def]
        c.cond_hint_original = self.cond_hint_original
        c.strength = self.strength
        c.timestep_percent_range = self.timestep_percent_range

    def _previous(self, x_noisy, t, cond, batched_number):  # type: ignore[no-untyped-def]
        """(the previous units' control, whether this unit acts at sigma t)."""
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return prev, False
        return prev, True

    def control_merge(self, control_input, control_output, control_prev, output_dtype):  # type: ignore[no-untyped-def]
        out: dict = {"input": [], "middle": [], "output": []}
        for x in control_input or []:
            out["input"].insert(0, None if x is None else (x * self.strength).to(output_dtype))
        for i, x in enumerate(control_output or []):
            key = "middle" if i == len(control_output) - 1 else "output"
            out[key].append(None if x is None else (x * self.strength).to(output_dtype))
        if control_prev is not None:
            for key in ("input", "middle", "output"):
                mine = out[key]
                for i, prev in enumerate(control_prev[key]):
                    if i >= len(mine):
                        mine.append(prev)
                    elif prev is not None:
                        mine[i] = prev if mine[i] is None else mine[i] + prev
        return out


class FakeControlModel(torch.nn.Module):
    """One residual per skip (and the middle): a fixed pattern per skip modulated by the pooled latent, the
    timestep and the context, so every call's residuals differ."""

    def __init__(self, seed):  # type: ignore[no-untyped-def]
        super().__init__()
        self.seed = seed

    def forward(self, x, hint, timesteps, context, layout):  # type: ignore[no-untyped-def]
        h, w = x.shape[2:]
        level_of_x = x.mean(dim=1, keepdim=True)
        out = []
        for i, (c, level) in enumerate(layout):
            lh, lw = _level_hw(h, w, level)
            base = _pattern(self.seed * 100 + i, c, lh, lw).to(x)
            mod = F.adaptive_avg_pool2d(level_of_x, (lh, lw)) + (timesteps / 1000.0).to(x)[:, None, None, None]
            out.append(base * (1.0 + 0.3 * torch.tanh(mod)) * (1.0 + 0.1 * context.mean()).to(x)
                       * float(hint.mean()))
        return out


class ControlNet(ControlBase):
    def __init__(self, control_model, global_average_pooling=False, device=None, load_device=None,  # type: ignore[no-untyped-def]
                 manual_cast_dtype=None):
        super().__init__(device)
        self.control_model = control_model

    def get_control(self, x_noisy, t, cond, batched_number):  # type: ignore[no-untyped-def]
        prev, active = self._previous(x_noisy, t, cond, batched_number)
        if not active:
            return prev
        predictor = self.model_sampling_current
        control = self.control_model(predictor.calculate_input(t, x_noisy), self.cond_hint_original,
                                     predictor.timestep(t).float(), cond["c_crossattn"], self.layout)
        return self.control_merge(None, control, prev, x_noisy.dtype)

    def copy(self):  # type: ignore[no-untyped-def]
        c = ControlNet(self.control_model)
        self.copy_to(c)
        return c

    def pre_run(self, model, percent_to_timestep_function):  # type: ignore[no-untyped-def]
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.predictor

    def cleanup(self):  # type: ignore[no-untyped-def]
        self.model_sampling_current = None
        super().cleanup()


class T2IAdapter(ControlBase):
    def __init__(self, seed, device=None):  # type: ignore[no-untyped-def]
        super().__init__(device)
        self.seed = seed
        self.control_input = None
        self.size = None

    def get_control(self, x_noisy, t, cond, batched_number):  # type: ignore[no-untyped-def]
        prev, active = self._previous(x_noisy, t, cond, batched_number)
        if not active:
            return prev
        h, w = x_noisy.shape[2:]
        if self.control_input is None or self.size != (h, w):
            self.size = (h, w)
            features: list = []
            for i, (c, level) in enumerate(self.layout[:-1]):
                at_point = i % 3 == 2  # SD1 adapters: None, None, feature per level
                features.append(_pattern(self.seed * 100 + i, c, *_level_hw(h, w, level)) * float(
                    self.cond_hint_original.mean()) if at_point else None)
            self.control_input = features
        batch = x_noisy.shape[0]
        control_input = [None if a is None else a.to(x_noisy).expand(batch, -1, -1, -1).clone()
                         for a in self.control_input]
        return self.control_merge(control_input, None, prev, x_noisy.dtype)

    def copy(self):  # type: ignore[no-untyped-def]
        c = T2IAdapter(self.seed)
        self.copy_to(c)
        return c


def apply_controlnet_advanced(unet, controlnet, image_bchw, strength, start_percent, end_percent,  # type: ignore[no-untyped-def]
                              **advanced):
    cnet = controlnet.copy().set_cond_hint(image_bchw, strength, (start_percent, end_percent))
    m = unet.clone()
    m.add_patched_controlnet(cnet)
    return m

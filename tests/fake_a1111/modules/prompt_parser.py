"""Only `SdConditioning` (a list of prompts carrying width/height/is_negative_prompt). Prompt scheduling
(`[a:b:0.5]`), `AND` and emphasis are not reproduced: a batch's cond is one (B, 77k, C) tensor (or SDXL dict)."""

from __future__ import annotations


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):  # type: ignore[no-untyped-def]
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)

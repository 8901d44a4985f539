"""Forge's `modules/sd_hijack.py` (dfdcbab): only a `StableDiffusionModelHijack` whose methods do nothing, except
`get_prompt_lengths(text, cond_stage_model)` (two arguments) which forwards to
`shared.sd_model.get_prompt_lengths_on_ui(text)`. No UNet forward is hijacked, and there is no `list_optimizers`,
`apply_optimizations`, `optimizers` or `current_optimizer` at module level (all commented out in Forge)."""

from __future__ import annotations


class StableDiffusionModelHijack:
    def apply_optimizations(self, option=None):  # type: ignore[no-untyped-def]
        pass

    def convert_sdxl_to_ssd(self, m):  # type: ignore[no-untyped-def]
        pass

    def hijack(self, m):  # type: ignore[no-untyped-def]
        pass

    def undo_hijack(self, m):  # type: ignore[no-untyped-def]
        pass

    def apply_circular(self, enable):  # type: ignore[no-untyped-def]
        pass

    def clear_comments(self):  # type: ignore[no-untyped-def]
        pass

    def get_prompt_lengths(self, text, cond_stage_model):  # type: ignore[no-untyped-def]
        from modules import shared

        return shared.sd_model.get_prompt_lengths_on_ui(text)

    def redo_hijack(self, m):  # type: ignore[no-untyped-def]
        pass


model_hijack = StableDiffusionModelHijack()

"""Forge's built-in onchange handlers: none that loads a model (a checkpoint change goes through
`modules_forge.main_entry.checkpoint_change`, which refreshes the loading parameters; the model loads at the next
generation)."""

from __future__ import annotations


def configure_opts_onchange():  # type: ignore[no-untyped-def]
    pass

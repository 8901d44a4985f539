"""Fake `modules_forge` (Forge's own WebUI-side package). Its presence is how Forge is told from A1111."""

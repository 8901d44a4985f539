"""Neo's vendored third-party packages (`modules_forge/packages/`, Forge had `packages_3rdparty/`): only the part of
`comfy` that Neo's LoRA code uses is faked."""

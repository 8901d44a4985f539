"""Neo's `backend/nn/unet.py`: the fake Forge's IntegratedUNet2DConditionModel (LDM keys, Forge's forward, Upsample
to the skip's size; N :46-54, :317-343, :657-724 identical to Forge's), run here through fake_neo_overlay.extend,
plus what the fake Forge leaves out: "block_inner_modifiers" from `transformer_options`, which Neo's
`TimestepEmbedSequential.forward` (N :76-93) calls around EVERY layer of every block:
`x = modifier(x, "before" | "after", layer, layer_index, block, transformer_options)`."""

import fake_neo_overlay as _overlay

_overlay.extend(globals(), "backend/nn/unet.py")

_forge_run = _run  # type: ignore[name-defined]  # noqa: F821
_forge_forward = IntegratedUNet2DConditionModel.forward  # type: ignore[name-defined]  # noqa: F821
_options_stack: list = []


def _run(block, h, emb, context, output_shape=None):  # type: ignore[no-untyped-def]
    options = _options_stack[-1] if _options_stack else {}
    modifiers = options.get("block_inner_modifiers", [])
    if not modifiers:
        return _forge_run(block, h, emb, context, output_shape)
    for index, layer in enumerate(block):
        for modifier in modifiers:
            h = modifier(h, "before", layer, index, block, options)
        h = _forge_run([layer], h, emb, context, output_shape)
        for modifier in modifiers:
            h = modifier(h, "after", layer, index, block, options)
    return h


def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # type: ignore[no-untyped-def]  # noqa: B006
    _options_stack.append(transformer_options)
    try:
        return _forge_forward(self, x, timesteps, context, y, control, transformer_options, **kwargs)
    finally:
        _options_stack.pop()


IntegratedUNet2DConditionModel.forward = _forward  # type: ignore[name-defined]  # noqa: F821

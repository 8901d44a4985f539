"""Neo's built-in ControlNet (`extensions-builtin/sd_forge_controlnet`): as the fake Forge's stand-in (N
`patcher/controlnet.py:235-284` control_merge and `t2i_adapter.py:129-150` are identical to Forge's; the script puts
each unit on a clone of the pass's UNet patcher in `process_before_every_sampling`): the fake Forge's file, run here."""

import fake_neo_overlay as _overlay

_overlay.extend(globals(), "extensions-builtin/sd_forge_controlnet/scripts/controlnet.py")

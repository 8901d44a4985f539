"""Neo's `modules/api/api.py`: the fake A1111's routes (run through fake_neo_overlay.extend), whose import of
`sd_models_config` Neo's file does not have: the checkpoint list's "config" is None (Neo finds no yaml beside a
checkpoint)."""

import fake_neo_overlay as _overlay

with _overlay.borrowing():
    _overlay.extend(globals(), "modules/api/api.py", root=_overlay.FAKE_A1111)

"""Fake Forge `backend` package (see tests/fake_forge/README.md): patchers, memory management, KModel, sampling and the
UNet module, with Forge's names, call order and semantics. CPU only."""

"""Host adapters: the only code that knows a WebUI host's own modules (A1111 now; Forge next)."""

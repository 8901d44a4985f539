"""WebUI side of sdtrt, host-agnostic: per-call serving with PyTorch fallback (serving), build jobs (jobs), the
engine service the A1111 glue drives (service), the REST API (api) and the TensorRT tab (tab). A1111 itself is
reached only through the small `Host` interface (host), which scripts/ implements; nothing here imports A1111."""

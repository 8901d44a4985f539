"""WebUI side of sdtrt, host-agnostic: the engine service a host's glue drives (service: a facade over state,
options, activation, generation, builds, status), build jobs (jobs), what a generation will run on (coverage,
prediction), sd-webui-controlnet's hook with the UNet's blocks on the engine (controlnet), the REST API (api) and
the TensorRT tab (tab). A host is reached only through the `Host` interface (host), which sdtrt.hosts implements;
nothing here imports a host's modules."""

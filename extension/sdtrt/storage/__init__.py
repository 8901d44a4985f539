"""The engine cache on disk, which many WebUI replicas share: engine keys and ids (key), what a published engine
vouches for (manifest), where everything lives (layout), checking one folder (inspection), building and publishing
by one rename (publish), build leases (lease), garbage collection (cleanup); `Registry` is the facade the rest of
sd-webui-trt uses. Never imports a backend."""

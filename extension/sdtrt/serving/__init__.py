"""Serving UNet calls: what is known of an engine before loading it (spec), a loaded engine (session), an engine a
server may use (slot), one routing decision per call (route), the server behind an SD Unet with its policy (server),
counters, the engine catalog (catalog) and the UNet calls of a generation as A1111 makes them (passes). Host-agnostic."""

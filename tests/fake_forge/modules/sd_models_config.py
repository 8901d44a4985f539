"""Forge's `modules/sd_models_config.py` is entirely commented out (dfdcbab): the architecture comes from the weights
(backend/loader.py), there is no config yaml lookup, and nothing is importable from this module."""

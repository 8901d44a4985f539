"""Tests against a real AUTOMATIC1111 WebUI (skipped unless SDTRT_A1111_DIR is set); see conftest.py."""

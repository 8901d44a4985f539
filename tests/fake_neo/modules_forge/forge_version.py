"""N `modules_forge/forge_version.py:1-2`."""

version = "neo"
release = "2.26"

"""Fake AUTOMATIC1111 v1.10.1 `modules` package for CPU tests (see tests/fake_a1111/README.md)."""

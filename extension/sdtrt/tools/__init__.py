"""The command line (`python -m sdtrt`): cli, check (engine vs PyTorch), benchmarks (bench, bench_refit,
bench_build), the GPU runbook, and the tiny random-weight models of the demo and the tests (tiny)."""

"""Throughput benchmarks (not tests): `python -m benchmarks.run`, see BENCHMARKS.md."""

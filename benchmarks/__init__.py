"""Benchmark scripts; ``python -m benchmarks.run`` gathers every performance figure in one run."""

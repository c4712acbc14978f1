"""The scripts behind the figures in docs/; run each from the repository root as ``python -m benchmarks.NAME``."""

"""Helpers of benchmarks/scale.py: model shapes, the random-weight writer, the measured runner, the report."""

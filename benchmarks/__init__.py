"""Benchmarks: scripts that print their figures (not timed tests)."""

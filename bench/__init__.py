"""Benchmarks: each script prints one JSON line of results (see the README's Benchmarks)."""

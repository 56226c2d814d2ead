"""Benchmarks run by ``mlxcluster bench ...`` (never timed asserts in tests)."""

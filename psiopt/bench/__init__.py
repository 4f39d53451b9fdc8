"""Benchmark helpers for psiopt: a small model zoo and the benchmark suite."""

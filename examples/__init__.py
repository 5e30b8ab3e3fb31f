"""Runnable examples used by the README, the tests and the benchmarks."""

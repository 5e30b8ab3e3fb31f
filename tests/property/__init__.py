"""Property-based tests: hypothesis proves the invariants."""

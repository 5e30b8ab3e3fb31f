"""The ledgerflow test suites."""

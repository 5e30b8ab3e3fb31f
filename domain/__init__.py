"""The pure domain of ledgerflow: aggregates, events, value objects and errors (no I/O)."""

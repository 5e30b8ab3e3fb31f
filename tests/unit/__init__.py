"""Unit tests: given commands, when a command, then these new events (or this error)."""

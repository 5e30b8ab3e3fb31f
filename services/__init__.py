"""Application services: command handlers over the event store (process managers come later)."""

"""The embedded event store: eventsourcing's SQLite recorder with the command log."""

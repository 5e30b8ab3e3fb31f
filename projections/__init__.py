"""Read-model projections: event -> row decisions and view interfaces (no driver code)."""

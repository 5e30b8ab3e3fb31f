"""The read-model HTTP API (FastAPI): queries, run history, commands, health and metrics."""

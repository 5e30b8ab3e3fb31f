"""Adapters and wiring: settings, the composition root, PostgreSQL (and later NATS, HTTP)."""

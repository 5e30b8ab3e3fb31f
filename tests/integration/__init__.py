"""Integration tests: real PostgreSQL and nats-server, never mocks."""

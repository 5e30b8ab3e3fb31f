"""PostgreSQL adapters: connection settings and schema management."""

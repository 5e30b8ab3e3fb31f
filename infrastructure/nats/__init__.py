"""NATS adapters: subject and stream names, the command service, the relay."""

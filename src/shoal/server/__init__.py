"""The daemon: HTTP API over the engine."""

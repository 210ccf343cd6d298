"""The daemon's persistent state: one SQLite database below the engine and every service."""

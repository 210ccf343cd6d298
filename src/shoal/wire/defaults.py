"""Where a daemon keeps its files by default: the SDK reads them to find it, the daemon to listen."""

DEFAULT_DATA_DIR = "/var/lib/shoal"
DEFAULT_RUNTIME_DIR = "/run/shoal"
SOCKET_NAME = "shoald.sock"
"""The API's Unix socket, inside the runtime directory."""

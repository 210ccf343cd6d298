"""The shoal command line."""

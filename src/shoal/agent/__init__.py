"""The in-sandbox agent (C source) and the daemon side of its protocol."""

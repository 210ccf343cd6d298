"""The client SDK: Modal's object model over the daemon's API."""

"""Volumes: persistent directories shared between sandboxes, and the host-side file API over them."""

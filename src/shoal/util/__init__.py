"""Small helpers with no knowledge of sandboxes."""

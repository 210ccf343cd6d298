"""Named secrets, sealed at rest, reaching sandboxes only as environment variables."""

"""The engine: sandboxes, processes and their output, state."""

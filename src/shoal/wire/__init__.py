"""What the SDK and the daemon share and both must read the same way: pure code, no I/O."""

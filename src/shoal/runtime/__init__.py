"""Drives OCI runtimes: bundles, specs, root filesystems."""

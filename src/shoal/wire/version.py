"""The version of shoal: the SDK and the daemon report the same one."""

__version__ = "0.1.0"

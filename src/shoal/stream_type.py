"""Modal's ``modal.stream_type``, as code written for Modal imports it: ``StreamType``."""

from shoal.sdk.streams import StreamType

__all__ = ["StreamType"]

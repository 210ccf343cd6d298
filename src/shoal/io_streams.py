"""Modal's ``modal.io_streams``, as code written for Modal imports it: ``StreamReader, StreamWriter``."""

from shoal.sdk.streams import StreamReader, StreamWriter

__all__ = ["StreamReader", "StreamWriter"]

"""Modal's ``modal.file_io``, as code written for Modal imports it: ``FileIO``."""

from shoal.sdk.file_io import FileIO

__all__ = ["FileIO"]

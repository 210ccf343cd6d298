"""Modal's ``modal.image``, as code written for Modal imports it: ``Image``."""

from shoal.sdk.image import Image

__all__ = ["Image"]

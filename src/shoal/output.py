"""Modal's ``modal.output``, as code written for Modal imports it: ``enable_output``."""

from shoal.sdk.output import enable_output

__all__ = ["enable_output"]

"""Modal's ``modal.secret``, as code written for Modal imports it: ``Secret``."""

from shoal.sdk.secret import Secret

__all__ = ["Secret"]

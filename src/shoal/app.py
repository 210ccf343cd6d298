"""Modal's ``modal.app``, as code written for Modal imports it: ``App``."""

from shoal.sdk.app import App

__all__ = ["App"]

"""Modal's ``modal.container_process``, as code written for Modal imports it: ``ContainerProcess``."""

from shoal.sdk.process import ContainerProcess

__all__ = ["ContainerProcess"]

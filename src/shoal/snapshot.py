"""Modal's ``modal.snapshot``, as code written for Modal imports it: ``SandboxSnapshot``."""

from shoal.sdk.snapshot import SandboxSnapshot

__all__ = ["SandboxSnapshot"]

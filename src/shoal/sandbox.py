"""Modal's ``modal.sandbox``, as code written for Modal imports it: ``Sandbox, SandboxConnectCredentials``."""

from shoal.sdk.sandbox import Sandbox
from shoal.types import SandboxConnectCredentials

__all__ = ["Sandbox", "SandboxConnectCredentials"]

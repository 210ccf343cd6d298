"""Modal's ``modal.sandbox``, as code written for Modal imports it: ``Sandbox, SandboxConnectCredentials``."""

from shoal.sdk._sandbox_network import SandboxConnectCredentials
from shoal.sdk.sandbox import Sandbox

__all__ = ["Sandbox", "SandboxConnectCredentials"]

"""``Tunnel``: how to reach a sandbox port from outside (Modal's ``modal.Tunnel``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from shoal.exception import DeprecationError, InvalidError


@dataclass(frozen=True)
class Tunnel:
    """A tunnel to one container port.

    TLS tunnels are terminated by the shoal daemon with a certificate from its
    local CA: trust the file ``shoal status`` names as "tunnel CA" (e.g.
    ``ssl.create_default_context(cafile=...)``, ``curl --cacert``,
    ``REQUESTS_CA_BUNDLE``).

    Examples:
        sb = shoal.Sandbox.create("python", "-m", "http.server", "8080", encrypted_ports=[8080], app=app)
        tunnel = sb.tunnels()[8080]
        print(tunnel.url)  # https://127.0.0.1:40123
    """

    host: str
    port: int
    unencrypted_host: str
    unencrypted_port: int

    @property
    def url(self) -> str:
        """``https://host[:port]`` of the TLS endpoint."""
        if self.unencrypted_host:
            warnings.warn(
                "Tunnel.url of an unencrypted tunnel is deprecated (2026-03-05): use tunnel.tcp_socket for raw TCP,"
                " or declare the port in encrypted_ports",
                DeprecationError,
                stacklevel=2,
            )
        value = f"https://{self.host}"
        if self.port != 443:
            value += f":{self.port}"
        return value

    @property
    def tls_socket(self) -> tuple[str, int]:
        """(host, port) of the TLS endpoint."""
        return (self.host, self.port)

    @property
    def tcp_socket(self) -> tuple[str, int]:
        """(host, port) of the raw TCP endpoint (``unencrypted_ports`` only)."""
        if not self.unencrypted_host:
            raise InvalidError(
                "This tunnel is not configured for unencrypted TCP: declare the port in unencrypted_ports"
            )
        return (self.unencrypted_host, self.unencrypted_port)

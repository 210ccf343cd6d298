"""``Tunnel``: how to reach a sandbox port from outside (Modal's ``modal.Tunnel``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from shoal.exception import DeprecationError, InvalidError
from shoal.sdk._checks import is_port
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import Client
from shoal.wire import routes


@dataclass(frozen=True)
class Tunnel:
    """A tunnel to one container port.

    TLS tunnels are terminated by the shoal daemon with a certificate from its
    local CA: trust the file ``shoal status`` names as "tunnel CA" (e.g.
    ``ssl.create_default_context(cafile=...)``, ``curl --cacert``,
    ``REQUESTS_CA_BUNDLE``), or run ``sudo shoal trust`` once.  A daemon
    started with ``--tunnel-domain D`` names each TLS tunnel ``<unique>.D`` on
    port 443, as Modal does; without it, ``host`` is the daemon's address and
    each tunnel has a port of its own.

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


def _tunnel(data: dict[str, Any]) -> Tunnel:
    return Tunnel(data["host"], data["port"], data["unencrypted_host"], data["unencrypted_port"])


class TunnelMap(dict[int, Tunnel]):
    """``sb.tunnels()``: container port → Tunnel.

    Looking up a port that was not declared at create opens an encrypted
    tunnel to it on the spot, so ``sb.tunnels()[8080]`` works for a server the
    sandbox started without ``encrypted_ports=[8080]`` (Modal raises KeyError
    there).  ``in``, ``get`` and iteration see only the tunnels already open.
    """

    def __init__(self, client: Client, sandbox_id: str, tunnels: list[dict[str, Any]]) -> None:
        super().__init__({int(t["container_port"]): _tunnel(t) for t in tunnels})
        self._client = client
        self._sandbox_id = sandbox_id

    def __missing__(self, port: int) -> Tunnel:
        if not is_port(port):
            raise KeyError(port)
        resp = run_blocking(self._client.request("POST", routes.path("sandboxes", self._sandbox_id, "tunnels", port)))
        for t in resp["tunnels"]:
            self[int(t["container_port"])] = _tunnel(t)
        if not dict.__contains__(self, port):
            raise KeyError(port)
        return dict.__getitem__(self, port)

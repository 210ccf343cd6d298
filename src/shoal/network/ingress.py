"""Ways into a sandbox from outside: its tunnels (TLS, h2 and plain TCP to declared ports, and ports opened
later) and the authenticating connect-token proxies.  A part of :class:`shoal.network.service.Network`, kept
apart because it is one job; the attributes it uses are the network's own, declared below.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.exception import InvalidError, SandboxTimeoutError
from shoal.network.config import NetworkConfig
from shoal.network.connect import ConnectProxy
from shoal.network.connect import digest as token_digest
from shoal.network.routing import TunnelRouter, new_label
from shoal.network.tls import LocalCA, check_covers, server_context
from shoal.network.tunnels import ENCRYPTED, H2, UNENCRYPTED, SandboxTunnels

if TYPE_CHECKING:
    from shoal.network.service import Attachment


class Ingress:
    """Tunnels and connect proxies, for :class:`~shoal.network.service.Network`."""

    cfg: NetworkConfig
    enabled: bool
    dir: Path
    attached: dict[str, Attachment]
    tunnels: dict[str, SandboxTunnels]
    connects: dict[str, dict[int, ConnectProxy]]
    _tls: dict[str, ssl.SSLContext]
    ca: LocalCA
    router: TunnelRouter | None
    _router_port: int = 0

    async def _start_router(self) -> None:
        """Start the shared listener that routes ``<name>.<tunnel_domain>`` to tunnels (``--tunnel-domain``)."""
        domain = self.cfg.tunnel_domain
        cert, key = self.ca.cert_path, self.ca.key_path
        if self.cfg.tunnel_cert:
            cert, key = Path(self.cfg.tunnel_cert), Path(self.cfg.tunnel_key)
            check_covers(cert, f"*.{domain}")
        router = TunnelRouter(
            domain, server_context(cert, key, ["http/1.1"]), server_context(cert, key, ["h2", "http/1.1"])
        )
        self._router_port = await router.start(self.cfg.tunnel_bind, self.cfg.tunnel_port)
        self.router = router

    def routing_status(self) -> dict[str, Any]:
        """Where name-routed tunnels are served (``shoal status``): ``domain``, ``port``; empty without a domain."""
        if self.router is None:
            return {}
        return {"domain": self.router.domain, "port": self._router_port, "bind": self.cfg.tunnel_bind}

    def _unroute(self, att: Attachment) -> None:
        if self.router is not None:
            for spec in att.ports.values():
                if "name" in spec:
                    self.router.remove(spec["name"])

    async def _tls_endpoint(self, tunnels: SandboxTunnels, port: int, spec: dict[str, Any]) -> None:
        """Make the TLS side of a tunnel: a name on the shared listener, or a listener of its own."""
        if self.router is not None:
            label = spec.setdefault("name", new_label())
            self.router.add(label, tunnels.route(port), spec["kind"] == H2)
            return
        tls = self._tls[H2 if spec["kind"] == H2 else ENCRYPTED]
        spec["tls_port"] = await tunnels.listen(port, self.cfg.tunnel_bind, int(spec.get("tls_port", 0)), tls)

    async def _open_tunnels(self, sandbox_id: str, att: Attachment, touch: Callable[[], None]) -> None:
        if not att.ports:
            return
        tunnels = self.tunnels[sandbox_id] = SandboxTunnels(att.ip, att.inbound, touch)
        bind = self.cfg.tunnel_bind
        for port, spec in att.ports.items():
            await self._tls_endpoint(tunnels, int(port), spec)
            if spec["kind"] == UNENCRYPTED:
                spec["tcp_port"] = await tunnels.listen(int(port), bind, int(spec.get("tcp_port", 0)), None)
        (self.dir / f"{sandbox_id}.json").write_text(json.dumps(asdict(att)))
        tunnels.ready.set()

    async def add_tunnel(self, sandbox_id: str, port: int, touch: Callable[[], None]) -> None:
        """Open an encrypted tunnel to a port not declared at create (shoal's extension; see ``Sandbox.tunnels``)."""
        att = self.attached.get(sandbox_id)
        if att is None or not self.enabled:
            raise InvalidError("this sandbox has no network (block_network=True), so it cannot have tunnels")
        if str(port) in att.ports:
            return
        tunnels = self.tunnels.get(sandbox_id)
        if tunnels is None:
            tunnels = self.tunnels[sandbox_id] = SandboxTunnels(att.ip, att.inbound, touch)
            tunnels.ready.set()
        spec: dict[str, Any] = {"kind": ENCRYPTED}
        await self._tls_endpoint(tunnels, port, spec)
        att.ports[str(port)] = spec
        (self.dir / f"{sandbox_id}.json").write_text(json.dumps(asdict(att)))

    async def tunnels_of(self, sandbox_id: str, finished: asyncio.Event, timeout: float) -> list[dict[str, Any]]:
        """The sandbox's tunnels once they listen, as Modal's TunnelData; SandboxTimeoutError if not in ``timeout``."""
        att = self.attached.get(sandbox_id)
        if finished.is_set():
            raise SandboxTimeoutError("the sandbox has finished: its tunnels are closed")
        if att is None or not att.ports:
            return []
        deadline = time.monotonic() + timeout
        while True:
            tunnels = self.tunnels.get(sandbox_id)
            if tunnels is not None and tunnels.ready.is_set():
                break
            if time.monotonic() >= deadline or finished.is_set():
                raise SandboxTimeoutError(f"the sandbox's tunnels were not up within {timeout:g} s")
            await asyncio.sleep(0.05)
        host = self.cfg.tunnel_host
        router = self.router
        return [
            {
                "container_port": int(port),
                "host": router.name(spec["name"]) if router is not None and "name" in spec else host,
                "port": self._router_port if router is not None and "name" in spec else spec["tls_port"],
                "unencrypted_host": host if spec["kind"] == UNENCRYPTED else "",
                "unencrypted_port": spec.get("tcp_port", 0),
            }
            for port, spec in sorted(att.ports.items(), key=lambda item: int(item[0]))
        ]

    async def create_connect_token(
        self, sandbox_id: str, port: int, metadata: str, touch: Callable[[], None]
    ) -> tuple[str, str]:
        """A new token for the authenticating proxy in front of ``port`` (started on first use): (url, token)."""
        att = self.attached.get(sandbox_id)
        if att is None or not self.enabled:
            raise InvalidError("this sandbox has no network (block_network=True), so nothing can connect to it")
        token = secrets.token_urlsafe(32)
        entry = att.connect.setdefault(str(port), {"listen": 0, "tokens": {}})
        entry["tokens"][token_digest(token)] = metadata
        proxy = await self._connect_proxy(sandbox_id, att, port, touch)
        (self.dir / f"{sandbox_id}.json").write_text(json.dumps(asdict(att)))
        return f"https://{self.cfg.tunnel_host}:{proxy.listen_port}", token

    async def _connect_proxy(
        self, sandbox_id: str, att: Attachment, port: int, touch: Callable[[], None]
    ) -> ConnectProxy:
        proxies = self.connects.setdefault(sandbox_id, {})
        proxy = proxies.get(port)
        if proxy is None:
            entry = att.connect[str(port)]
            proxy = ConnectProxy(att.ip, port, entry["tokens"], att.inbound, touch)
            entry["listen"] = await proxy.start(self.cfg.tunnel_bind, int(entry.get("listen", 0)), self._tls[ENCRYPTED])
            proxies[port] = proxy
        return proxy

    def busy(self, sandbox_id: str) -> bool:
        """Whether a tunnel connection into the sandbox is open (that counts as activity for ``idle_timeout``)."""
        tunnels = self.tunnels.get(sandbox_id)
        proxies = self.connects.get(sandbox_id, {})
        return (tunnels is not None and tunnels.busy()) or any(p.open for p in proxies.values())

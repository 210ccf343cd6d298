"""The daemon's networking: one subnet per daemon, a veth per sandbox, NAT, DNS, allowlists and tunnels.

Trusts: the engine, which calls ``prepare``/``connect``/``detach`` for the
sandboxes it owns, and the validated create request (``CreateSandbox``).
Defends: see ``ruleset`` for what the packet filter enforces and
``tunnels`` for the listeners; here, that a sandbox's files in its root
(/etc/resolv.conf, /etc/hosts) are written without following anything the
image put there (``etc_files.write_etc``), and that nothing outlives its sandbox,
also across a daemon crash (``start`` removes links, records and filter
elements of sandboxes the daemon does not know).

Layout (routed, no bridge: docs/decisions/0010-routed-veth-per-sandbox.md):
each sandbox has ``eth0`` = its address/32 and a default route via the
gateway (the subnet's first address), reached over a veth whose host side
``sv<netid><n>`` holds the gateway/32 and a /32 route back.  The gateway
also sits on an empty bridge ``shoal-<netid>`` (no ports), which reserves
the subnet host-wide and carries the DNS forwarder.  The namespace is the
container's own (docs/decisions/0011-network-namespace-from-the-runtime.md).
Each sandbox's attachment (address, policy, tunnel ports) is recorded in
``<runtime dir>/net/<sandbox id>.json`` for the next daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import string
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from shoal.exception import InvalidError, ServiceError
from shoal.network import ruleset
from shoal.network.config import NetworkConfig, parse_upstream
from shoal.network.connect import ConnectProxy
from shoal.network.dns import Client, DnsForwarder
from shoal.network.egress import EgressInterceptor, Replacement
from shoal.network.egress_ca import BUNDLE_MAX, EgressCA, host_bundle, upstream_context
from shoal.network.etc_files import init_pid, write_etc, write_trust
from shoal.network.ingress import Ingress
from shoal.network.netns import NetnsWorker
from shoal.network.nft import Nft, NftError
from shoal.network.routing import TunnelRouter
from shoal.network.ruleset import NetNames
from shoal.network.tls import LocalCA
from shoal.network.tunnels import ENCRYPTED, H2, UNENCRYPTED, SandboxTunnels
from shoal.wire.outbound import render

log = logging.getLogger(__name__)

ALLOC_LOCK = Path("/run/shoal-network.lock")
"""Held while a daemon picks its subnet, so two daemons never take the same one."""


@dataclass
class Attachment:
    """One sandbox's place on the network (persisted as JSON)."""

    ip: str
    link: str
    restricted: bool = False
    cidrs: list[str] = field(default_factory=list)
    domains: list[str] | None = None
    inbound: list[str] | None = None
    ports: dict[str, dict[str, Any]] = field(default_factory=dict)
    """container port → {"kind": "encrypted"|"h2"|"unencrypted", "tls_port": n, "tcp_port": n, "name": label}
    ("name": the tunnel's label on the shared listener of ``--tunnel-domain``, instead of "tls_port")."""
    connect: dict[str, dict[str, Any]] = field(default_factory=dict)
    """container port → {"listen": n, "tokens": {sha256 of a connect token: its user metadata}}."""
    outbound_headers: list[dict[str, Any]] | None = None
    """Its outbound policy as asked ({"domain", "headers" (templates), "secret_id"}); values are never stored."""
    peers: dict[str, str] = field(default_factory=dict)
    """Name → address of the sandboxes it may reach and resolve by name: its sidecars (a sidecar: its sandbox,
    as ``main``)."""

    @property
    def address(self) -> ipaddress.IPv4Address:
        """The sandbox's address."""
        return ipaddress.IPv4Address(self.ip)


def _netid() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=4))


class Network(Ingress):
    """Every sandbox's networking on this machine, for one daemon."""

    def __init__(
        self,
        cfg: NetworkConfig,
        data_dir: Path,
        runtime_dir: Path,
        host_id: int,
        secret_values: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.secret_values = secret_values
        """A named secret's values by its id (``KeyError``/``NotFoundError`` when gone): for outbound policies."""
        self.enabled = cfg.enabled
        self.state_path = data_dir / "network.json"
        self.ca = LocalCA(data_dir / "tls")
        self.egress_ca = EgressCA(data_dir / "egress-tls")
        self.egress: EgressInterceptor | None = None
        self.policies: dict[str, list[Replacement]] = {}
        """Sandbox address → its outbound policy, values resolved (in memory only)."""
        self.tunnels: dict[str, SandboxTunnels] = {}
        self._tls: dict[str, ssl.SSLContext] = {}
        self.router: TunnelRouter | None = None
        """The shared, name-routed tunnel listener (``--tunnel-domain``), once started."""
        self.dir = runtime_dir / "net"
        self.host_id = host_id
        self.names: NetNames | None = None
        self.worker: NetnsWorker | None = None
        self.nft: Nft | None = None
        self.dns: DnsForwarder | None = None
        self.attached: dict[str, Attachment] = {}
        self.by_ip: dict[str, str] = {}
        self.dns_clients: dict[str, Client] = {}
        self.pins: dict[str, dict[ipaddress.IPv4Address, float]] = {}
        self._next = 2
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._policy_locks: dict[str, asyncio.Lock] = {}
        self.connects: dict[str, dict[int, ConnectProxy]] = {}
        """Sandbox id → container port → the connect-token proxy in front of it."""

    # ------------------------------------------------------------------ daemon lifecycle

    async def start(self, known: set[str]) -> None:
        """Take the subnet, the filter table and the DNS forwarder up; remove what unknown sandboxes left."""
        if not self.enabled:
            return
        self.worker = NetnsWorker()
        try:
            await self._start(known)
        except BaseException:
            # undo what was set up (the anchor link, the table), unless sandboxes of an earlier run still use it
            with contextlib.suppress(Exception):
                await self.close(sandboxes_remain=bool(self.attached))
            raise

    async def _start(self, known: set[str]) -> None:
        assert self.worker is not None
        self.nft = await self._run(Nft)
        self.names = await self._run(self._allocate)
        names = self.names
        old = await self._run(self.worker.set_sysctl, "net.ipv4.ip_forward", "1")
        if old != "1":
            log.warning("enabled IPv4 forwarding on this host (net.ipv4.ip_forward=1) for sandbox NAT")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for path in self.dir.glob("*.json"):
            sid = path.stem
            try:
                att = Attachment(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                att = None
            if sid in known and att is not None:
                self._remember(sid, att)
        await self._run(self._ensure_table)
        await self._remove_strays(known)
        if self.by_ip:
            self._next = (
                max(int(ipaddress.IPv4Address(ip)) - int(names.subnet.network_address) for ip in self.by_ip) + 1
            )
        await asyncio.to_thread(self.ca.ensure, self._cert_hosts())
        self._tls = {
            ENCRYPTED: self.ca.server_context(["http/1.1"]),
            H2: self.ca.server_context(["h2", "http/1.1"]),
        }
        if self.cfg.tunnel_domain:
            await self._start_router()
        upstreams = [parse_upstream(u) for u in self.cfg.dns_upstream]
        self.dns = DnsForwarder(names.gateway, upstreams, self._dns_client)
        await self.dns.start()
        await asyncio.to_thread(self.egress_ca.ensure)
        deny = [ipaddress.IPv4Network(c) for c in (*ruleset.ALWAYS_DENIED, *self.cfg.deny, str(names.pool))]
        self.egress = EgressInterceptor(
            names.gateway, self.policies.get, deny, self.egress_ca, upstream_context(self.cfg.egress_ca_file)
        )
        self.egress.start()
        log.info("sandbox network %s on %s (gateway %s)", names.netid, names.subnet, names.gateway)

    async def close(self, sandboxes_remain: bool) -> None:
        """Stop serving; unless sandboxes keep running, remove the table, the anchor link and the namespace dir."""
        if not self.enabled or self.worker is None:
            return
        for tunnels in self.tunnels.values():
            await tunnels.close()
        self.tunnels.clear()
        if self.router is not None:
            await self.router.close()
            self.router = None
        for proxies in self.connects.values():
            for proxy in proxies.values():
                await proxy.close()
        self.connects.clear()
        if self.dns is not None:
            await self.dns.close()
            self.dns = None
        if self.egress is not None:
            await self.egress.close()
            self.egress = None
        if not sandboxes_remain and self.names is not None:
            names = self.names
            with contextlib.suppress(NftError):
                await self._run(self._nft_run, ruleset.delete_table(names))
            await self._run(self.worker.delete_link, names.anchor)
            for name in await self._run(self.worker.link_names, names.link_prefix):
                await self._run(self.worker.delete_link, name)
            for path in self.dir.glob("*.json"):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()
        if self.nft is not None:
            self.nft.close()
        self.worker.close()
        self.worker = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        assert self.worker is not None
        return await asyncio.wrap_future(self.worker.submit(fn, *args))

    def _nft_run(self, commands: str) -> str:
        assert self.nft is not None
        return self.nft.run(commands)

    def _allocate(self) -> NetNames:
        """Our subnet: the saved one if still free for us, else the first free one in the pool (worker thread)."""
        assert self.worker is not None
        pool = ipaddress.IPv4Network(self.cfg.pool)
        ALLOC_LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(ALLOC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            saved: dict[str, str] = {}
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads(self.state_path.read_text())
            netid = saved.get("netid") or _netid()
            while not saved and (self.worker.link_names(f"sv{netid}") or self.worker.link_names(f"shoal-{netid}")):
                netid = _netid()
            busy = [
                n
                for n in self.worker.host_ipv4_networks(skip_prefix=f"sv{netid}")
                if n.prefixlen > 0 and not self._is_own(n, netid)
            ]
            candidates: list[ipaddress.IPv4Network] = []
            if saved.get("subnet"):
                candidates.append(ipaddress.IPv4Network(saved["subnet"]))
            candidates += list(pool.subnets(new_prefix=self.cfg.prefix_len))
            for subnet in candidates:
                if subnet.subnet_of(pool) and not any(subnet.overlaps(n) for n in busy):
                    break
            else:
                raise RuntimeError(f"no free /{self.cfg.prefix_len} left in the sandbox pool {pool}")
            names = NetNames(netid, subnet, pool)
            self.worker.ensure_anchor(names.anchor, names.gateway)
            self.state_path.write_text(json.dumps({"netid": netid, "subnet": str(subnet)}) + "\n")
            return names
        finally:
            os.close(fd)

    def _is_own(self, net: ipaddress.IPv4Network, netid: str) -> bool:
        """Whether a host network is our own anchor's gateway address (present after a restart)."""
        assert self.worker is not None
        try:
            index = self.worker.ipr.link_lookup(ifname=f"shoal-{netid}")
        except Exception:
            return False
        if not index:
            return False
        for msg in self.worker.ipr.get_addr(family=2, index=index[0]):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr and net == ipaddress.IPv4Network(f"{addr}/{msg['prefixlen']}", strict=False):
                return True
        return False

    def _ensure_table(self) -> None:
        """Create the table, or keep it when its static part is current (worker thread)."""
        assert self.names is not None and self.nft is not None
        names = self.names
        body = ruleset.table_body(names, self.cfg.deny)
        try:
            current = ruleset.generation(body) in self.nft.run(f"list table inet {names.table}").split("\n", 3)[1]
        except (NftError, IndexError):
            current = False
        if current:
            return
        cmds = ruleset.replace_table(names, body)
        for att in self.attached.values():
            if att.restricted:
                cmds += ruleset.add_restricted(names, att.address, att.cidrs)
            if att.outbound_headers is not None:
                cmds += ruleset.add_intercept(names, att.address)
            for peer in att.peers.values():
                if peer in self.by_ip:
                    cmds += ruleset.add_peers(names, att.address, ipaddress.IPv4Address(peer))
        self.nft.run(cmds)

    async def _remove_strays(self, known: set[str]) -> None:
        """Namespaces, links and filter elements of sandboxes this daemon does not know (a crash)."""
        assert self.names is not None and self.worker is not None
        names, worker = self.names, self.worker
        for path in self.dir.glob("*.json"):
            if path.stem not in self.attached:
                path.unlink(missing_ok=True)
        live = {att.link for att in self.attached.values()}
        for name in await self._run(worker.link_names, names.link_prefix):
            if name not in live:
                log.info("removing stray link %s", name)
                await self._run(worker.delete_link, name)
        cmds = ""
        for item in await self._run(self._list_set, "restricted"):
            sid = self.by_ip.get(item)
            if sid is None or not self.attached[sid].restricted:
                cmds += f"delete element inet {names.table} restricted {{ {ipaddress.IPv4Address(item)} }}\n"
        for item in await self._run(self._list_set, "intercept"):
            sid = self.by_ip.get(item)
            if sid is None or self.attached[sid].outbound_headers is None:
                cmds += ruleset.remove_intercept(names, ipaddress.IPv4Address(item))
        for sb_ip, dest in await self._run(self._list_pairs, "allow_pin"):
            if sb_ip in self.by_ip:
                # Kept; its expiry is not known here, so the next answer refreshes it.
                self.pins.setdefault(sb_ip, {})[ipaddress.IPv4Address(dest)] = time.monotonic()
            else:
                cmds += ruleset.delete_pins(names, ipaddress.IPv4Address(sb_ip), [ipaddress.IPv4Address(dest)])
        for a, b in await self._run(self._list_pairs, "peers"):
            att = self.attached.get(self.by_ip.get(a, ""))
            if att is None or b not in att.peers.values() or b not in self.by_ip:
                pair = f"{ipaddress.IPv4Address(a)} . {ipaddress.IPv4Address(b)}"
                cmds += f"delete element inet {names.table} peers {{ {pair} }}\n"
        for sb_ip, dest in await self._run(self._list_pairs, "allow_cidr"):
            att = self.attached.get(self.by_ip.get(sb_ip, ""))
            net = ipaddress.IPv4Network(dest)
            if att is None or str(net) not in att.cidrs:
                cmds += f"delete element inet {names.table} allow_cidr {{ {ipaddress.IPv4Address(sb_ip)} . {net} }}\n"
        if cmds:
            await self._run(self._nft_run, cmds)

    def _list_set(self, name: str) -> list[str]:
        assert self.nft is not None and self.names is not None
        out: list[str] = []
        for obj in self.nft.list_json(f"set inet {self.names.table} {name}"):
            for elem in obj.get("set", {}).get("elem", []):
                out.append(str(elem))
        return out

    def _list_pairs(self, name: str) -> list[tuple[str, str]]:
        """Elements ``a . b`` of a concatenated set, as strings (``b`` may be a prefix ``x/n``)."""
        assert self.nft is not None and self.names is not None
        out: list[tuple[str, str]] = []
        for obj in self.nft.list_json(f"set inet {self.names.table} {name}"):
            for elem in obj.get("set", {}).get("elem", []):
                if isinstance(elem, dict) and "elem" in elem:
                    elem = elem["elem"]["val"]
                parts = elem.get("concat", []) if isinstance(elem, dict) else []
                if len(parts) != 2:
                    continue
                a, b = parts
                if isinstance(b, dict) and "prefix" in b:
                    b = f"{b['prefix']['addr']}/{b['prefix']['len']}"
                elif isinstance(b, dict):
                    continue
                out.append((str(a), str(b)))
        return out

    # ------------------------------------------------------------------ sandboxes

    def _remember(self, sid: str, att: Attachment) -> None:
        self.attached[sid] = att
        self.by_ip[att.ip] = sid
        self.dns_clients[att.ip] = Client(
            domains=att.domains if att.restricted else None,
            on_pins=functools.partial(self._pin, att.address) if att.restricted else None,
            names=att.peers,
        )
        if att.outbound_headers is not None:
            try:
                self.policies[att.ip] = self.resolve_policy(att.outbound_headers)
            except Exception as exc:  # its secret was deleted or changed while the daemon was down
                log.warning("sandbox %s: its outbound policy no longer resolves (%s); no headers are added", sid, exc)
                self.policies[att.ip] = []

    def resolve_policy(self, replacements: list[dict[str, Any]]) -> list[Replacement]:
        """An outbound policy with each header template filled from its secret (KeyError names a missing key)."""
        out: list[Replacement] = []
        for rep in replacements:
            values: dict[str, str] = {}
            if rep.get("secret_id"):
                if self.secret_values is None:
                    raise InvalidError("outbound policies with secrets need the daemon's secret store")
                values = self.secret_values(str(rep["secret_id"]))
            headers = {str(k): render(str(v), values) for k, v in dict(rep["headers"]).items()}
            out.append(Replacement(domain=str(rep["domain"]), headers=headers))
        return out

    def _forget(self, sid: str) -> Attachment | None:
        att = self.attached.pop(sid, None)
        if att is not None:
            self.by_ip.pop(att.ip, None)
            self.dns_clients.pop(att.ip, None)
            self.policies.pop(att.ip, None)
        return att

    def _dns_client(self, source: str) -> Client | None:
        return self.dns_clients.get(source)

    def _take_address(self) -> ipaddress.IPv4Address:
        """The next free sandbox address, round robin (a freed address is reused as late as possible)."""
        assert self.names is not None
        subnet = self.names.subnet
        size = subnet.num_addresses - 1  # the broadcast address stays unused
        for _ in range(size):
            n = self._next
            self._next = n + 1 if n + 1 < size else 2
            ip = subnet.network_address + n
            if str(ip) not in self.by_ip:
                return ip
        raise RuntimeError(f"all {size - 2} sandbox addresses of {subnet} are in use")

    def prepare(self, sandbox_id: str, req: Any, rootfs: str, owner: int | None = None) -> None:
        """Before the container starts: take an address and write the sandbox's resolv.conf and hosts, owned by
        host uid ``owner`` (its root; default: the shared range's).

        ``req`` is the validated ``CreateSandbox``.  Nothing to do with
        ``block_network`` or networking off: the runtime's fresh namespace has
        loopback only.
        """
        if not self.will_wire(req):
            return
        assert self.names is not None
        names = self.names
        ip = self._take_address()
        restricted = req.outbound_cidr_allowlist is not None or req.outbound_domain_allowlist is not None
        # Names are filtered (and their answers pinned) only with a domain allowlist; a CIDR list alone leaves DNS open.
        domains = list(req.outbound_domain_allowlist) if req.outbound_domain_allowlist is not None else None
        att = Attachment(
            ip=str(ip),
            link=names.link_name(ip),
            restricted=restricted,
            cidrs=list(req.outbound_cidr_allowlist or []),
            domains=domains,
            inbound=list(req.inbound_cidr_allowlist) if req.inbound_cidr_allowlist is not None else None,
            ports={
                str(port): {"kind": kind}
                for kind, ports in (
                    (ENCRYPTED, req.encrypted_ports),
                    (H2, req.h2_ports),
                    (UNENCRYPTED, req.unencrypted_ports),
                )
                for port in ports
            },
            outbound_headers=(
                None if req.outbound_headers is None else [r.model_dump(mode="json") for r in req.outbound_headers]
            ),
        )
        self._remember(sandbox_id, att)
        (self.dir / f"{sandbox_id}.json").write_text(json.dumps(asdict(att)))
        uid = self.host_id if owner is None else owner
        write_etc(Path(rootfs), att.ip, uid, str(names.gateway))
        if att.outbound_headers is not None:
            write_trust(Path(rootfs), self.egress_ca.pem(), host_bundle(), uid, BUNDLE_MAX)

    async def connect(
        self, sandbox_id: str, cgroup_path: str, touch: Callable[[], None], netns: str | None = None
    ) -> None:
        """Once the container runs, before its entrypoint: link its namespace to the host, apply its policy, and
        open its tunnels (``touch`` records their activity for ``idle_timeout``).  ``netns``: a namespace made
        with :meth:`make_netns` (a gVisor sandbox, before it starts), else the container init's."""
        att = self.attached.get(sandbox_id)
        if att is None:
            return
        assert self.names is not None
        ns_path = netns if netns is not None else f"/proc/{init_pid(cgroup_path)}/ns/net"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[sandbox_id] = done
        try:
            await self._run(self._setup, ns_path, att, self.names)
        finally:
            done.set_result(None)
            self._pending.pop(sandbox_id, None)
        await self._open_tunnels(sandbox_id, att, touch)

    def will_wire(self, req: Any) -> bool:
        """Whether ``prepare`` gives a sandbox of the request ``req`` a network to wire."""
        return self.enabled and not req.block_network

    def wired(self, sandbox_id: str) -> bool:
        """Whether the sandbox has a network to wire (networking is on for this daemon)."""
        return sandbox_id in self.attached

    async def make_netns(self, path: str) -> None:
        """A network namespace for a sandbox whose runtime takes one made beforehand (gVisor's runsc)."""
        assert self.worker is not None
        await self._run(self.worker.make_netns, path)

    async def reopen(self, sandbox_id: str, touch: Callable[[], None]) -> None:
        """After a daemon restart: listen again for a running sandbox's tunnels (on the same ports when free)."""
        att = self.attached.get(sandbox_id)
        if att is not None and self.enabled:
            await self._open_tunnels(sandbox_id, att, touch)
            for port in att.connect:
                await self._connect_proxy(sandbox_id, att, int(port), touch)

    @property
    def ca_path(self) -> str | None:
        """The local CA's certificate, which clients trust for TLS tunnels."""
        return str(self.ca.ca_path) if self.enabled else None

    def _cert_hosts(self) -> list[str]:
        hosts = [self.cfg.tunnel_host, "localhost", "127.0.0.1", "::1"]
        if self.cfg.tunnel_bind not in ("0.0.0.0", "::", ""):
            hosts.append(self.cfg.tunnel_bind)
        if self.cfg.tunnel_domain and not self.cfg.tunnel_cert:
            hosts.append(f"*.{self.cfg.tunnel_domain}")
        return hosts

    def _setup(self, ns_path: str, att: Attachment, names: NetNames) -> None:
        assert self.worker is not None
        self.worker.setup_sandbox(ns_path, att.link, names.link_index(att.address), att.address, names.gateway)
        if att.restricted:
            assert self.nft is not None
            self.nft.run(ruleset.add_restricted(names, att.address, att.cidrs))
        if att.outbound_headers is not None:
            assert self.nft is not None
            self.nft.run(ruleset.add_intercept(names, att.address))

    async def detach(self, sandbox_id: str) -> None:
        """After the container is gone: remove the sandbox's filter elements and record.  Idempotent.

        Its namespace died with its last process, and the kernel removes the veth with it.
        """
        if not self.enabled or self.worker is None:
            return
        pending = self._pending.get(sandbox_id)
        if pending is not None:
            await pending
        tunnels = self.tunnels.pop(sandbox_id, None)
        if tunnels is not None:
            att = self.attached.get(sandbox_id)
            if att is not None:
                self._unroute(att)
            await tunnels.close()
        for proxy in self.connects.pop(sandbox_id, {}).values():
            await proxy.close()
        self._policy_locks.pop(sandbox_id, None)
        att = self._forget(sandbox_id)
        if att is not None and att.peers:
            await self._unpeer(att)
        if att is not None and (att.restricted or att.outbound_headers is not None):
            await self._run(self._teardown, att, self.pins.pop(att.ip, {}))
        (self.dir / f"{sandbox_id}.json").unlink(missing_ok=True)

    async def link_peers(self, a_id: str, name_of_b: str, b_id: str, name_of_a: str) -> None:
        """Let two wired sandboxes (a sandbox and its sidecar) reach each other, and resolve each other's names
        through the DNS forwarder (``a`` knows ``b`` as ``name_of_b``)."""
        a, b = self.attached.get(a_id), self.attached.get(b_id)
        if a is None or b is None:
            raise InvalidError("a sandbox and its sidecars both need networking (not block_network)")
        assert self.names is not None
        a.peers[name_of_b] = b.ip
        b.peers[name_of_a] = a.ip
        for sid, att in ((a_id, a), (b_id, b)):
            (self.dir / f"{sid}.json").write_text(json.dumps(asdict(att)))
        await self._run(self._nft_run, ruleset.add_peers(self.names, a.address, b.address))

    async def _unpeer(self, gone: Attachment) -> None:
        """Forget a sandbox that ended in its peers' records, and remove both directions of each pair."""
        assert self.names is not None
        cmds = ""
        for peer_ip in set(gone.peers.values()):
            sid = self.by_ip.get(peer_ip)
            peer = self.attached.get(sid or "")
            if peer is not None:
                for name in [n for n, ip in peer.peers.items() if ip == gone.ip]:
                    del peer.peers[name]
                (self.dir / f"{sid}.json").write_text(json.dumps(asdict(peer)))
            cmds += ruleset.remove_peers(self.names, gone.address, ipaddress.IPv4Address(peer_ip))
        for line in cmds.splitlines():
            with contextlib.suppress(NftError):
                await self._run(self._nft_run, line + "\n")

    def _teardown(self, att: Attachment, pins: dict[ipaddress.IPv4Address, float]) -> None:
        assert self.names is not None and self.nft is not None
        if att.outbound_headers is not None:
            try:
                self.nft.run(ruleset.remove_intercept(self.names, att.address))
            except NftError as exc:
                log.warning("removing %s from the outbound policy set: %s", att.ip, exc)
        if att.restricted:
            try:
                self.nft.run(ruleset.remove_restricted(self.names, att.address, att.cidrs))
            except NftError as exc:
                log.warning("removing %s from the allowlist sets: %s", att.ip, exc)
        for addr in pins:
            # One by one: a pin may have expired meanwhile, and a failed delete would undo the others.
            with contextlib.suppress(NftError):
                self.nft.run(ruleset.delete_pins(self.names, att.address, [addr]))

    async def _pin(self, ip: ipaddress.IPv4Address, pins: dict[ipaddress.IPv4Address, int]) -> None:
        """Allow ``ip`` to reach addresses an allowed name resolved to (refreshing pins that are half spent)."""
        assert self.names is not None
        known = self.pins.setdefault(str(ip), {})
        now = time.monotonic()
        fresh = {a: s for a, s in pins.items() if a not in known}
        stale = {a: s for a, s in pins.items() if a in known and known[a] - now < s / 2}
        if not fresh and not stale:
            return
        cmds = ""
        if stale:
            cmds += ruleset.delete_pins(self.names, ip, stale)
        cmds += ruleset.add_pins(self.names, ip, {**fresh, **stale})
        try:
            await self._run(self._nft_run, cmds)
        except NftError:
            # A stale pin expired meanwhile: add without deleting.
            await self._run(self._nft_run, ruleset.add_pins(self.names, ip, {**fresh, **stale}))
        for a, s in {**fresh, **stale}.items():
            known[a] = now + s

    async def set_policy(self, sandbox_id: str, cidrs: list[str] | None, domains: list[str] | None) -> None:
        """Replace a running sandbox's outbound allowlists (both None: open to the internet again) and cut the
        connections the new policy does not allow (``sb._experimental_set_outbound_network_policy``).

        Addresses pinned by earlier lookups are dropped with the old policy: a connection to a host allowed by
        name is cut too, and the next lookup of an allowed name pins it again.
        """
        att = self.attached.get(sandbox_id)
        if att is None or self.names is None:
            raise InvalidError(
                "this sandbox has no network (block_network=True, or the daemon runs with networking off):"
                " there is no outbound policy to set"
            )
        pending = self._pending.get(sandbox_id)
        if pending is not None:
            await pending
        async with self._policy_locks.setdefault(sandbox_id, asyncio.Lock()):
            old = self.attached.get(sandbox_id)
            if old is None:
                raise InvalidError("the sandbox has stopped: there is no outbound policy to set")
            if domains and old.outbound_headers is not None:
                raise InvalidError(
                    "this sandbox has an `_experimental_outbound_policy`, which cannot be used with"
                    " `outbound_domain_allowlist`; give outbound_cidr_allowlist instead"
                )
            new = replace(
                old,
                restricted=cidrs is not None or domains is not None,
                cidrs=list(cidrs or []),
                domains=list(domains) if domains is not None else None,
            )
            self._remember(sandbox_id, new)  # lookups from now on follow the new names
            await self._run(self._replace_policy, old, new, self.pins.pop(old.ip, {}))
            (self.dir / f"{sandbox_id}.json").write_text(json.dumps(asdict(new)))
            if new.restricted:
                await self._run(self._cut_disallowed, new)

    async def set_outbound_headers(self, sandbox_id: str, replacements: list[dict[str, Any]]) -> None:
        """Replace the header replacements of a sandbox created with an outbound policy
        (``sb._experimental_update_outbound_policy``): requests sent from now on get the new headers, on new
        connections and on ones already intercepted.  A connection opened to a name the old policy did not cover
        keeps passing through untouched."""
        att = self.attached.get(sandbox_id)
        if att is None or att.outbound_headers is None:
            raise InvalidError(
                "only a sandbox created with an `_experimental_outbound_policy` can have it updated (header"
                " replacement is set up when the sandbox starts): create the sandbox with a policy, even an empty"
                " one, to change it later"
            )
        try:
            resolved = self.resolve_policy(replacements)
        except KeyError as exc:
            raise InvalidError(
                f"an outbound policy header names the secret key ${exc.args[0]}, which its secret does not hold"
            ) from None
        async with self._policy_locks.setdefault(sandbox_id, asyncio.Lock()):
            old = self.attached.get(sandbox_id)
            if old is None:
                raise InvalidError("the sandbox has stopped: there is no outbound policy to update")
            new = replace(old, outbound_headers=replacements)
            self.attached[sandbox_id] = new
            self.policies[new.ip] = resolved
            (self.dir / f"{sandbox_id}.json").write_text(json.dumps(asdict(new)))

    def _replace_policy(self, old: Attachment, new: Attachment, pins: dict[ipaddress.IPv4Address, float]) -> None:
        assert self.names is not None and self.nft is not None
        for addr in pins:
            with contextlib.suppress(NftError):  # it may have expired meanwhile
                self.nft.run(ruleset.delete_pins(self.names, old.address, [addr]))
        cmds = ruleset.remove_restricted(self.names, old.address, old.cidrs) if old.restricted else ""
        if new.restricted:
            cmds += ruleset.add_restricted(self.names, new.address, new.cidrs)
        if cmds:
            self.nft.run(cmds)

    def _cut_disallowed(self, att: Attachment) -> None:
        """Delete the conntrack entries of the sandbox's connections to destinations its CIDRs do not cover."""
        assert self.names is not None
        allowed = [ipaddress.IPv4Network(c) for c in att.cidrs]
        try:
            listing = subprocess.run(
                ["conntrack", "-L", "-f", "ipv4", "-s", att.ip], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise ServiceError(
                "the new outbound policy is in place, but open connections could not be cut: the conntrack tool is"
                " missing (make setup installs it)"
            ) from None
        # Each line holds the original direction first ("src=SANDBOX dst=DESTINATION ..."), then the reply's.
        destinations = {m.group(1) for line in listing.stdout.splitlines() if (m := re.search(r"\bdst=(\S+)", line))}
        for dst in sorted(destinations):
            try:
                addr = ipaddress.IPv4Address(dst)
            except ValueError:
                continue
            if addr == self.names.gateway or any(addr in net for net in allowed):
                continue
            subprocess.run(["conntrack", "-D", "-f", "ipv4", "-s", att.ip, "-d", dst], capture_output=True, check=False)

    def attachment(self, sandbox_id: str) -> Attachment | None:
        """A sandbox's attachment, if it has networking."""
        return self.attached.get(sandbox_id)

"""Sandbox links: veths into the containers' network namespaces, made and configured on one dedicated thread.

Trusts: its callers (the daemon's own ``service``); it takes addresses,
names and pids that the daemon chose or read from the sandbox's cgroup,
never a caller's.

The OCI runtime makes each sandbox's network namespace, inside the
sandbox's user namespace (a namespace made by the daemon and joined by path
would be owned by the host's user namespace, and runc 1.1 then cannot mount
/sys in the container: docs/decisions/0011-network-namespace-from-the-runtime.md).
After ``runc run`` returns, and before the entrypoint starts, the worker
thread creates a veth with its peer directly in the container's namespace
(``/proc/<init pid>/ns/net``) and configures the peer through a netlink
socket opened while the thread was in that namespace (``setns``), then
returns to the host's namespace.  Only that thread ever changes namespace,
always back before its next job: no other thread of the daemon (the event
loop's above all) ever runs in a sandbox's namespace.

The namespace, and the veth with it, dies with the container's last
process: a crashed daemon leaves no namespace behind, only possibly a link
that the kernel has not finished destroying.

gVisor sandboxes are the exception (decision 0069): runsc copies the
namespace's addresses and routes into its own network stack when it starts,
so their namespace is made first (:meth:`NetnsWorker.make_netns`, kept by a
bind mount on a file in the sandbox's run directory), wired, and named in
the bundle; teardown unmounts it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import ipaddress
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4
SANDBOX_IFNAME = "eth0"
SANDBOX_IFINDEX = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class NetnsWorker:
    """The one thread that touches namespaces and links, with its host-side netlink socket."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-netns")
        self._host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._ipr: IPRoute | None = None
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` on the worker thread."""
        return self._pool.submit(fn, *args)

    @property
    def ipr(self) -> IPRoute:
        """The host namespace's netlink socket (worker thread only)."""
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        """Stop the thread and close its sockets."""

        def _close() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        with contextlib.suppress(RuntimeError):
            self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)
        os.close(self._host_fd)

    # ------------------------------------------------------------------ jobs (worker thread)

    def make_netns(self, path: str) -> None:
        """A new, empty network namespace kept by a bind mount on ``path`` (a file made here)."""
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        _check(_libc.unshare(CLONE_NEWNET), "unshare a network namespace")
        try:
            _check(
                _libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None),
                f"bind-mount the new network namespace on {path}",
            )
            # runsc copies only interfaces that are up: loopback too (a runc container's runtime brings its own up)
            inner = IPRoute()
            try:
                inner.link("set", index=1, state="up")
            finally:
                inner.close()
        finally:
            _check(_libc.setns(self._host_fd, CLONE_NEWNET), "setns back to the host")

    def setup_sandbox(
        self,
        ns_path: str,
        host_link: str,
        host_index: int,
        ip: ipaddress.IPv4Address,
        gateway: ipaddress.IPv4Address,
    ) -> None:
        """In the namespace at ``ns_path`` (``/proc/<init>/ns/net``, or a gVisor sandbox's): ``eth0`` = ``ip``/32,
        default route via ``gateway``, over a veth.

        The host end is made with ifindex ``host_index`` (chosen by the caller, unique per address) and the
        sandbox end with ifindex 2 (the first after ``lo`` in a fresh namespace), which saves two look-ups
        on the create path; a taken index falls back to the kernel's choice.
        """
        nsfd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(nsfd, CLONE_NEWNET), "setns into the sandbox's network namespace")
            try:
                inner = IPRoute()
            finally:
                _check(_libc.setns(self._host_fd, CLONE_NEWNET), "setns back to the host")
            try:
                index, eth = self._add_veth(host_link, host_index, nsfd)
                self.ipr.addr("add", index=index, address=str(gateway), prefixlen=32)
                self.ipr.route("add", dst=f"{ip}/32", oif=index, prefsrc=str(gateway), scope=RT_SCOPE_LINK)
                inner.addr("add", index=eth, address=str(ip), prefixlen=32)
                inner.link("set", index=eth, state="up")
                inner.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=eth, flags=RTNH_F_ONLINK)
            finally:
                inner.close()
        finally:
            os.close(nsfd)

    def _add_veth(self, host_link: str, host_index: int, nsfd: int) -> tuple[int, int]:
        """Create the pair; returns (host ifindex, sandbox ifindex)."""
        peer = {"ifname": SANDBOX_IFNAME, "net_ns_fd": nsfd, "index": SANDBOX_IFINDEX}
        try:
            self.ipr.link("add", ifname=host_link, kind="veth", state="up", index=host_index, peer=peer)
            return host_index, SANDBOX_IFINDEX
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        # An index (or the name, of a link the kernel is still destroying) is taken: let the kernel choose.
        self.delete_link(host_link)
        self.ipr.link(
            "add", ifname=host_link, kind="veth", state="up", peer={"ifname": SANDBOX_IFNAME, "net_ns_fd": nsfd}
        )
        index = self.ipr.link("get", ifname=host_link)[0]["index"]
        _check(_libc.setns(nsfd, CLONE_NEWNET), "setns into the sandbox's network namespace")
        try:
            with IPRoute() as inner:
                eth = inner.link("get", ifname=SANDBOX_IFNAME)[0]["index"]
        finally:
            _check(_libc.setns(self._host_fd, CLONE_NEWNET), "setns back to the host")
        return int(index), int(eth)

    def delete_link(self, name: str) -> None:
        """Delete a host link by name if it exists."""
        try:
            self.ipr.link("del", ifname=name)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise

    def link_names(self, prefix: str) -> list[str]:
        """Host links whose names start with ``prefix``."""
        names = []
        for msg in self.ipr.get_links():
            name = msg.get_attr("IFLA_IFNAME")
            if isinstance(name, str) and name.startswith(prefix):
                names.append(name)
        return names

    def ensure_anchor(self, name: str, gateway: ipaddress.IPv4Address) -> None:
        """An empty bridge ``name`` holding ``gateway``/32, up: reserves the subnet, hosts the DNS forwarder.

        A bridge without ports rather than a dummy link: the dummy driver is not on every kernel (not here).
        """
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            self.ipr.link("add", ifname=name, kind="bridge")
            found = self.ipr.link_lookup(ifname=name)
        index = found[0]
        try:
            self.ipr.addr("add", index=index, address=str(gateway), prefixlen=32)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        self.ipr.link("set", index=index, state="up")

    def host_ipv4_networks(self, skip_prefix: str = "") -> list[ipaddress.IPv4Network]:
        """The IPv4 networks of every host address and route (links named ``skip_prefix*`` aside)."""
        skip: set[int] = set()
        if skip_prefix:
            for msg in self.ipr.get_links():
                name = msg.get_attr("IFLA_IFNAME")
                if isinstance(name, str) and name.startswith(skip_prefix):
                    skip.add(int(msg["index"]))
        nets: list[ipaddress.IPv4Network] = []
        for msg in self.ipr.get_addr(family=2):
            if int(msg["index"]) in skip:
                continue
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                nets.append(ipaddress.IPv4Network(f"{addr}/{msg['prefixlen']}", strict=False))
        for msg in self.ipr.get_routes(family=2, table=254):
            dst = msg.get_attr("RTA_DST")
            oif = msg.get_attr("RTA_OIF")
            if dst and (oif is None or int(oif) not in skip):
                nets.append(ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False))
        return nets

    def set_sysctl(self, name: str, value: str) -> str:
        """Write a sysctl of the host's namespace (``net.ipv4.ip_forward``); returns the old value."""
        path = Path("/proc/sys") / name.replace(".", "/")
        old = path.read_text().strip()
        if old != value:
            path.write_text(value)
        return old

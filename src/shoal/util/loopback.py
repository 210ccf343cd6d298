"""Loopback listeners of the daemon besides its API (the gateway, the dashboard): their HOST:PORT, and a socket
bound to it, or to any free port when that one is taken."""

from __future__ import annotations

import logging
import socket

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def split(address: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of a loopback address; ValueError naming ``what`` otherwise."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT for the {what}, not {address!r}")
    if host not in LOOPBACK:
        raise ValueError(f"the {what} listens on loopback only (127.0.0.1 or ::1), not {host!r}")
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def listen(host: str, port: int, what: str, log: logging.Logger) -> tuple[socket.socket, str]:
    """A listening TCP socket on ``host:port`` (any free port if taken, said in ``log``) with TCP_NODELAY for the
    connections it accepts, and its URL base (``http://host:port``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    try:
        sock.bind((host, port))
    except OSError as exc:
        log.warning("%s: %s:%d is taken (%s); listening on another port", what, host, port, exc)
        sock.bind((host, 0))
    sock.listen(128)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}"

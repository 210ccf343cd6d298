"""``Probe``: when a sandbox counts as ready (Modal's ``modal.Probe``), for ``Sandbox.create(readiness_probe=)``.

The daemon runs the probe inside the sandbox while someone waits in ``sb.wait_until_ready()``, every
``interval_ms`` until it first succeeds; from then on the sandbox stays ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.exception import InvalidError
from shoal.sdk._checks import check_port


def _interval(interval_ms: object) -> int:
    if not isinstance(interval_ms, int) or isinstance(interval_ms, bool) or interval_ms <= 0:
        raise InvalidError(f"interval_ms must be a positive whole number of milliseconds, got {interval_ms!r}")
    return interval_ms


@dataclass(frozen=True)
class Probe:
    """A readiness check: a TCP port that accepts connections, or a command that exits 0.

    Examples:
        sb = shoal.Sandbox.create(
            "python3", "-m", "http.server", "8000", app=app, readiness_probe=shoal.Probe.with_tcp(8000)
        )
        sb.wait_until_ready()  # returns once something listens on port 8000 inside the sandbox
    """

    tcp_port: int | None = None
    exec_argv: tuple[str, ...] | None = None
    interval_ms: int = 100

    @classmethod
    def with_tcp(cls, port: int, *, interval_ms: int = 100) -> Probe:
        """Ready once a connection to ``port`` on the sandbox's loopback (127.0.0.1 or ::1) succeeds."""
        return cls(tcp_port=check_port(port, "Probe.with_tcp port"), interval_ms=_interval(interval_ms))

    @classmethod
    def with_exec(cls, *argv: str, interval_ms: int = 100) -> Probe:
        """Ready once ``argv``, run in the sandbox like an exec, exits with status 0."""
        if not argv:
            raise InvalidError("Probe.with_exec needs a command: Probe.with_exec('test', '-f', '/tmp/ready')")
        if not all(isinstance(a, str) for a in argv):
            raise InvalidError("Probe.with_exec takes the command's arguments as strings")
        return cls(exec_argv=tuple(argv), interval_ms=_interval(interval_ms))

    def _body(self) -> dict[str, Any]:
        return {
            "tcp_port": self.tcp_port,
            "exec_argv": None if self.exec_argv is None else list(self.exec_argv),
            "interval_ms": self.interval_ms,
        }

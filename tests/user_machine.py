"""A machine set up as the README tells an operator to, for code written for Modal: a daemon with
``--tunnel-domain`` on port 443 (of its own loopback address), a wildcard DNS record for the domain, and
``shoal trust`` run — so unmodified clients reach ``https://{tunnel.host}/``.

Programs run in a private mount namespace whose ``/etc/resolv.conf`` names the test's DNS server and whose trust
store is a copy: the host's own files are never changed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import Daemon, running_daemon
from tests.netkit import DnsServer

BIND = "127.0.0.44"
DOMAIN = "sb.shoal.test"

RUN_AS_MODAL = (
    "import runpy, sys, shoal; shoal.install_as_modal(); sys.argv = sys.argv[1:];"
    " runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""``python -c RUN_AS_MODAL program.py args…``: a program as written for Modal, ``import modal`` meaning shoal."""


@dataclass
class UserMachine:
    daemon: Daemon
    root: Path

    def run(
        self, argv: list[str], timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` as a user of this machine would, after ``shoal trust`` and with its printed exports."""
        script = f"""
set -e
mount --make-rprivate /
mount --bind {self.root}/resolv.conf /etc/resolv.conf
mount --bind {self.root}/hosts /etc/hosts
mount --bind {self.root}/certs /etc/ssl/certs
mount --bind {self.root}/local /usr/local/share/ca-certificates
{sys.executable} -m shoal trust > {self.root}/trust.out
eval "$(grep ^export {self.root}/trust.out | sed 's/  #.*//')"
exec "$@"
"""
        full_env = {
            **os.environ,
            "SHOAL_RUNTIME_DIR": str(self.daemon.runtime_dir),
            "SHOAL_NO_AUTOSTART": "1",
            **(env or {}),
        }
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", *argv],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def run_as_modal(self, program: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a program written for Modal, unchanged, with ``modal`` resolving to shoal."""
        return self.run([sys.executable, "-c", RUN_AS_MODAL, str(program), *args], timeout=timeout)


@contextlib.contextmanager
def user_machine() -> Iterator[UserMachine]:
    dns = DnsServer(address=BIND, port=53, zones={DOMAIN: BIND})
    try:
        with running_daemon() as d, tempfile.TemporaryDirectory(prefix="shoal-user-") as tmp:
            d.stop()
            d.env["SHOAL_TUNNEL_BIND"] = BIND
            d.start("--tunnel-domain", DOMAIN)
            root = Path(tmp)
            (root / "resolv.conf").write_text(f"nameserver {BIND}\n")
            (root / "hosts").write_text("127.0.0.1 localhost\n")
            shutil.copytree("/etc/ssl/certs", root / "certs", symlinks=True)
            shutil.copytree("/usr/local/share/ca-certificates", root / "local", symlinks=True)
            yield UserMachine(d, root)
    finally:
        dns.close()

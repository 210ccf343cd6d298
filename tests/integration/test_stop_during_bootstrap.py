"""A daemon stopped while it bootstraps the base image stops at once and takes the bootstrap with it.

On a machine whose image store is empty, the first daemon's warm pool asks for the base image and
``mmdebstrap`` runs for a minute or more.  A stop must not wait for it, nor leave it running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, proc_files


def _processes_under(path: Path) -> dict[int, str]:
    """Processes whose command line names ``path`` (the bootstrap and what it runs in the staging dir)."""
    needle = str(path).encode()
    return {
        pid: cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
        for pid, cmd in proc_files("cmdline")
        if needle in cmd
    }


def _end_leftovers(staging: Path) -> None:
    """Whatever a failed run left: the bootstrap (SIGTERM first, so it unmounts its chroot) and its mounts."""
    for pid in _processes_under(staging):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _processes_under(staging) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _processes_under(staging):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(str(staging) + "/")), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)


def test_a_stop_during_the_base_image_bootstrap_ends_it(own_daemon: Daemon) -> None:
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (make setup installs it): no bootstrap to interrupt")
    own_daemon.stop()
    own_daemon.env.pop("SHOAL_IMAGE_CACHE", None)  # an empty image store: the pool asks for a bootstrap
    own_daemon.start()
    staging = own_daemon.data_dir / "images" / "tmp"
    try:
        deadline = time.monotonic() + 60
        while not _processes_under(staging) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_under(staging), "the warm pool did not start bootstrapping the base image"
        time.sleep(2)  # let it start apt and dpkg

        assert own_daemon.proc is not None
        started = time.monotonic()
        own_daemon.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            own_daemon.proc.wait(30)
        stopped_in = time.monotonic() - started

        assert own_daemon.proc.returncode == 0, (
            f"no clean stop in {stopped_in:.1f} s: {own_daemon.log.read_text()[-2000:]}"
        )
        assert stopped_in < 20, f"the daemon took {stopped_in:.1f} s to stop"
        deadline = time.monotonic() + 10
        while _processes_under(staging) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_under(staging) == {}, "the bootstrap outlived the daemon"
        assert [p.name for p in staging.iterdir()] == [], "a half-built layer was left in the staging directory"
    finally:
        if own_daemon.proc is not None and own_daemon.proc.poll() is None:
            own_daemon.proc.kill()
            own_daemon.proc.wait(10)
        _end_leftovers(staging)

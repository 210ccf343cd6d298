"""What a sandbox's network needs inside its root and from the host: /etc/resolv.conf and /etc/hosts
written beneath the root without following its links, and the host pid of its init."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from shoal.runtime import cgroups

log = logging.getLogger("shoal.network.service")

HOSTNAME = "sandbox"


def init_pid(cgroup_path: str) -> int:
    """The host pid of a container's init (pid 1 in its namespace), found through its cgroup."""
    for pid in cgroups.processes(cgroup_path):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and line.split()[-1] == "1":
                return pid
    raise RuntimeError(f"the sandbox's init process is not in its cgroup {cgroup_path}")


def write_etc(root: Path, ip: str, owner: int, nameserver: str) -> None:
    """Write /etc/resolv.conf and /etc/hosts into a sandbox's root, owned by its root user.

    /etc/hostname stays the image's (the UTS name is set by the runtime).

    The image is untrusted: /etc or the files may be symlinks pointing
    anywhere, so nothing is followed (``O_NOFOLLOW`` from a descriptor of the
    root); a symlink where a file should be is replaced.  When /etc itself is
    not a plain directory, the files are skipped.
    """
    files = {
        "resolv.conf": f"nameserver {nameserver}\noptions edns0\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{HOSTNAME}\n",
    }
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            etc = os.open("etc", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        except FileNotFoundError:
            os.mkdir("etc", 0o755, dir_fd=root_fd)
            os.chown("etc", owner, owner, dir_fd=root_fd, follow_symlinks=False)
            os.chmod("etc", 0o755, dir_fd=root_fd)  # just made, before the sandbox runs; not the daemon's umask
            etc = os.open("etc", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        except OSError:
            log.warning("the image's /etc is not a directory; leaving its resolver files alone")
            return
        try:
            for name, text in files.items():
                try:
                    _write_one(etc, name, text, owner)
                except OSError as exc:
                    log.warning("cannot write the sandbox's /etc/%s: %s", name, exc)
        finally:
            os.close(etc)
    finally:
        os.close(root_fd)


def _write_one(etc: int, name: str, text: str, owner: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(name, dir_fd=etc, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            os.unlink(name, dir_fd=etc)  # a symlink or device the image put there; a directory stays and fails
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=etc)
    try:
        os.write(fd, text.encode())
        os.fchown(fd, owner, owner)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)

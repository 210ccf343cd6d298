"""What a sandbox's network needs inside its root and from the host: /etc/resolv.conf and /etc/hosts
written beneath the root without following its links, and the host pid of its init."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from shoal.runtime import cgroups
from shoal.util import safefs

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


def _write_one(etc: int, name: str, text: str | bytes, owner: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(name, dir_fd=etc, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            os.unlink(name, dir_fd=etc)  # a symlink or device the image put there; a directory stays and fails
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=etc)
    try:
        data = memoryview(text.encode() if isinstance(text, str) else text)
        while data:
            data = data[os.write(fd, data) :]
        os.fchown(fd, owner, owner)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)


SYSTEM_BUNDLE = ("etc", "ssl", "certs", "ca-certificates.crt")
"""The CA bundle OpenSSL reads by default on Debian, Ubuntu and Alpine (beneath a sandbox's root)."""
SHOAL_BUNDLE = ("etc", "shoal", "ca-certificates.crt")
"""Where shoal puts an outbound-policy sandbox's bundle, whatever the image holds at ``SYSTEM_BUNDLE``."""


def write_trust(root: Path, extra_pem: bytes, fallback: bytes, owner: int, limit: int) -> None:
    """Give a sandbox a CA bundle that also trusts ``extra_pem``: the image's own bundle (or ``fallback``, the
    host's, when the image has none) plus it, at ``SHOAL_BUNDLE`` and, when that path is a plain file or
    missing beneath plain directories, at ``SYSTEM_BUNDLE`` too.  Nothing the image put there is followed."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        own = _read_plain(root_fd, SYSTEM_BUNDLE, limit)
        text = (own if own is not None else fallback).rstrip(b"\n")
        text += b"\n# shoal egress CA (the sandbox's outbound policy)\n" + extra_pem
        for path in (SHOAL_BUNDLE, SYSTEM_BUNDLE):
            try:
                fd = safefs.make_dirs(root_fd, list(path[:-1]), owner, owner)
            except OSError as exc:
                log.warning("cannot write the sandbox's /%s: %s", "/".join(path), exc)
                continue
            try:
                _write_one(fd, path[-1], text, owner)
            except OSError as exc:
                log.warning("cannot write the sandbox's /%s: %s", "/".join(path), exc)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


def _read_plain(root_fd: int, path: tuple[str, ...], limit: int) -> bytes | None:
    """A regular file's first ``limit`` bytes beneath the root, or None if a step is missing, a link or odd."""
    fd = os.dup(root_fd)
    try:
        for name in path[:-1]:
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        file_fd = os.open(path[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        try:
            if not stat.S_ISREG(os.fstat(file_fd).st_mode):
                return None
            with os.fdopen(os.dup(file_fd), "rb") as f:
                return f.read(limit)
        finally:
            os.close(file_fd)
    except OSError:
        return None
    finally:
        os.close(fd)

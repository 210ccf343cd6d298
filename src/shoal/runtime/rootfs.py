"""A sandbox's root filesystem: an overlay of read-only image layers and its own upper directory.

The mount is made in the daemon's (host) mount namespace, so it outlives a
daemon restart and the re-adopted sandbox keeps its files.  Upper and work
directories belong to the sandbox's root user (the mapped host uid), so root
in the sandbox owns its ``/``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MNT_DETACH = 2
MS_NOSUID = 2
MS_NODEV = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    """mount(2), raising OSError with the kernel's errno."""
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def unmount(target: str) -> None:
    """Lazily unmount ``target``; no error if nothing is mounted there."""
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def is_mounted(target: str) -> bool:
    """Whether ``target`` is a mount point in this namespace."""
    real = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def mount_overlay(lowers: list[str], upper: str, work: str, target: str, owner: int) -> None:
    """Mount an overlay of ``lowers`` (topmost first) with a writable ``upper`` at ``target``.

    ``nosuid,nodev``: the host sees this mount, and a set-id file or device node a sandbox made must mean
    nothing there.  Inside, the sandbox runs with no-new-privileges, so set-id bits meant nothing anyway.
    """
    prepare_upper(upper, work, target, owner)
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in [*lowers, os.path.dirname(upper)]]
    try:
        mount_overlay_fds(fds[:-1], fds[-1], os.path.basename(upper), os.path.basename(work), target)
    finally:
        for fd in fds:
            os.close(fd)


def prepare_upper(upper: str, work: str, target: str, owner: int) -> None:
    """Make an overlay's directories; ``upper`` owned by ``owner`` and ``work`` beside it (the overlay wants
    them on one mount)."""
    if os.path.dirname(work) != os.path.dirname(upper):
        raise ValueError("upper and work must be in one directory")
    for d in (upper, work, target):
        os.makedirs(d, exist_ok=True)
    os.chown(upper, owner, owner)
    os.chmod(upper, 0o755)


def mount_overlay_fds(lowers: list[int], data: int, upper: str, work: str, target: str) -> None:
    """Mount at ``target`` an overlay of the directories open as ``lowers`` (topmost first), with ``upper`` and
    ``work`` named inside the directory open as ``data``.

    The layers are named to the kernel as ``/proc/self/fd/N``: the overlay keeps those strings for the mount
    table, and every reader of ``/proc/*/mountinfo`` (runc reads it on each call) pays for its length per
    sandbox.  The descriptors may be detached mount trees (``open_tree``); the caller closes them after.
    """
    opts = (
        f"lowerdir={':'.join(f'/proc/self/fd/{fd}' for fd in lowers)},upperdir=/proc/self/fd/{data}/{upper},"
        f"workdir=/proc/self/fd/{data}/{work},redirect_dir=off,index=off,xino=off"
    )
    mount("overlay", target, "overlay", MS_NOSUID | MS_NODEV, opts)

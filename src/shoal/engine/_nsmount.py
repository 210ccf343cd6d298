"""Mount an image into a running sandbox's mount namespace, or take one out (a helper program, stdlib only).

Run by the daemon as ``python -I -S _nsmount.py mount|umount ...`` with a
pidfd of one of the sandbox's processes at descriptor 3.  It is a separate
program because ``setns(CLONE_NEWNS)`` needs a single-threaded caller, and
the daemon has threads.

``mount``: in a private mount namespace of its own (nothing it mounts is ever
visible on the host, and everything goes away when it exits), mount the
overlay of the image's layers with the mount's upper directory, clone that
mount (``open_tree``), enter the sandbox's mount namespace through the pidfd
and attach the clone at the target (``move_mount``), creating missing
directories owned by the sandbox's root.  ``umount``: enter the namespace and
lazily detach what is mounted at the target.

Trust: the sandbox's filesystem is hostile.  Once in its namespace, the
helper's root is the sandbox's root, so nothing resolves to a host path; the
target is walked one component at a time with ``O_NOFOLLOW`` (a symlink in it
is refused rather than followed, which also keeps /proc's magic links out),
and the mount is attached on the directory that walk opened, never on a path
resolved a second time.  The daemon checks the path's shape before (absolute,
not ``/``, not under /proc, /sys, /dev or /.shoal).

Exit status: 0 done; 2 the target is not usable (message on stderr); 1 other
failures.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOVE_MOUNT_T_EMPTY_PATH = 0x00000040
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x00100000
PIDFD = 3
MAPPING_FD = 4
"""Optional: the sandbox's storage id-mapping (a user namespace); the layers and upper directory are then
mounted through id-mapped clones, as its root is (``shoal.runtime.idmap``)."""

_libc = ctypes.CDLL(None, use_errno=True)


class TargetError(Exception):
    """The target path cannot take the mount."""


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _enter(pidfd: int) -> None:
    """Join the sandbox's mount namespace; root and working directory become its root."""
    _check(_libc.setns(pidfd, CLONE_NEWNS), "setns into the sandbox's mount namespace")
    os.chdir("/")


def _walk(path: str, create: bool, owner: int) -> int:
    """An ``O_PATH`` descriptor of directory ``path``, walked without following symlinks; creates missing parts."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in [p for p in path.split("/") if p]:
        if part in (".", ".."):
            raise TargetError(f"{path!r} must not contain '.' or '..'")
        try:
            nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise TargetError(f"{path} does not exist in the sandbox") from None
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass  # raced with the sandbox: open whatever is there now
            else:
                os.chown(part, owner, owner, dir_fd=fd, follow_symlinks=False)
            nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise TargetError(f"{path}: {part!r} is not a directory (symlinks are not followed)") from None
            raise
        os.close(fd)
        fd = nfd
    return fd


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _idmapped_clone(source: str, point: str, read_only: bool) -> None:
    tree = _check(_libc.syscall(SYS_OPEN_TREE, -100, source.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC), "open_tree")
    attr = _MountAttr(MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if read_only else 0), 0, 0, MAPPING_FD)
    _check(
        _libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)),
        "mount_setattr(MOUNT_ATTR_IDMAP)",
    )
    os.makedirs(point, exist_ok=True)
    _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", -100, point.encode(), MOVE_MOUNT_F_EMPTY_PATH), "move_mount")
    os.close(tree)


def _idmapped_options(stage: str, overlay_options: str) -> str:
    """Clone the overlay's layers (read-only) and its upper and work directories' parent through the id-mapping,
    under ``stage``; the options rewritten to use the clones."""
    opts: dict[str, str] = {}
    for option in overlay_options.split(","):
        key, _, value = option.partition("=")
        opts[key] = value
    lowers = []
    for i, lower in enumerate(opts["lowerdir"].split(":")):
        point = os.path.join(stage, f"l{i}")
        _idmapped_clone(lower, point, read_only=True)
        lowers.append(point)
    data = os.path.dirname(opts["upperdir"])
    if os.path.dirname(opts["workdir"]) != data:
        raise OSError(errno.EINVAL, "upperdir and workdir must share a parent")
    point = os.path.join(stage, "data")
    _idmapped_clone(data, point, read_only=False)
    opts["lowerdir"] = ":".join(lowers)
    opts["upperdir"] = os.path.join(point, os.path.basename(opts["upperdir"]))
    opts["workdir"] = os.path.join(point, os.path.basename(opts["workdir"]))
    return ",".join(f"{k}={v}" if v else k for k, v in opts.items())


def do_mount(target: str, owner: int, stage: str, overlay_options: str) -> None:
    """Mount the overlay described by ``overlay_options`` at ``target`` in the sandbox."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare a private mount namespace")
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    try:
        os.fstat(MAPPING_FD)
    except OSError:
        pass
    else:
        overlay_options = _idmapped_options(stage, overlay_options)
        stage = os.path.join(stage, "m")
        os.makedirs(stage, exist_ok=True)
    _mount("overlay", stage, "overlay", 0, overlay_options)
    tree = _check(
        _libc.syscall(SYS_OPEN_TREE, -100, stage.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
        "open_tree",
    )
    _enter(PIDFD)
    dest = _walk(target, create=True, owner=owner)
    _check(
        _libc.syscall(SYS_MOVE_MOUNT, tree, b"", dest, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        f"move_mount onto {target}",
    )


def do_umount(target: str) -> None:
    """Detach whatever is mounted at ``target`` in the sandbox (no error when nothing is)."""
    _enter(PIDFD)
    os.close(_walk(target, create=False, owner=0))
    rc = _libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW)
    if rc != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(rc, f"umount {target}")


def main(argv: list[str]) -> int:
    """``mount TARGET OWNER STAGE OPTIONS`` or ``umount TARGET``."""
    os.umask(0o022)  # directories made in the sandbox get the usual modes, not the daemon's umask
    try:
        if argv[:1] == ["mount"] and len(argv) == 5:
            do_mount(argv[1], int(argv[2]), argv[3], argv[4])
        elif argv[:1] == ["umount"] and len(argv) == 2:
            do_umount(argv[1])
        else:
            print("usage: _nsmount.py mount TARGET OWNER STAGE OPTIONS | umount TARGET", file=sys.stderr)
            return 1
    except TargetError as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

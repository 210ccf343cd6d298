"""Independent sandboxes (issue 13): every sandbox runs in its own host uid/gid range.

Root in a sandbox is host id ``B = 1048576 + slot * 65536`` and the sandbox's 65536 ids follow it, so what the
kernel counts per user (inotify instances, keys, processes) is counted per sandbox: one sandbox that uses up
its share leaves the others, and the host, theirs.  Files still reach the disk in the one shared range (sandbox
uid ``x`` is host ``100000 + x``) through idmapped mounts, so a volume or an image written by one sandbox shows
the same owners in every other.  Slots are stored with each sandbox, so a daemon killed with ``-9`` and
restarted never hands a running sandbox's range to a new one.

Each test plays what a user would check from inside the sandboxes (``/proc/self/uid_map``, ``stat``, whether a
process can still be started), and where it can, what the host holds (process owners, file owners on disk).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import shoal
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.conftest import DEFAULT_RUNTIME, Daemon, proc_files

pytestmark = pytest.mark.skipif(
    DEFAULT_RUNTIME == "gvisor",
    reason="host uid ranges per sandbox are runc's (decision 0063): a gVisor sandbox's processes are its Sentry's, "
    "which counts them itself, and its files go to the shared range through the gofer (decision 0069)",
)

FIRST_SANDBOX_ID = 1048576
IDS_PER_SANDBOX = 65536
SHARED_BASE = 100000
"""Sandbox uid ``x`` is stored on disk (volumes, image layers) as host uid ``SHARED_BASE + x``."""
AS_USER = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--"]


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def sandboxes(app) -> Iterator[Callable[..., shoal.Sandbox]]:  # type: ignore[no-untyped-def]
    """``new(**kwargs)`` makes a sandbox of the session's app; every one is terminated at the test's end."""
    made: list[shoal.Sandbox] = []

    def new(**kwargs: object) -> shoal.Sandbox:
        sb = shoal.Sandbox.create(app=app, timeout=180, **kwargs)  # type: ignore[arg-type]
        made.append(sb)
        return sb

    try:
        yield new
    finally:
        for sb in made:
            sb.terminate()


def run(sb: shoal.Sandbox, *argv: str) -> tuple[int, str, str]:
    p = sb.exec(*argv)
    rc = p.wait()
    return rc, p.stdout.read(), p.stderr.read()


def sh(sb: shoal.Sandbox, script: str) -> str:
    """Run a shell script in the sandbox as root; its stdout (a failure shows the script and its stderr)."""
    rc, out, err = run(sb, "sh", "-c", script)
    assert rc == 0, f"{script!r} exited {rc} in {sb.object_id}: {err.strip()}"
    return out


def id_map(sb: shoal.Sandbox, which: str = "uid_map") -> list[tuple[int, int, int]]:
    """The lines of ``/proc/self/<which>`` inside the sandbox: (inside, host, count)."""
    out = sh(sb, f"cat /proc/self/{which}")
    lines = []
    for line in out.splitlines():
        inside, host, count = (int(x) for x in line.split())
        lines.append((inside, host, count))
    return lines


def sandbox_range(sb: shoal.Sandbox) -> int:
    """The sandbox's first host id B, after checking uid_map and gid_map are the one line ``0 B 65536``."""
    uids, gids = id_map(sb, "uid_map"), id_map(sb, "gid_map")
    assert len(uids) == 1, f"{sb.object_id}: uid_map should be one line, is {uids}"
    inside, base, count = uids[0]
    assert (inside, count) == (0, IDS_PER_SANDBOX), f"{sb.object_id}: uid_map is {uids}, not '0 B 65536'"
    assert base >= FIRST_SANDBOX_ID, (
        f"{sb.object_id}: root maps to host uid {base}, not to a range of its own (>= {FIRST_SANDBOX_ID})"
    )
    assert (base - FIRST_SANDBOX_ID) % IDS_PER_SANDBOX == 0, f"{sb.object_id}: {base} is not a slot's start"
    assert gids == uids, f"{sb.object_id}: gid_map {gids} differs from uid_map {uids}"
    return base


def assert_disjoint(a: int, b: int, what: str) -> None:
    assert a + IDS_PER_SANDBOX <= b or b + IDS_PER_SANDBOX <= a, (
        f"{what}: ranges [{a}, {a + IDS_PER_SANDBOX}) and [{b}, {b + IDS_PER_SANDBOX}) overlap"
    )


def host_pids(daemon: Daemon, sb: shoal.Sandbox) -> set[int]:
    """Host pids of the sandbox's processes (those in its cgroup)."""
    marker = f"{daemon.cgroup_parent.rstrip('/')}/{sb.object_id}".encode()
    return {pid for pid, cgroups in proc_files("cgroup") if marker in cgroups}


def host_ids(pid: int) -> tuple[set[int], set[int]]:
    """(real, effective, saved, fs uids) and the same gids of a host process, as sets."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(ln for ln in status if ln.startswith("Uid:")).split()[1:]
    gid = next(ln for ln in status if ln.startswith("Gid:")).split()[1:]
    return {int(x) for x in uid}, {int(x) for x in gid}


def pids_events(daemon: Daemon, sb: shoal.Sandbox) -> Path | None:
    """The sandbox's cgroup ``pids.events`` (v1 or v2), or None if neither is found."""
    rel = Path(daemon.cgroup_parent.strip("/")) / sb.object_id
    for d in (Path("/sys/fs/cgroup/pids") / rel, Path("/sys/fs/cgroup") / rel):
        if (d / "pids.events").exists():
            return d / "pids.events"
    return None


def wait_until(predicate: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- the ranges


def test_each_sandbox_has_a_uid_range_of_its_own(daemon, sandboxes):
    """uid_map and gid_map hold one line ``0 B 65536`` with B past the shared on-disk range, two sandboxes'
    ranges do not overlap, root inside is still uid 0, and on the host the sandbox's processes run as B."""
    a, b = sandboxes(), sandboxes()
    base_a, base_b = sandbox_range(a), sandbox_range(b)
    assert_disjoint(base_a, base_b, f"{a.object_id} and {b.object_id}")
    for sb in (a, b):
        assert sh(sb, "id -u; id -g") == "0\n0\n", f"{sb.object_id}: root inside is not uid/gid 0"
        # A user other than root is inside the same range: uid 1000 is B + 1000.
        rc, out, err = run(sb, *AS_USER, "cat", "/proc/self/uid_map")
        assert rc == 0, err
        assert out.split() == sh(sb, "cat /proc/self/uid_map").split(), "uid 1000 sees another uid_map than root"
    # What the host sees: every process of a sandbox runs as host ids inside that sandbox's range.
    for sb, base in ((a, base_a), (b, base_b)):
        pids = host_pids(daemon, sb)
        assert pids, f"no host process found in {sb.object_id}'s cgroup"
        for pid in pids:
            try:
                uids, gids = host_ids(pid)
            except (OSError, StopIteration):
                continue  # ended meanwhile
            assert all(base <= u < base + IDS_PER_SANDBOX for u in uids), (
                f"host pid {pid} of {sb.object_id} runs as uids {uids}, outside [{base}, {base + IDS_PER_SANDBOX})"
            )
            assert all(base <= g < base + IDS_PER_SANDBOX for g in gids), (
                f"host pid {pid} of {sb.object_id} runs as gids {gids}, outside [{base}, {base + IDS_PER_SANDBOX})"
            )


# ---------------------------------------------------------------------------------------------- per-user limits

INOTIFY_HOG = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fds, err = [], 0
while len(fds) < int(sys.argv[1]):  # a bound: a missing limit fails the test instead of eating descriptors
    fd = libc.inotify_init1(0)
    if fd < 0:
        err = ctypes.get_errno()
        break
    fds.append(fd)
print(len(fds), err, flush=True)
time.sleep(600)  # keep them open
"""

INOTIFY_ONE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
if fd < 0:
    raise SystemExit("inotify_init1: " + os.strerror(ctypes.get_errno()))
os.close(fd)
print("ok")
"""


def test_inotify_instances_are_counted_per_sandbox(sandboxes):
    """Attack: open inotify instances until the kernel refuses (fs.inotify.max_user_instances, per user).
    Defence: the limit counts the sandbox's own host uid, so another sandbox and the host can still open one."""
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    a, b = sandboxes(), sandboxes()
    hog = a.exec("python3", "-c", INOTIFY_HOG, str(4 * limit + 1000), bufsize=1)
    first = next(iter(hog.stdout), "")
    assert first, f"the inotify hog in {a.object_id} printed nothing: {hog.stderr.read()}"
    got, err = (int(x) for x in first.split())
    assert err == errno.EMFILE, f"inotify_init1 in {a.object_id} stopped after {got} with errno {err}, not EMFILE"
    assert got >= 100, f"sandbox {a.object_id} got only {got} inotify instances (limit {limit} per user)"
    assert got <= limit, f"sandbox {a.object_id} got {got} inotify instances, past the per-user limit {limit}"
    assert hog.poll() is None, "the hog should still hold its instances"

    # Another sandbox: its own count.
    rc, out, err_text = run(b, "python3", "-c", INOTIFY_ONE)
    assert (rc, out) == (0, "ok\n"), f"sandbox {b.object_id} could not open an inotify instance: {err_text.strip()}"
    # The host's root: untouched.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    assert fd >= 0, f"the host could not open an inotify instance: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    # The hog's sandbox itself is still at its limit (the test measured what it meant to).
    rc, out, _ = run(a, "python3", "-c", INOTIFY_ONE)
    assert rc != 0, f"{a.object_id} could open yet another inotify instance: the hog did not reach the limit"


def test_a_fork_bomb_leaves_other_sandboxes_able_to_fork(daemon, sandboxes):
    """Attack: a fork bomb in one sandbox. Defence: it stops at its own limits; another sandbox still starts
    processes, as root and as uid 1000."""
    a, b = sandboxes(), sandboxes()
    a.exec("bash", "-c", "exec >/dev/null 2>&1 </dev/null; timeout 20 bash -c ':(){ :|:& };:'")
    events = pids_events(daemon, a)
    if events is not None:
        wait_until(lambda: int(events.read_text().split()[1]) > 0, f"the bomb in {a.object_id} reaches its limit")
    else:
        time.sleep(3)
    assert len(host_pids(daemon, a)) >= 100, f"the bomb in {a.object_id} did not take off"

    forks = "for i in $(seq 50); do true & done; wait; echo ok"
    rc, out, err = run(b, "bash", "-c", forks)
    assert (rc, out) == (0, "ok\n"), f"root in {b.object_id} could not fork while {a.object_id} bombs: {err.strip()}"
    rc, out, err = run(b, *AS_USER, "bash", "-c", forks)
    assert (rc, out) == (0, "ok\n"), f"uid 1000 in {b.object_id} could not fork while {a.object_id} bombs: {err}"
    a.terminate()
    wait_until(lambda: not host_pids(daemon, a), f"every process of {a.object_id} is gone")


# ---------------------------------------------------------------------------------------------- shared files


def test_a_volume_keeps_its_owners_across_sandboxes(daemon, sandboxes):
    """Files a sandbox writes to a volume as root and as uid 1000 are stored on disk as 100000 and 101000, and
    a later sandbox in another range sees them as 0 and 1000 and can write them as those users."""
    with shoal.Volume.ephemeral() as vol:
        mounted: list[shoal.Sandbox] = []
        try:
            _volume_owners(daemon, sandboxes, vol, mounted)
        finally:
            for sb in mounted:  # before the volume goes away
                sb.terminate()


def _volume_owners(
    daemon: Daemon, sandboxes: Callable[..., shoal.Sandbox], vol: shoal.Volume, mounted: list[shoal.Sandbox]
) -> None:
    """The volume test's body; every sandbox it makes goes into ``mounted``."""
    a = sandboxes(volumes={"/data": vol})
    mounted.append(a)
    base_a = id_map(a)[0][1]
    sh(a, "chmod 1777 /data && echo r > /data/root.txt")
    rc, _, err = run(a, *AS_USER, "sh", "-c", "echo u > /data/user.txt")
    assert rc == 0, f"uid 1000 in {a.object_id} could not write to the volume: {err.strip()}"
    assert sh(a, "stat -c %u:%g /data/root.txt /data/user.txt") == "0:0\n1000:1000\n"
    a.terminate()

    b = sandboxes(volumes={"/data": vol})
    mounted.append(b)
    base_b = id_map(b)[0][1]
    assert sh(b, "stat -c %u:%g /data/root.txt /data/user.txt") == "0:0\n1000:1000\n", (
        f"a sandbox in another range (host {base_b}, the writer was {base_a}) sees other owners"
    )
    assert sh(b, "cat /data/root.txt /data/user.txt") == "r\nu\n"
    sh(b, "echo r2 >> /data/root.txt && echo b >> /data/user.txt")
    rc, _, err = run(b, *AS_USER, "sh", "-c", "echo u2 >> /data/user.txt && echo n > /data/new.txt")
    assert rc == 0, f"uid 1000 in {b.object_id} could not write its own file of the volume: {err.strip()}"
    rc, _, _ = run(b, *AS_USER, "sh", "-c", "echo x >> /data/root.txt")
    assert rc != 0, "uid 1000 could append to root's 0644 file: the owners are not what they seem"
    assert sh(b, "cat /data/root.txt /data/user.txt") == "r\nr2\nu\nb\nu2\n"
    assert sh(b, "stat -c %u:%g /data/root.txt /data/user.txt /data/new.txt") == "0:0\n1000:1000\n1000:1000\n"

    # On the host's disk: the shared range, whichever sandbox wrote.
    content = daemon.data_dir / "volumes" / vol.object_id / "root"
    assert content.is_dir(), f"volume content not found at {content}"
    owners = {name: (os.lstat(content / name).st_uid, os.lstat(content / name).st_gid) for name in os.listdir(content)}
    assert owners == {
        "root.txt": (SHARED_BASE, SHARED_BASE),
        "user.txt": (SHARED_BASE + 1000, SHARED_BASE + 1000),
        "new.txt": (SHARED_BASE + 1000, SHARED_BASE + 1000),
    }, f"on disk the volume's files are owned by {owners}"


def _layer_paths(daemon: Daemon, image_id: str, rel: str) -> list[Path]:
    """Where ``rel`` lies in the image's layers on the host (top layer first), in this store or its cache."""
    images = run_blocking(default_client().request("GET", "/v1/images"))["images"]
    layers = next(i["layers"] for i in images if i["image_id"] == image_id)
    roots = [daemon.data_dir / "images" / "layers"]
    if cache := daemon.env.get("SHOAL_IMAGE_CACHE"):
        roots.append(Path(cache) / "layers")
    return [r / layer / rel for layer in reversed(layers) for r in roots if os.path.lexists(r / layer / rel)]


def test_snapshots_keep_owners_across_sandboxes(daemon, sandboxes):
    """A file owned by uid 1000 keeps that owner in a sandbox made from a filesystem snapshot, and in a third
    sandbox that mounts a directory snapshot; on disk the layer holds it as 101000."""
    a = sandboxes()
    sh(
        a,
        "set -e; mkdir -p /srv/d; echo f > /srv/f; echo g > /srv/d/g;"
        " chown 1000:1000 /srv/f /srv/d /srv/d/g; chmod 0644 /srv/f",
    )
    image = a.snapshot_filesystem()

    b = sandboxes(image=image)
    assert sh(b, "stat -c %u:%g /srv/f /srv/d /srv/d/g") == "1000:1000\n" * 3, (
        f"a sandbox from the snapshot of {a.object_id} sees other owners"
    )
    rc, _, err = run(b, *AS_USER, "sh", "-c", "echo more >> /srv/f && echo h > /srv/d/h")
    assert rc == 0, f"uid 1000 in {b.object_id} cannot write its own snapshotted files: {err.strip()}"
    assert sh(b, "cat /srv/f; stat -c %u /srv/d/h") == "f\nmore\n1000\n"
    # The layer on disk: the shared range.
    paths = _layer_paths(daemon, image.object_id, "srv/f")
    assert paths, f"srv/f not found in the layers of {image.object_id}"
    st = os.lstat(paths[0])
    assert (st.st_uid, st.st_gid) == (SHARED_BASE + 1000, SHARED_BASE + 1000), (
        f"{paths[0]} is owned by {st.st_uid}:{st.st_gid} on disk"
    )

    directory = a.snapshot_directory("/srv")
    c = sandboxes()
    c.mount_image("/mnt/x", directory)
    assert sh(c, "stat -c %u:%g /mnt/x/f /mnt/x/d /mnt/x/d/g") == "1000:1000\n" * 3, (
        f"a directory snapshot of {a.object_id} mounted in {c.object_id} shows other owners"
    )
    rc, _, err = run(c, *AS_USER, "sh", "-c", "echo c >> /mnt/x/f && cat /mnt/x/f")
    assert rc == 0, f"uid 1000 in {c.object_id} cannot write its own file in the mounted image: {err.strip()}"


# ---------------------------------------------------------------------------------------------- restarts


@pytest.mark.restart
def test_ranges_survive_a_daemon_killed_with_kill_9(own_daemon):
    """A running sandbox keeps its range across ``kill -9`` of the daemon, and the restarted daemon gives a new
    sandbox another range."""
    app = shoal.App.lookup("uid-range-tests", create_if_missing=True)
    a = shoal.Sandbox.create(app=app, timeout=120)
    made = [a]
    try:
        before = id_map(a), id_map(a, "gid_map")
        base_a = sandbox_range(a)
        own_daemon.restart(signal.SIGKILL)
        again = shoal.Sandbox.from_id(a.object_id)
        made.append(again)
        assert sh(again, "echo still here") == "still here\n", f"{a.object_id} did not survive the restart"
        assert (id_map(again), id_map(again, "gid_map")) == before, f"{a.object_id}'s id maps changed"
        b = shoal.Sandbox.create(app=app, timeout=120)
        made.append(b)
        base_b = sandbox_range(b)
        assert_disjoint(base_a, base_b, f"re-adopted {a.object_id} and new {b.object_id}")
        # And the range really is in use by the running one: its processes are still host uid base_a.
        pids = host_pids(own_daemon, again)
        assert pids, f"no host process of {a.object_id} after the restart"
        assert any(base_a in host_ids(pid)[0] for pid in pids), f"no process of {a.object_id} runs as {base_a}"
    finally:
        for sb in made:
            sb.terminate()


def _status() -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        [sys.executable, "-m", "shoal", "status", "--json"], capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_status_shows_the_ranges_and_shared_mode_still_runs(own_daemon):
    """``shoal status`` says how ids are laid out and how many ranges are left; ``--uid-ranges shared`` (decision
    0002's layout, for a data filesystem that cannot id-map) still runs sandboxes, all in the one range."""
    app = shoal.App.lookup("uid-range-tests", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=120)
    try:
        status = _status()
        assert status["uid_ranges"]["mode"] == "per-sandbox"
        assert status["uid_ranges"]["first_host_id"] == FIRST_SANDBOX_ID
        capacity = status["capacity"]
        assert 0 < capacity["uid_slots_left"] < capacity["uid_slots"]  # this sandbox and the warm pool hold some
    finally:
        sb.terminate()
    own_daemon.restart_with("--uid-ranges", "shared", "--warm-pool", "0")
    a = shoal.Sandbox.create(app=app, timeout=120)
    b = shoal.Sandbox.create(app=app, timeout=120)
    try:
        assert id_map(a) == id_map(b) == [(0, SHARED_BASE, IDS_PER_SANDBOX)]
        assert sh(a, "echo x > /root/f && stat -c %u /root/f") == "0\n"
        assert _status()["uid_ranges"]["mode"] == "shared"
    finally:
        a.terminate()
        b.terminate()


def test_ranges_running_out_is_resource_exhausted_and_one_ended_is_free_again(own_daemon):
    """With three ranges, a fourth sandbox is refused naming ``--uid-slots``; ending one frees its range for the
    next, which gets a range no running sandbox has."""
    own_daemon.restart_with("--uid-slots", "3", "--warm-pool", "0")
    app = shoal.App.lookup("uid-range-tests", create_if_missing=True)
    made = [shoal.Sandbox.create(app=app, timeout=120) for _ in range(3)]
    try:
        with pytest.raises(shoal.exception.ResourceExhaustedError, match="--uid-slots"):
            made.append(shoal.Sandbox.create(app=app, timeout=120))
        assert _status()["capacity"]["uid_slots_left"] == 0
        made.pop(0).terminate()
        deadline = time.monotonic() + 30
        while _status()["capacity"]["uid_slots_left"] == 0:  # the range is free once the container is removed
            assert time.monotonic() < deadline, "the ended sandbox's range was never freed"
            time.sleep(0.1)
        made.append(shoal.Sandbox.create(app=app, timeout=120))
        bases = [sandbox_range(sb) for sb in made]
        for i, a in enumerate(bases):
            for b in bases[i + 1 :]:
                assert_disjoint(a, b, "running sandboxes")
    finally:
        for sb in made:
            sb.terminate()

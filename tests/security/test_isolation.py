"""Isolation: what code in a sandbox tries in order to reach the host, and the proof that it fails.

Every test plays an attacker inside a real sandbox (real runc container, no
mocks) and checks, from inside and where possible from the host side too,
that the attempt failed: processes, files, users and capabilities, devices,
kernel interfaces, privileged syscalls, the network, shoal's own sockets,
and resource exhaustion (fork and memory bombs), after which the sandbox and
the daemon must still be usable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import socket
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal
from shoal.exception import SandboxTerminatedError
from shoal.runtime.idmap import FIRST_SANDBOX_ID
from tests.conftest import DEFAULT_RUNTIME, MACHINE_IMAGES, RUNTIMES

# ---------------------------------------------------------------- helpers


def sh(sb, script: str, timeout: int = 60) -> tuple[int, str, str]:
    """Run ``bash -c script`` in the sandbox: (exit code, stdout, stderr)."""
    p = sb.exec("bash", "-c", script, timeout=timeout)
    rc = p.wait()
    return rc, p.stdout.read(), p.stderr.read()


def py(sb, code: str, timeout: int = 60) -> tuple[int, str, str]:
    """Run a Python program in the sandbox: (exit code, stdout, stderr)."""
    p = sb.exec("python3", "-c", code, timeout=timeout)
    rc = p.wait()
    return rc, p.stdout.read(), p.stderr.read()


def py_json(sb, code: str, timeout: int = 60):  # type: ignore[no-untyped-def]
    """Run a Python program that prints one JSON document; return it."""
    rc, out, err = py(sb, code, timeout)
    assert rc == 0, f"probe failed ({rc}): {err}"
    return json.loads(out)


def assert_healthy(sb) -> None:
    """The sandbox is still running and still runs commands."""
    assert sb.poll() is None
    rc, out, _ = sh(sb, "echo alive")
    assert (rc, out) == (0, "alive\n")


def cgroup_dir(daemon, sb, controller: str) -> Path:
    """The sandbox's cgroup (v1) for one controller on the host."""
    return Path("/sys/fs/cgroup") / controller / daemon.cgroup_parent.strip("/") / sb.object_id


def host_pids_of(daemon, sb) -> set[int]:
    """Host pids of every process in the sandbox's cgroup."""
    marker = f"{daemon.cgroup_parent.rstrip('/')}/{sb.object_id}"
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cgroups = (d / "cgroup").read_text()
        except OSError:
            continue
        if any(line.split(":", 2)[-1].startswith(marker) for line in cgroups.splitlines()):
            pids.add(int(d.name))
    return pids


def host_cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def safe_cmdline(pid: int) -> str:
    try:
        return host_cmdline(pid)
    except OSError:
        return ""


def wait_until(predicate, what: str, limit: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is true (a wait for a state, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request) -> str:  # type: ignore[no-untyped-def]
    """Every probe here runs against a runc sandbox and a gVisor one (decision 0069 says where they differ)."""
    return str(request.param)


@pytest.fixture(scope="module")
def shared(app, runtime) -> Iterator[shoal.Sandbox]:  # type: ignore[no-untyped-def]
    """One sandbox for the read-only probes that do not change its state."""
    sb = shoal.Sandbox.create(app=app, runtime=runtime, timeout=600)
    try:
        yield sb
    finally:
        sb.terminate()


@pytest.fixture
def sandbox(app, runtime) -> Iterator[shoal.Sandbox]:  # type: ignore[no-untyped-def]
    """A fresh sandbox of the runtime under test, terminated afterwards."""
    sb = shoal.Sandbox.create(app=app, runtime=runtime, timeout=120)
    yield sb
    sb.terminate()


@pytest.fixture
def default_sandbox(app) -> Iterator[shoal.Sandbox]:  # type: ignore[no-untyped-def]
    """A fresh sandbox of the suite's runtime (for the fork bomb, ~30 s under gVisor: the gVisor sweep has it)."""
    sb = shoal.Sandbox.create(app=app, timeout=120)
    yield sb
    sb.terminate()


# ---------------------------------------------------------------- processes

LIST_PROCS = """
import json, os
procs = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                procs[int(d)] = f.read().replace(b"\\0", b" ").decode().strip()
        except OSError:
            pass
print(json.dumps(procs), flush=True)
import sys; sys.stdin.read()
"""


def test_proc_lists_only_the_sandboxes_own_processes(daemon, app, sandbox, runtime):
    """Attack: enumerate the host's processes (ps, /proc).  Only the sandbox's own are listed, PID 1 is the agent."""
    other = shoal.Sandbox.create(app=app, runtime=runtime, timeout=60)
    try:
        tag = uuid.uuid4().hex
        other.exec("bash", "-c", f"exec -a other-{tag} sleep 300")
        if runtime == "gvisor":
            wait_until(lambda: sh(other, f"pgrep -f other-{tag}")[0] == 0, "other")
        else:
            wait_until(
                lambda: any(f"other-{tag}" in c for c in map(safe_cmdline, host_pids_of(daemon, other))), "other"
            )
        # The lister stays alive (waiting on stdin) while the host counts the sandbox's processes.
        p = sandbox.exec("python3", "-c", LIST_PROCS)
        inside = {int(k): v for k, v in json.loads(next(iter(p.stdout))).items()}
        if runtime == "gvisor":
            # No host process is one of the sandbox's (decision 0069): its agent, its entrypoint (the default
            # one sleeps) and the lister are all there is.
            host = {pid: c for pid, c in inside.items() if pid == 1 or c.startswith(("python3 -c", "sleep "))}
        else:
            host = {pid: safe_cmdline(pid) for pid in host_pids_of(daemon, sandbox)}
        p.stdin.write_eof()
        p.stdin.drain()
        assert p.wait() == 0
    finally:
        other.terminate()

    assert inside[1].startswith("/.shoal/bin/shoal-agent"), inside
    # Exactly the processes of the sandbox's cgroup, no more: same commands, seen under namespace pids.
    assert sorted(inside.values()) == sorted(host.values()), (inside, host)
    everything = " ".join(inside.values())
    assert tag not in everything  # the other sandbox's processes are invisible
    assert "pytest" not in everything and "shoal serve" not in everything
    # Namespace pids are small; the host's large ones do not name the host's processes.
    for host_pid in (os.getpid(), daemon.proc.pid):
        assert inside.get(host_pid) != host_cmdline(host_pid)


NAMESPACES = ("pid", "mnt", "net", "user", "ipc", "uts", "cgroup")


def test_every_namespace_is_the_sandboxes_own(shared, runtime):
    """Attack: share any of the host's namespaces (pid, mount, network, user, ipc, uts, cgroup).  None is shared."""
    # gVisor's kernel has no cgroup namespace: the sandbox sees no cgroup tree at all (decision 0069).
    names = [ns for ns in NAMESPACES if not (runtime == "gvisor" and ns == "cgroup")]
    rc, out, err = sh(shared, "for ns in " + " ".join(names) + "; do readlink /proc/self/ns/$ns; done")
    assert rc == 0, err
    inside = out.split()
    host = [os.readlink(f"/proc/self/ns/{ns}") for ns in names]
    assert [link.split(":")[0] for link in inside] == names
    shared_ns = [ns for ns, i, h in zip(names, inside, host, strict=True) if i == h]
    assert shared_ns == []


def test_ps_shows_agent_as_pid_1_and_nothing_of_the_host(shared):
    """Attack: run ps -e.  PID 1 is the agent, and no host daemon, test runner or kernel thread appears."""
    rc, out, err = sh(shared, "ps -eo pid=,ppid=,comm=")
    assert rc == 0, err
    rows = [line.split(None, 2) for line in out.strip().splitlines()]
    by_pid = {int(pid): (int(ppid), comm) for pid, ppid, comm in rows}
    assert by_pid[1] == (0, "shoal-agent")
    comms = {comm for _, comm in by_pid.values()}
    assert not comms & {"kthreadd", "systemd", "init", "pytest", "runc", "sshd"}, comms
    # Every process descends from the agent: there is no second tree (the host's).
    for pid in by_pid:
        seen = pid
        while seen != 1:
            seen = by_pid[seen][0]
            assert seen in by_pid, f"{pid} has an ancestor outside the sandbox"


def test_cannot_signal_host_or_other_sandbox_processes(daemon, app, shared, runtime):
    """Attack: kill -9 the daemon, the test runner, and another sandbox's process by their host pids."""
    other = shoal.Sandbox.create(app=app, runtime=runtime, timeout=60)
    try:
        victim = other.exec("bash", "-c", "exec -a isolation-victim sleep 300")
        if runtime == "gvisor":
            # The other sandbox's processes are its Sentry's, not the host's: aim at its Sentry and gofer instead.
            wait_until(lambda: sh(other, "pgrep -f isolation-victim")[0] == 0, "the victim runs")
            victim_pids = sorted(host_pids_of(daemon, other))
        else:
            wait_until(
                lambda: any("isolation-victim" in safe_cmdline(p) for p in host_pids_of(daemon, other)),
                "the victim runs",
            )
            victim_pids = [p for p in host_pids_of(daemon, other) if "isolation-victim" in safe_cmdline(p)]
            assert len(victim_pids) == 1
        targets = [daemon.proc.pid, os.getpid(), *victim_pids]
        result = py_json(
            shared,
            f"""
import json, os, signal
out = {{}}
for pid in {targets!r}:
    if os.path.exists(f"/proc/{{pid}}"):  # the same number names one of the sandbox's own processes
        out[pid] = "own"
        continue
    try:
        os.kill(pid, signal.SIGKILL)
        out[pid] = "killed"
    except OSError as e:
        out[pid] = e.errno
print(json.dumps(out))
""",
        )
        assert set(result) == {str(t) for t in targets}
        assert set(result.values()) <= {errno.ESRCH, "own"}, result
        assert errno.ESRCH in result.values(), result  # at least one host pid was really tried
        assert daemon.proc.poll() is None
        assert victim.poll() is None
        assert_healthy(other)
    finally:
        other.terminate()


@pytest.mark.parametrize("signal_name", ["KILL", "TERM", "INT", "HUP", "QUIT", "USR1", "SEGV", "STOP", "CHLD"])
def test_agent_pid_1_survives_signals_from_inside(sandbox, signal_name, runtime):
    """Attack: kill the sandbox's PID 1 (the agent) from inside, to break the daemon's control of the sandbox."""
    if runtime == "gvisor" and signal_name in ("KILL", "STOP"):
        # gVisor's kernel lets root in the sandbox kill or stop its init (decision 0069): the sandbox can end
        # itself, as by killing its entrypoint, but the daemon keeps control of it.
        sandbox.exec("bash", "-c", f"kill -{signal_name} 1")
        if signal_name == "KILL":
            with pytest.raises(SandboxTerminatedError, match="init process died"):
                sandbox.wait()
        else:
            time.sleep(0.5)
            assert sandbox.poll() is None
            assert sandbox.terminate(wait=True) == 137
        return
    rc, out, err = sh(sandbox, f"kill -{signal_name} 1; echo sent=$?")
    assert rc == 0, err
    # The signal "succeeds" from the sender's view but an init does not die of signals from its own namespace.
    assert out == "sent=0\n"
    assert_healthy(sandbox)
    assert sh(sandbox, "cat /proc/1/comm")[1] == "shoal-agent\n"


def test_agent_control_channel_cannot_be_stolen(shared, runtime):
    """Attack: take the agent's control socket to the daemon (inherited fd, pidfd_getfd, ptrace, /proc/1)."""
    if platform.machine() != "x86_64":
        pytest.skip("syscall numbers below are x86_64's")
    result = py_json(
        shared,
        """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
out = {"fds": sorted(int(f) for f in os.listdir("/proc/self/fd"))}
pidfd = libc.syscall(L(434), L(1), L(0))  # pidfd_open(1)
out["pidfd_open"] = pidfd
if pidfd >= 0:
    r = libc.syscall(L(438), L(pidfd), L(3), L(0))  # pidfd_getfd(pidfd, 3)
    out["pidfd_getfd"] = r if r >= 0 else -ctypes.get_errno()
r = libc.ptrace(L(16), L(1), None, None)  # PTRACE_ATTACH
out["ptrace"] = r if r >= 0 else -ctypes.get_errno()
names = ["environ", "mem", "root/", "cwd/"] + [f"fd/{fd}" for fd in os.listdir("/proc/1/fd")]
out["opened"] = {}
for name in names:
    try:
        os.close(os.open(f"/proc/1/{name}", os.O_RDONLY))
        out["opened"][name] = "opened"
    except OSError as e:
        out["opened"][name] = e.errno
print(json.dumps(out))
""",
    )
    # The listing itself opens one descriptor: an exec inherits stdin/stdout/stderr and nothing else.
    assert len(result["fds"]) == 4 and result["fds"][:3] == [0, 1, 2], result
    if runtime == "gvisor":
        assert result["pidfd_open"] == -1  # gVisor's kernel has no pidfd_open (ENOSYS)
    else:
        assert result["pidfd_getfd"] == -errno.EPERM
    assert result["ptrace"] == -errno.EPERM
    assert any(name.startswith("fd/") for name in result["opened"])
    if runtime == "gvisor":
        # gVisor's /proc opens PID 1's environment and pipes to root in the sandbox (same-tenant reach, decision
        # 0069); its memory stays closed and its control socket does not open (ENXIO; test_gvisor.py names it).
        opened = result["opened"]
        assert opened["mem"] in (errno.EACCES, errno.EPERM), opened
        assert errno.ENXIO in opened.values(), opened
        return
    for name, outcome in result["opened"].items():
        assert outcome in (errno.EACCES, errno.EPERM), (name, outcome)


# ---------------------------------------------------------------- files


READ_ATTEMPTS = """
import json, os, sys
secret, name, targets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
found = {}
for path in targets:
    try:
        with open(path, "rb") as f:
            found[path] = "read: " + f.read(200).decode(errors="replace")
    except OSError as e:
        found[path] = e.errno
walk = []
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
    walk += [os.path.join(top, f) for f in files if f == name]
print(json.dumps({"found": found, "walk": walk}))
"""


def test_host_files_unreachable_by_any_path(daemon, shared, tmp_path):
    """Attack: read marker files planted on the host (a temp dir, the daemon's data and runtime dirs) by their
    host path, by ``..`` traversal, through /proc/1/root and /proc/<host pid>/root, and by walking the whole
    filesystem for their name."""
    name = f"isolation-marker-{uuid.uuid4().hex}"
    secret = uuid.uuid4().hex
    planted = [tmp_path / name, daemon.data_dir / name, daemon.runtime_dir / name]
    for path in planted:
        path.write_text(secret)
        path.chmod(0o644)
    try:
        targets = []
        for path in planted:
            rel = str(path).lstrip("/")
            targets += [
                str(path),
                "/../../../../" + rel,
                "/proc/1/root/" + rel,
                "/proc/self/root/../../" + rel,
                "/proc/1/cwd/../../../" + rel,
                f"/proc/{os.getpid()}/root/{rel}",
                f"/proc/{daemon.proc.pid}/root/{rel}",
                "/.shoal/bin/../../../" + rel,
                "/.shoal/ctl/../../../" + rel,
            ]
        p = shared.exec("python3", "-c", READ_ATTEMPTS, secret, name, json.dumps(targets))
        assert p.wait() == 0, p.stderr.read()
        result = json.loads(p.stdout.read())
    finally:
        for path in planted:
            path.unlink()
    assert result["walk"] == []
    for path, outcome in result["found"].items():
        # ENOENT: no such file in the sandbox; EACCES: /proc/<agent>/root is closed to sandbox code anyway.
        assert outcome in (errno.ENOENT, errno.EACCES), f"{path}: {outcome}"
        if not path.startswith("/proc/1/"):
            assert outcome == errno.ENOENT, f"{path}: {outcome}"


def test_chroot_breakout_stays_in_sandbox_root(shared, tmp_path, runtime):
    """Attack: the classic chroot escape (chroot into a subdir, chdir .. many times, chroot .) with CAP_SYS_CHROOT."""
    (tmp_path / "host-only").write_text("x")
    result = py_json(
        shared,
        f"""
import json, os
os.makedirs("/tmp/jail", exist_ok=True)
fd = os.open("/", os.O_RDONLY)
os.chroot("/tmp/jail")
os.fchdir(fd)
for _ in range(64):
    os.chdir("..")
os.chroot(".")
print(json.dumps({{"root": sorted(os.listdir("/")), "host": os.path.exists({str(tmp_path / "host-only")!r})}}))
""",
    )
    if runtime == "gvisor":
        # gVisor's kernel leaves the climbing process in no directory at all: nothing to list, nothing of the host.
        assert result["root"] == [] or ".shoal" in result["root"], result
    else:
        assert ".shoal" in result["root"]  # still the sandbox's own root
    assert result["host"] is False


def _layer_of(daemon, sb) -> Path:
    """The bottom image layer under the sandbox's root: its stored spec's first layer, in the daemon's image store
    or the machine's (the overlay is built from id-mapped clones, so the mount table does not name the layer)."""
    db = sqlite3.connect(f"file:{daemon.data_dir / 'state.db'}?mode=ro", uri=True)
    try:
        (raw,) = db.execute("SELECT spec FROM sandboxes WHERE id = ?", (sb.object_id,)).fetchone()
    finally:
        db.close()
    bottom = json.loads(raw)["image_layers"][0]
    for store in (daemon.data_dir / "images", MACHINE_IMAGES):
        if (store / "layers" / bottom).is_dir():
            return store / "layers" / bottom
    raise AssertionError(f"layer {bottom} of the sandbox's image is in no image store")


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd", "/etc/hostname", "/etc/os-release"])
def test_identity_files_are_the_images_not_the_hosts(daemon, shared, path):
    """Attack: read the host's /etc/shadow (and other identity files).  Inside, each is the image's own copy."""
    layer_file = _layer_of(daemon, shared) / path.lstrip("/")
    if not layer_file.is_file():
        rc, _, _ = sh(shared, f"test -e {path}")
        assert rc != 0, f"{path} exists inside but not in the image"
        return
    rc, out, err = sh(shared, f"sha256sum {path} | cut -d' ' -f1")
    assert rc == 0, err
    assert out.strip() == hashlib.sha256(layer_file.read_bytes()).hexdigest()
    host_file = Path(path)
    if host_file.is_file() and host_file.read_bytes() != layer_file.read_bytes():
        assert out.strip() != hashlib.sha256(host_file.read_bytes()).hexdigest()


def test_host_devices_absent_and_not_creatable(shared, runtime):
    """Attack: open host disks, /dev/mem, /dev/kvm; mknod them when absent."""
    result = py_json(
        shared,
        """
import json, os, stat
out = {"dev": sorted(os.listdir("/dev")), "pts": sorted(os.listdir("/dev/pts"))}
for path in ("/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/kvm", "/dev/mem", "/dev/kmsg", "/dev/port", "/dev/fuse"):
    out[path] = os.path.exists(path)
for name, mode, dev in (("sda", stat.S_IFBLK, (8, 0)), ("vda", stat.S_IFBLK, (254, 0)), ("mem", stat.S_IFCHR, (1, 1))):
    try:
        os.mknod(f"/tmp/{name}", mode | 0o600, os.makedev(*dev))
        out[name] = "created"
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
""",
    )
    standard = ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty"]
    # gVisor's kernel adds its own FUSE and TUN devices (served by the Sentry, not the host's drivers) and has
    # no mqueue directory in /dev.
    own = ["fuse", "net"] if runtime == "gvisor" else ["mqueue"]
    assert result["dev"] == sorted([*standard, *own, "urandom", "zero"])
    assert result["pts"] == ["ptmx"]
    for path in ("/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/kvm", "/dev/mem", "/dev/kmsg", "/dev/port", "/dev/fuse"):
        assert result[path] is (path in ("/dev/fuse",) and runtime == "gvisor"), path
    for name in ("sda", "vda", "mem"):
        assert result[name] == errno.EPERM, (name, result[name])


# ---------------------------------------------------------------- users and capabilities

CAP_NAMES = {
    0: "CAP_CHOWN",
    1: "CAP_DAC_OVERRIDE",
    2: "CAP_DAC_READ_SEARCH",
    3: "CAP_FOWNER",
    4: "CAP_FSETID",
    5: "CAP_KILL",
    6: "CAP_SETGID",
    7: "CAP_SETUID",
    8: "CAP_SETPCAP",
    9: "CAP_LINUX_IMMUTABLE",
    10: "CAP_NET_BIND_SERVICE",
    11: "CAP_NET_BROADCAST",
    12: "CAP_NET_ADMIN",
    13: "CAP_NET_RAW",
    14: "CAP_IPC_LOCK",
    15: "CAP_IPC_OWNER",
    16: "CAP_SYS_MODULE",
    17: "CAP_SYS_RAWIO",
    18: "CAP_SYS_CHROOT",
    19: "CAP_SYS_PTRACE",
    20: "CAP_SYS_PACCT",
    21: "CAP_SYS_ADMIN",
    22: "CAP_SYS_BOOT",
    23: "CAP_SYS_NICE",
    24: "CAP_SYS_RESOURCE",
    25: "CAP_SYS_TIME",
    26: "CAP_SYS_TTY_CONFIG",
    27: "CAP_MKNOD",
    28: "CAP_LEASE",
    29: "CAP_AUDIT_WRITE",
    30: "CAP_AUDIT_CONTROL",
    31: "CAP_SETFCAP",
    32: "CAP_MAC_OVERRIDE",
    33: "CAP_MAC_ADMIN",
    34: "CAP_SYSLOG",
    35: "CAP_WAKE_ALARM",
    36: "CAP_BLOCK_SUSPEND",
    37: "CAP_AUDIT_READ",
    38: "CAP_PERFMON",
    39: "CAP_BPF",
    40: "CAP_CHECKPOINT_RESTORE",
}

FORBIDDEN_CAPS = {
    "CAP_SYS_ADMIN",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_PTRACE",
    "CAP_SYS_BOOT",
    "CAP_SYS_TIME",
    "CAP_SYS_RESOURCE",
    "CAP_DAC_READ_SEARCH",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_SYSLOG",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_CHECKPOINT_RESTORE",
    "CAP_IPC_LOCK",
}


def decode_caps(hex_mask: str) -> set[str]:
    mask = int(hex_mask, 16)
    return {CAP_NAMES.get(bit, f"bit{bit}") for bit in range(64) if mask >> bit & 1}


def test_capabilities_exclude_sys_admin_and_other_host_powers(shared, runtime):
    """Attack: use root's capabilities (CAP_SYS_ADMIN, SYS_MODULE, ...) or regain them via setuid/file caps."""
    rc, out, err = sh(shared, "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status")
    assert rc == 0, err
    status = dict(line.split(":\t") for line in out.strip().splitlines())
    for field in ("CapPrm", "CapEff", "CapBnd"):
        caps = decode_caps(status[field])
        assert not caps & FORBIDDEN_CAPS, (field, sorted(caps & FORBIDDEN_CAPS))
    assert decode_caps(status.get("CapAmb", "0")) == set()  # gVisor's kernel has no ambient set to show
    assert decode_caps(status["CapInh"]) == set()
    # setuid binaries and file capabilities cannot raise privileges (gVisor's status does not show it: ask prctl)
    rc, out, err = sh(shared, "python3 -c 'import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))'")
    assert (rc, out, status.get("NoNewPrivs", "1")) == (0, "1\n", "1"), err
    # Filter mode; under gVisor no filter inside: its system calls reach the Sentry, not the host (0069).
    assert status["Seccomp"] == ("0" if runtime == "gvisor" else "2")


def test_root_inside_is_a_sandbox_uid_outside(daemon, sandbox, runtime):
    """Attack: be root on the host by being root inside.  Processes of root inside run as the sandbox's own host
    uid (2^20 or above, decision 0063); the files it writes are stored as 100000 (decision 0002)."""
    name = f"owned-{uuid.uuid4().hex}"
    rc, out, err = sh(
        sandbox,
        f"""set -e
cat /proc/self/uid_map /proc/self/gid_map
id -u; id -g
echo x > /root/{name}
cp /bin/bash /{name}.suid && chmod 4755 /{name}.suid
echo y > /{name}.user && chown 1000:1000 /{name}.user
""",
    )
    assert rc == 0, err
    lines = out.splitlines()
    maps = [line.split() for line in lines[:2]]
    base = int(maps[0][1])
    if runtime == "gvisor":
        # gVisor's kernel maps every id to itself; the host sees only the Sentry (uid 65534), and the gofer stores
        # root's files as the shared range's root, checked below (decision 0069).
        assert maps == [["0", "0", "4294967295"]] * 2
    else:
        assert maps == [["0", str(base), "65536"]] * 2 and base >= FIRST_SANDBOX_ID
    assert lines[2:] == ["0", "0"]
    upper = daemon.data_dir / "sandboxes" / sandbox.object_id / "upper"
    st = (upper / "root" / name).stat()
    assert (st.st_uid, st.st_gid) == (100000, 100000)
    st = (upper / f"{name}.suid").stat()
    assert st.st_mode & stat.S_ISUID and st.st_uid == 100000  # a setuid binary of root inside is not setuid-root
    st = (upper / f"{name}.user").stat()
    assert (st.st_uid, st.st_gid) == (101000, 101000)
    if runtime == "gvisor":
        # The Sentry, the one host process that runs the sandbox's code, is host uid nobody with no capability,
        # in a user namespace of its own that maps nobody alone (runsc with --directfs=false, decision 0069).
        sentries = [pid for pid in host_pids_of(daemon, sandbox) if "boot" in safe_cmdline(pid).split()]
        assert sentries
        host_userns = os.readlink("/proc/self/ns/user")
        for pid in sentries:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
            assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
            assert os.readlink(f"/proc/{pid}/ns/user") != host_userns
            assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["65534", "65534", "1"]
        return

    # A process that sets every uid to 0 inside is still the sandbox's own uid to the host.
    p = sandbox.exec(
        "python3",
        "-c",
        "import os, sys; os.setresuid(0, 0, 0); os.setresgid(0, 0, 0); print('ready', flush=True); sys.stdin.read()",
    )
    assert next(iter(p.stdout)) == "ready\n"
    pids = [pid for pid in host_pids_of(daemon, sandbox) if "setresuid" in safe_cmdline(pid)]
    assert len(pids) == 1
    status = Path(f"/proc/{pids[0]}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    p.stdin.write_eof()
    p.stdin.drain()
    p.wait()
    assert uids == [str(base)] * 4
    assert gids == [str(base)] * 4


def test_cannot_map_more_ids_or_become_an_unmapped_uid(shared, runtime):
    """Attack: rewrite /proc/self/uid_map to map host root, or setuid to a uid outside the mapping."""
    result = py_json(
        shared,
        """
import json, os
out = {}
for name in ("uid_map", "gid_map", "setgroups"):
    try:
        with open(f"/proc/self/{name}", "w") as f:
            f.write("0 0 1\\n" if name != "setgroups" else "allow")
        out[name] = "written"
    except OSError as e:
        out[name] = e.errno
try:
    os.setuid(70000)
    out["setuid"] = "ok"
except OSError as e:
    out["setuid"] = e.errno
print(json.dumps(out))
""",
    )
    assert result["uid_map"] in (errno.EPERM, errno.EACCES), result
    assert result["gid_map"] in (errno.EPERM, errno.EACCES), result
    assert result["setgroups"] in (errno.EPERM, errno.EACCES), result
    if runtime == "gvisor":
        # gVisor's kernel has every uid, but 70000 has none on the host: nothing it writes can be stored.
        assert result["setuid"] == "ok"
        rc, _, err = sh(shared, "python3 -c \"import os; os.setuid(70000); open('/tmp/as-70000', 'w')\"")
        assert rc != 0 and "Value too large" in err, err
    else:
        assert result["setuid"] == errno.EINVAL  # 70000 has no host uid: it cannot be taken


# ---------------------------------------------------------------- kernel interfaces


SYSCALLS = r"""
import ctypes, json, os, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def arg(a):
    if a is None:
        return ctypes.c_void_p(None)
    if isinstance(a, int):
        return ctypes.c_long(a)
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    return a

def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *map(arg, args))
    if r == 0 and nr in (56, 435):  # a clone that worked: the child leaves at once
        os._exit(0)
    if r > 0 and nr in (56, 435):
        os.waitpid(r, 0)
    return r if r >= 0 else -ctypes.get_errno()

buf = ctypes.create_string_buffer
os.makedirs("/mnt/target", exist_ok=True)
exe = os.open("/bin/true", os.O_RDONLY)
nsfd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
bpf_attr = buf(struct.pack("IIII", 2, 4, 4, 1), 128)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
perf_attr = buf(struct.pack("IIQQQQQ", 1, 64, 0, 0, 0, 0, 1 | 1 << 5 | 1 << 6), 64)  # sw cpu-clock, user only
handle = buf(struct.pack("Ii", 128, 0), 136)
mount_id = buf(4)
clone_args = buf(struct.pack("QQQQQQQQ", 0x10000000, 0, 0, 0, 17, 0, 0, 0), 64)
uring_params = buf(120)
tv = buf(16)
results = {
    "mount tmpfs": call(165, b"none", b"/mnt/target", b"tmpfs", 0, None),
    "mount cgroup (release_agent)": call(165, b"cgroup", b"/mnt/target", b"cgroup", 0, b"memory"),
    "mount proc": call(165, b"proc", b"/mnt/target", b"proc", 0, None),
    "bind-mount /": call(165, b"/", b"/mnt/target", None, 4096, None),
    "umount2 /proc/sys": call(166, b"/proc/sys", 2),
    "umount2 /sys/firmware": call(166, b"/sys/firmware", 2),
    "init_module": call(175, buf(b"\x7fELF", 64), 64, b""),
    "finit_module": call(313, exe, b"", 0),
    "delete_module": call(176, b"ext4", 2048),
    "kexec_load": call(246, 0, 0, None, 0),
    "kexec_file_load": call(320, exe, exe, 0, b"", 0),
    "swapon": call(167, b"/dev/zero", 0),
    "swapoff": call(168, b"/dev/zero"),
    "reboot (halt)": call(169, 0xFEE1DEAD, 672274793, 0xCDEF0123, None),
    "keyctl": call(250, 0, -3, 1),
    "add_key": call(248, b"user", b"shoal-isolation", b"secret", 6, -2),
    "request_key": call(249, b"user", b"shoal-isolation", None, 0),
    "bpf": call(321, 0, bpf_attr, 128),
    "perf_event_open": call(298, perf_attr, 0, -1, -1, 0),
    "setns": call(308, nsfd, 0),
    "unshare user": call(272, 0x10000000),
    "unshare mount": call(272, 0x00020000),
    "unshare net": call(272, 0x40000000),
    "clone newuser": call(56, 0x10000000 | 17, 0, None, None, 0),
    "clone newpid": call(56, 0x20000000 | 17, 0, None, None, 0),
    "userfaultfd": call(323, 1),
    "io_uring_setup": call(425, 1, uring_params),
    "name_to_handle_at": call(303, -100, b"/", handle, mount_id, 0),
    "open_by_handle_at": call(304, exe, handle, 0),
    "fsopen": call(430, b"tmpfs", 0),
    "open_tree": call(428, -100, b"/", 1),
    "pivot_root": call(155, b"/mnt", b"/mnt/target"),
    "syslog": call(103, 3, buf(64), 64),
    "acct": call(163, None),
    "iopl": call(172, 3),
    "ioperm": call(173, 0x80, 1, 1),
    "settimeofday": call(164, None, None),
    "clock_settime": call(227, 0, tv),
    "clone3 newuser": call(435, clone_args, 64),
}
with open("/proc/self/mountinfo") as f:
    results["mounts under /mnt"] = [l.split()[4] for l in f if l.split()[4].startswith("/mnt")]
print(json.dumps(results))
"""


def test_privileged_syscalls_refused(sandbox, runtime):
    """Attack: mount (tmpfs, cgroup for release_agent, bind /), unmount masks, load or unload kernel modules,
    kexec, swap, reboot, keyrings, BPF, perf, setns/unshare/clone into new namespaces, userfaultfd, io_uring,
    file handles (shocker), new mount API, pivot_root, syslog, acct, port I/O, setting the clock."""
    if platform.machine() != "x86_64":
        pytest.skip("syscall numbers are x86_64's")
    results = py_json(sandbox, SYSCALLS)
    assert results.pop("mounts under /mnt") == []
    assert results.pop("clone3 newuser") in (-errno.ENOSYS, -errno.EPERM)
    if runtime == "gvisor":
        # gVisor's kernel implements these for itself (its own namespaces, keyrings and a made-up kernel log):
        # they succeed without reaching the host.  Everything else is refused, some calls as not implemented.
        for name in ("keyctl", "unshare user", "unshare mount", "unshare net", "clone newpid", "syslog"):
            results.pop(name)
        assert all(r < 0 for r in results.values()), results
        assert_healthy(sandbox)
        return
    refused = {name: r for name, r in results.items() if r == -errno.EPERM}
    assert refused == results, {name: r for name, r in results.items() if r != -errno.EPERM}
    assert_healthy(sandbox)


@pytest.mark.parametrize(
    "command",
    [
        "mount -t tmpfs none /mnt",
        "mount -t proc proc /mnt",
        "mount --bind / /mnt",
        "umount /proc/sys",
        "unshare -r true",
        "unshare -m true",
        "unshare -n true",
        "unshare -p -f true",
        "nsenter -t 1 -m true",
        "swapon /dev/zero",
        "dmesg",
        "setpriv --reuid=0 --inh-caps=+sys_admin --ambient-caps=+sys_admin true",
    ],
)
def test_privileged_commands_fail(shared, command, runtime):
    """Attack: the command-line tools an attacker would reach for first."""
    rc, out, err = sh(shared, command)
    if runtime == "gvisor" and command in ("unshare -r true", "dmesg"):
        # gVisor's own user namespaces and its made-up kernel log: nothing of the host's (decision 0069).
        assert rc == 0, err
        assert os.uname().release not in out
    else:
        assert rc != 0, f"{command!r} succeeded"
        assert err.strip(), "a refused command says why"
    rc, out, _ = sh(shared, "grep -c ' /mnt ' /proc/self/mountinfo || true")
    assert out.strip() == "0"


def test_proc_sys_and_sys_are_read_only(daemon, shared, runtime):
    """Attack: write host kernel settings (core_pattern escape, uevent_helper, pid_max) through /proc/sys and /sys."""
    before = {p: Path(p).read_text() for p in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/pid_max")}
    result = py_json(
        shared,
        """
import json
out = {}
for path, value in (
    ("/proc/sys/kernel/core_pattern", "|/tmp/pwn"),
    ("/proc/sys/kernel/pid_max", "4242"),
    ("/proc/sys/vm/drop_caches", "3"),
    ("/sys/kernel/uevent_helper", "/tmp/pwn"),
    ("/sys/kernel/mm/transparent_hugepage/enabled", "never"),
    ("/proc/sysrq-trigger", "h"),
):
    try:
        with open(path, "w") as f:
            f.write(value)
        out[path] = "written"
    except OSError as e:
        out[path] = e.errno
with open("/proc/self/mountinfo") as f:
    out["opts"] = {l.split()[4]: l.split()[5].split(",") for l in f}
print(json.dumps(out))
""",
    )
    opts = result.pop("opts")
    if runtime == "gvisor":
        assert "ro" in opts["/sys"], opts  # gVisor's /proc/sys is its own kernel's, read-only in itself
    else:
        assert "ro" in opts["/sys"] and "ro" in opts["/proc/sys"], opts
    for path, outcome in result.items():
        # uevent_helper, THP and sysrq-trigger depend on the kernel's configuration: absent is as good as closed.
        optional = not path.startswith(("/proc/sys/kernel/", "/proc/sys/vm/"))
        allowed = (errno.EROFS, errno.EACCES, errno.EPERM) + ((errno.ENOENT,) if optional else ())
        if runtime == "gvisor" and optional:
            allowed += (errno.EIO,)  # gVisor's kernel takes no sysrq command
        assert outcome in allowed, (path, outcome)
    after = {p: Path(p).read_text() for p in before}
    assert after == before


def test_kernel_memory_and_firmware_masked(shared, runtime):
    """Attack: read kernel memory (/proc/kcore), firmware tables (/sys/firmware), kernel logs and key lists."""
    result = py_json(
        shared,
        """
import json, os
out = {}
for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/kmsg"):
    try:
        with open(path, "rb") as f:
            out[path] = len(f.read(4096))
    except OSError as e:
        out[path] = -e.errno
out["/sys/firmware"] = os.listdir("/sys/firmware")
try:
    out["kallsyms"] = sorted({line.split()[0] for line in open("/proc/kallsyms")})
except FileNotFoundError:  # gVisor's kernel has none
    out["kallsyms"] = []
print(json.dumps(out))
""",
    )
    # Masked files read as empty (bind of /dev/null); absent ones (not built into this kernel) are fine too.
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"):
        assert result[path] in (0, -errno.ENOENT), (path, result[path])
    absent = (-errno.ENOENT,) if runtime == "gvisor" else ()  # gVisor's kernel has no /proc/kmsg
    assert result["/proc/kmsg"] in (-errno.EACCES, -errno.EPERM, *absent)
    assert result["/sys/firmware"] == []
    assert set(result["kallsyms"]) <= {"0000000000000000"}, "kernel addresses are visible"


# ---------------------------------------------------------------- network and shoal's own API


class HostListener:
    """A TCP or Unix stream server in the test process that records every connection it accepts."""

    def __init__(self, family: int, address) -> None:  # type: ignore[no-untyped-def]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            try:
                conn.sendall(b"HOST\n")
            finally:
                conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


CONNECT = """
import json, socket, sys
family, address = sys.argv[1], json.loads(sys.argv[2])
if family == "unix":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = address.replace("@", "\\0", 1) if address.startswith("@") else address
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    address = tuple(address)
s.settimeout(5)
try:
    s.connect(address)
    print(json.dumps({"connected": s.recv(16).decode()}))
except OSError as e:
    print(json.dumps({"errno": e.errno}))
"""


def connect_from(sb, family: str, address) -> dict:  # type: ignore[no-untyped-def]
    p = sb.exec("python3", "-c", CONNECT, family, json.dumps(address))
    assert p.wait() == 0, p.stderr.read()
    return json.loads(p.stdout.read())


def host_address() -> str | None:
    """The host's address on its default route (no packet is sent), or None without one."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()


def test_host_loopback_and_addresses_unreachable(shared):
    """Attack: connect to a service the host runs on 127.0.0.1 (and on its own address).  The sandbox's
    loopback is its own: the host service never sees the connection, and a server inside on the same port
    answers instead."""
    listener = HostListener(socket.AF_INET, ("0.0.0.0", 0))
    port = listener.sock.getsockname()[1]
    try:
        assert connect_from(shared, "tcp", ["127.0.0.1", port]) == {"errno": errno.ECONNREFUSED}
        addr = host_address()
        if addr is not None and not addr.startswith("127."):
            outcome = connect_from(shared, "tcp", [addr, port])
            assert "connected" not in outcome, outcome
        # Control: the same port inside belongs to the sandbox.
        server = shared.exec(
            "python3",
            "-c",
            f"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port})); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); c.sendall(b"SANDBOX\\n"); c.close()
""",
        )
        assert next(iter(server.stdout)) == "listening\n"
        assert connect_from(shared, "tcp", ["127.0.0.1", port]) == {"connected": "SANDBOX\n"}
        assert server.wait() == 0
    finally:
        listener.close()
    assert listener.accepted == 0
    rc, out, _ = sh(shared, "python3 -c 'import socket; print(*sorted(n for _, n in socket.if_nameindex()))'")
    # Its own veth to the NAT gateway, nothing of the host's (see tests/integration/test_network.py).
    assert (rc, out.split()) == (0, ["eth0", "lo"])


def test_host_abstract_unix_socket_unreachable(shared):
    """Attack: connect to a host service on an abstract-namespace Unix socket (no file to hide, only netns)."""
    name = f"shoal-isolation-{uuid.uuid4().hex}"
    listener = HostListener(socket.AF_UNIX, "\0" + name)
    try:
        assert connect_from(shared, "unix", "@" + name) == {"errno": errno.ECONNREFUSED}
    finally:
        listener.close()
    assert listener.accepted == 0


def test_daemon_api_socket_unreachable(daemon, shared, tmp_path):
    """Attack: talk to shoal's own API (the daemon's Unix socket) or any host Unix socket from inside."""
    sock_path = tmp_path / "host.sock"
    listener = HostListener(socket.AF_UNIX, str(sock_path))
    try:
        assert connect_from(shared, "unix", str(daemon.socket)) == {"errno": errno.ENOENT}
        assert connect_from(shared, "unix", str(sock_path)) == {"errno": errno.ENOENT}
        assert connect_from(shared, "unix", "/proc/self/root" + str(daemon.socket)) == {"errno": errno.ENOENT}
    finally:
        listener.close()
    assert listener.accepted == 0
    # No Unix socket file at all is reachable in the sandbox's filesystem (the daemon's, bind-mounted elsewhere,
    # would show up here).
    rc, out, err = sh(shared, "find / \\( -path /proc -o -path /sys \\) -prune -o -type s -print")
    assert rc == 0, err
    assert out.split() == []


# ---------------------------------------------------------------- resource exhaustion


def sandbox_pids_limit(sb) -> int:
    """The processes a gVisor sandbox may hold: its RLIMIT_NPROC, which gVisor's kernel enforces for root too."""
    rc, out, err = sh(sb, "ulimit -Hu")
    assert rc == 0, err
    return int(out)


COUNT_PROCESSES = """
import os, time
while True:
    print(sum(1 for d in os.listdir("/proc") if d.isdigit()))
    time.sleep(0.2)
"""

FORK_UNTIL_REFUSED = """
import json, os, sys, time
n, err = 0, None
try:
    while n < int(sys.argv[1]):  # a bound, so that a missing limit fails the test instead of the host
        pid = os.fork()
        if pid == 0:
            fd = os.open("/dev/null", os.O_RDWR)
            for i in (0, 1, 2):
                os.dup2(fd, i)
            try:  # a small process, so that the sandbox's memory limit is not what stops the bomb
                os.execv("/bin/sleep", ["sleep", "600"])
            finally:
                os._exit(0)
        n += 1
except OSError as e:
    err = e.errno
print(json.dumps({"forked": n, "errno": err}), flush=True)
"""


def test_fork_bomb_stops_at_the_pids_limit(daemon, default_sandbox):
    """Attack: fork without end.  Forks start failing with EAGAIN at the sandbox's pids limit."""
    sandbox = default_sandbox
    pids = cgroup_dir(daemon, sandbox, "pids")
    host_limit = int((pids / "pids.max").read_text())
    limit = sandbox_pids_limit(sandbox) if DEFAULT_RUNTIME == "gvisor" else host_limit
    p = sandbox.exec("python3", "-c", FORK_UNTIL_REFUSED, str(4 * limit))
    assert p.wait() == 0, p.stderr.read()
    result = json.loads(p.stdout.read())
    assert result["errno"] == errno.EAGAIN
    assert result["forked"] < limit
    assert int((pids / "pids.current").read_text()) <= host_limit
    refused_by_host = int((pids / "pids.events").read_text().split()[1])
    if DEFAULT_RUNTIME == "gvisor":
        # gVisor's kernel refused the forks (RLIMIT_NPROC) before the host's limit on the Sentry's tasks was
        # reached, which would have ended the whole sandbox.
        assert refused_by_host == 0
        assert sandbox.poll() is None
    else:
        assert refused_by_host > 0  # the limit itself refused forks
    # The sandbox is full, but still under control: killing the bomb's processes frees it.
    sandbox.terminate()
    wait_until(lambda: not host_pids_of(daemon, sandbox), "the bomb's processes are gone")


def test_fork_bomb_contained_while_daemon_keeps_serving(daemon, app):
    """Attack: the classic shell fork bomb.  It is held at the pids limit, the daemon keeps creating and running
    other sandboxes meanwhile, and terminate removes every process of the bombed sandbox."""
    bombed = shoal.Sandbox.create(app=app, timeout=120)
    try:
        pids = cgroup_dir(daemon, bombed, "pids")
        limit = int((pids / "pids.max").read_text())
        assert limit <= 4096 * (5 if DEFAULT_RUNTIME == "gvisor" else 1)  # no unbounded bomb on the host
        if DEFAULT_RUNTIME == "gvisor":
            # Held inside by the Sentry (RLIMIT_NPROC); the host's limit on its tasks is never reached.  A process
            # started before the bomb counts (at the limit, nothing new can start to look).
            nproc = sandbox_pids_limit(bombed)
            counter = bombed.exec("python3", "-u", "-c", COUNT_PROCESSES)
            bombed.exec("bash", "-c", "exec >/dev/null 2>&1 </dev/null; :(){ :|:& };:")
            deadline = time.monotonic() + 120
            counts = (int(n) for chunk in counter.stdout for n in chunk.split())
            assert any(n >= nproc - 8 or time.monotonic() > deadline for n in counts)
            assert time.monotonic() <= deadline, "the bomb never reached the limit"
            assert int((pids / "pids.events").read_text().split()[1]) == 0
        else:
            bombed.exec("bash", "-c", "exec >/dev/null 2>&1 </dev/null; :(){ :|:& };:")
            wait_until(lambda: int((pids / "pids.events").read_text().split()[1]) > 0, "the bomb reaches the limit")
        assert int((pids / "pids.current").read_text()) <= limit
        # Meanwhile, the daemon answers: a new sandbox starts and runs a command.
        other = shoal.Sandbox.create(app=app, timeout=60)
        try:
            p = other.exec("python3", "-c", "print(sum(range(10)))")
            assert p.wait() == 0
            assert p.stdout.read() == "45\n"
        finally:
            other.terminate()
        assert int((pids / "pids.current").read_text()) <= limit
        assert bombed.poll() is None
    finally:
        bombed.terminate()
    assert bombed.poll() == 137
    wait_until(lambda: not host_pids_of(daemon, bombed), "every process of the bombed sandbox is gone")
    assert daemon.proc.poll() is None


def test_fork_bombs_in_many_sandboxes_cannot_exhaust_host_pids(daemon, sandbox):
    """Attack: fork-bomb in many sandboxes at once.  Each stops at its own pids limit, but unless the cgroup that
    holds every sandbox caps their sum below the host's pid table (kernel.pid_max), enough bombed sandboxes fill
    it and the daemon, runc and everything else on the host can no longer fork.  (Checked on the limits, not by
    setting off the bombs, which would take the shared test machine down if the test failed.)"""
    per_sandbox = int((cgroup_dir(daemon, sandbox, "pids") / "pids.max").read_text())
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    parent = Path("/sys/fs/cgroup/pids") / daemon.cgroup_parent.strip("/")
    total = (parent / "pids.max").read_text().strip()
    assert total != "max", (
        f"no limit on all sandboxes together: {pid_max // per_sandbox} sandboxes at their own limit of {per_sandbox} "
        f"fill the host's pid_max of {pid_max}"
    )
    assert int(total) < pid_max, (total, pid_max)


MEMORY_BOMB = """
chunks = []
while len(chunks) < 128:  # 2 GiB at most: a missing limit fails the test instead of the host
    chunks.append(b"\\x01" * (16 << 20))
"""


def test_memory_bomb_killed_with_137_and_sandbox_survives(daemon, app, runtime):
    """Attack: allocate memory without end in a 256 MiB sandbox.  The cgroup's OOM killer kills the allocating
    process (exit 137), the host is untouched, and the sandbox and daemon stay usable."""
    sb = shoal.Sandbox.create(app=app, runtime=runtime, memory=256, timeout=120)
    try:
        memory = cgroup_dir(daemon, sb, "memory")
        assert int((memory / "memory.limit_in_bytes").read_text()) == 256 << 20
        p = sb.exec("python3", "-c", MEMORY_BOMB)
        assert p.wait() == 137
        assert p.returncode == 137
        if runtime == "gvisor":
            # gVisor's kernel has no OOM killer of its own: the host's kills the Sentry, and the whole sandbox
            # ends (decision 0069), with a result that says why.  The daemon and other sandboxes go on.
            with pytest.raises(SandboxTerminatedError, match="ran out of memory"):
                sb.wait()
            other = shoal.Sandbox.create(app=app, runtime=runtime, timeout=60)
            try:
                assert_healthy(other)
            finally:
                other.terminate()
            assert daemon.proc.poll() is None
            return
        oom = dict(line.split() for line in (memory / "memory.oom_control").read_text().splitlines())
        assert int(oom["oom_kill"]) >= 1  # killed by the sandbox's own limit, not by the host's OOM killer
        assert int((memory / "memory.max_usage_in_bytes").read_text()) <= 256 << 20
        assert_healthy(sb)
        assert sh(sb, "cat /proc/1/comm")[1] == "shoal-agent\n"
        assert daemon.proc.poll() is None
    finally:
        sb.terminate()

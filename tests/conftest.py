"""Fixtures: a real daemon on temporary directories, apps, sandboxes that always clean up, and a leak check.

The daemon under test uses its own data dir, runtime dir and cgroup parent,
and reads the base image from the machine's image store (prepared by
``make setup``) read-only, so tests do not rebuild it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MACHINE_IMAGES = Path("/var/lib/shoal/images")
REGISTRY_TMP_PREFIX = f"shoal-registry-{os.getpid()}-"
"""Temporary directories of the local registries this test run starts (tests/integration/test_registry.py)."""
AGENT_CACHE = Path(tempfile.mkdtemp(prefix=f"shoal-agent-cache-{os.getpid()}-"))
"""The agent binary the run's daemons share (each starts on a fresh data dir): removed at the end."""
os.environ["SHOAL_NO_AUTOSTART"] = "1"
"""A test that forgets its daemon fixture fails, instead of starting a daemon on the host's own directories."""


@dataclass
class Daemon:
    """A shoal daemon process started by the tests."""

    root: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "shoald.sock"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def cgroup_parent(self) -> str:
        return self.env["SHOAL_CGROUP_PARENT"]

    def start(self, *extra: str) -> None:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        start_at = log.tell()  # a restart appends: only this start's lines count
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal", "serve", *(["-v"] if os.environ.get("SHOAL_TEST_VERBOSE") else []), *extra],
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited at start:\n{self.log.read_text()[-3000:]}")
            with open(self.log, "rb") as f:
                f.seek(start_at)
                ready = b"daemon ready" in f.read()
            if ready and self.socket.exists():
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def restart_with(self, *extra: str) -> None:
        """Restart with extra ``shoal serve`` options."""
        self.stop()
        self.start(*extra)


def _daemon_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SHOAL_DATA_DIR=str(root / "data"),
        SHOAL_RUNTIME_DIR=str(root / "run"),
        SHOAL_CGROUP_PARENT=f"/shoal-test-{os.getpid()}-{root.name[-6:]}",
        SHOAL_NO_AUTOSTART="1",
        PYTHONPATH=str(REPO / "src"),
        # The suite tests per-sandbox id ranges (decision 0063): a host that cannot have them fails to start
        # the daemon, saying why, instead of falling back to the shared range unseen.
        SHOAL_UID_RANGES="per-sandbox",
        # Usage samples each second rather than every five: a stats test needs a few in a short life.
        SHOAL_USAGE_INTERVAL="1",
        SHOAL_AGENT_CACHE=str(AGENT_CACHE),
    )
    if MACHINE_IMAGES.is_dir():
        env["SHOAL_IMAGE_CACHE"] = str(MACHINE_IMAGES)
    env.pop("SHOAL_URL", None)
    env.pop("SHOAL_SOCKET", None)
    return env


def restore_environ(saved: dict[str, str | None]) -> None:
    """Put environment variables back as ``saved`` had them (None: unset)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def proc_files(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, content of /proc/<pid>/<name>) for every process that still exists."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            yield int(pid_dir.name), (pid_dir / name).read_bytes()
        except OSError:
            continue


def processes_in(cgroup_parent: str) -> set[int]:
    """Pids of processes in any cgroup under ``cgroup_parent`` (this suite's sandboxes)."""
    marker = (cgroup_parent.rstrip("/") + "/").encode()
    return {pid for pid, cgroups in proc_files("cgroup") if marker in cgroups}


def leaks(d: Daemon) -> list[str]:
    """Anything a daemon's sandboxes left behind: containers, mounts, cgroups, runtime dirs, processes."""
    found: list[str] = []
    oci = d.runtime_dir / "oci"
    for runtime_dir in oci.glob("*"):
        for c in runtime_dir.iterdir():
            if c.is_dir():
                found.append(f"container state {c}")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            if mnt.startswith(str(d.root)):
                found.append(f"mount {mnt}")
    for ctrl in Path("/sys/fs/cgroup").iterdir():
        parent = ctrl / d.cgroup_parent.lstrip("/")
        if parent.is_dir():
            found += [f"cgroup {c}" for c in parent.iterdir() if c.is_dir()]
    sandboxes = d.runtime_dir / "sandboxes"
    if sandboxes.is_dir():
        found += [f"runtime dir {p}" for p in sandboxes.iterdir()]
    for pid in sorted(processes_in(d.cgroup_parent)):
        try:
            what = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            state = next(ln for ln in status if ln.startswith("State:"))
            ppid = int(next(ln for ln in status if ln.startswith("PPid:")).split()[1])
        except (OSError, StopIteration):
            continue  # gone meanwhile
        if "zombie" in state and ppid == 1:
            continue  # an adopted sandbox's init, dead; reaping it is the host init's job
        found.append(f"process {pid} ({what or '?'}, {state}) still in a sandbox cgroup")
    found += network_leaks(d)
    found += volume_leaks(d)
    found += image_leaks(d)
    found += snapshot_leaks(d)
    return found


def snapshot_leaks(d: Daemon) -> list[str]:
    """Upper directories of images mounted into sandboxes that have ended, memory snapshots left half made, and
    registries tests started."""
    found = [f"image mount dir {p}" for p in (d.data_dir / "sandboxes").glob("*/mounts")]
    found += [f"half-made memory snapshot {p}" for p in (d.data_dir / "memory-snapshots").glob(".*")]
    for pid_dir in Path("/proc").iterdir():
        try:
            cmdline = (pid_dir / "cmdline").read_bytes() if pid_dir.name.isdigit() else b""
        except OSError:
            continue
        if b"docker-registry" in cmdline and REGISTRY_TMP_PREFIX.encode() in cmdline:
            what = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"registry process {pid_dir.name} ({what})")
    return found


def image_leaks(d: Daemon) -> list[str]:
    """Half-built layers, uploads or contexts left in the image store's staging area, and host-step mount points."""
    found = [f"image staging {p}" for p in (d.data_dir / "images" / "tmp").glob("*")]
    found += [f"image build mount point {p}" for p in (d.runtime_dir / "image-mounts").glob("*")]
    return found


def volume_leaks(d: Daemon) -> list[str]:
    """Volume staging mount points (sub_path mounts) and half-written uploads or copies left in staging."""
    found: list[str] = []
    binds = d.runtime_dir / "volume-binds"
    if binds.is_dir():
        found += [f"volume staging point {p}" for p in binds.iterdir()]
    found += [f"volume staging file {p}" for p in (d.data_dir / "volumes").glob("vo-*/staging/*")]
    return found


def network_leaks(d: Daemon) -> list[str]:
    """The daemon's links (its anchor bridge, sandbox veths), nftables table and attachment records."""
    try:
        netid = json.loads((d.data_dir / "network.json").read_text())["netid"]
    except (OSError, ValueError, KeyError):
        return []
    found: list[str] = []
    deadline = time.monotonic() + 5  # the kernel destroys a dead sandbox's namespace, and its veth, in the background
    while True:
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        names = [ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines() if ln.count(":") >= 2]
        ours = [n for n in names if n == f"shoal-{netid}" or n.startswith(f"sv{netid}")]
        if not ours or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    found += [f"link {n}" for n in ours]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.split("\n")
    found += [f"nftables {t.strip()}" for t in tables if t.strip() == f"table inet shoal_{netid}"]
    net_dir = d.runtime_dir / "net"
    if net_dir.is_dir():
        found += [f"network record {p}" for p in net_dir.iterdir()]
    return found


def remove_cgroup_parent(d: Daemon) -> None:
    for ctrl in Path("/sys/fs/cgroup").iterdir():
        parent = ctrl / d.cgroup_parent.lstrip("/")
        if parent.is_dir():
            with contextlib.suppress(OSError):
                parent.rmdir()


def terminate_all(d: Daemon) -> None:
    """Terminate every running sandbox of a daemon through its API."""
    import http.client
    import json
    import socket as socketlib
    import urllib.parse

    class UnixHTTP(http.client.HTTPConnection):
        def __init__(self, path: str) -> None:
            super().__init__("localhost", timeout=60)
            self._path = path

        def connect(self) -> None:
            s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            s.connect(self._path)
            self.sock = s

    conn = UnixHTTP(str(d.socket))
    conn.request("GET", "/v1/sandboxes")
    items = json.loads(conn.getresponse().read())["sandboxes"]
    for item in items:
        conn.request("POST", f"/v1/sandboxes/{urllib.parse.quote(item['sandbox_id'])}/terminate")
        conn.getresponse().read()
    conn.close()


def _require_root_and_runtime() -> None:
    if os.geteuid() != 0:
        pytest.skip("the shoal daemon needs root (namespaces, mounts, cgroups)")
    if not (shutil.which("runc") or shutil.which("crun")):
        pytest.skip("no OCI runtime installed: run `make setup`")


@contextlib.contextmanager
def running_daemon(default_runtime: str | None = None) -> Iterator[Daemon]:
    """A daemon on fresh temporary directories that the SDK in this process talks to while the block runs.

    ``default_runtime``: its sandboxes' runtime when they do not name one (else the suite's, ``DEFAULT_RUNTIME``).
    On exit: every sandbox is terminated, the daemon stopped, and anything left
    behind fails the test.
    """
    root = Path(tempfile.mkdtemp(prefix="shoal-test-"))
    root.chmod(0o711)  # sandboxes' mounts are set up as their (unprivileged) user
    d = Daemon(root, _daemon_env(root))
    if default_runtime is not None:
        d.env["SHOAL_DEFAULT_RUNTIME"] = default_runtime
    saved = {k: os.environ.get(k) for k in ("SHOAL_RUNTIME_DIR", "SHOAL_NO_AUTOSTART", "SHOAL_URL", "SHOAL_SOCKET")}
    os.environ["SHOAL_RUNTIME_DIR"] = str(d.runtime_dir)
    os.environ["SHOAL_NO_AUTOSTART"] = "1"
    os.environ.pop("SHOAL_URL", None)
    os.environ.pop("SHOAL_SOCKET", None)
    d.start()
    try:
        yield d
    finally:
        try:
            if d.proc is None or d.proc.poll() is not None:
                # A test that failed with its daemon stopped: start it again, so that it takes its sandboxes
                # back and they can be ended (otherwise they run on with no daemon).
                with contextlib.suppress(Exception):
                    d.start()
            if d.proc is not None and d.proc.poll() is None:
                terminate_all(d)
        finally:
            d.stop()
            restore_environ(saved)
        left = leaks(d)
        remove_cgroup_parent(d)
        if not os.environ.get("SHOAL_TEST_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        if left:
            pytest.fail("left behind:\n  " + "\n  ".join(left), pytrace=False)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """The session's daemon; the SDK in this process talks to it."""
    _require_root_and_runtime()
    with running_daemon() as d:
        yield d


@pytest.fixture
def own_daemon() -> Iterator[Daemon]:
    """A daemon for this test alone (for tests that restart or kill it)."""
    _require_root_and_runtime()
    with running_daemon() as d:
        yield d


# The runtime the `sandbox` fixture's sandboxes get: the session daemon's default, as the suite was run
# (`SHOAL_DEFAULT_RUNTIME=gvisor make test` sweeps the suite under gVisor).
DEFAULT_RUNTIME = os.environ.get("SHOAL_DEFAULT_RUNTIME") or "runc"

RUNTIMES = [
    "runc",
    pytest.param(
        "gvisor",
        marks=pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (gVisor) is not installed: make setup"),
    ),
]
"""Parameters for tests that run once with runc sandboxes and once with gVisor ones (``runtime=``)."""


@pytest.fixture(scope="session")
def other_runtime_daemon(daemon: Daemon) -> Iterator[Daemon]:
    """A second session daemon, started on first use, whose sandboxes default to the runtime the session daemon's
    do not (gVisor in a plain run).  The SDK talks to it only within ``each_runtime`` tests."""
    other = "runc" if DEFAULT_RUNTIME == "gvisor" else "gvisor"
    if other == "gvisor" and shutil.which("runsc") is None:
        pytest.skip("runsc (gVisor) is not installed: make setup")
    with running_daemon(default_runtime=other) as d:
        os.environ["SHOAL_RUNTIME_DIR"] = str(daemon.runtime_dir)
        yield d


@pytest.fixture(params=RUNTIMES)
def each_runtime(request: pytest.FixtureRequest, daemon: Daemon) -> Iterator[str]:
    """Runs a test twice, its sandboxes under runc and then under gVisor, with the code unchanged (no ``runtime=``):
    the SDK talks to the session daemon, then to ``other_runtime_daemon``.  Apps and sandboxes of one daemon are
    unknown to the other: such a test looks up its own app (not the session's ``app`` fixture)."""
    if request.param == DEFAULT_RUNTIME:
        yield request.param
        return
    other = request.getfixturevalue("other_runtime_daemon")
    os.environ["SHOAL_RUNTIME_DIR"] = str(other.runtime_dir)
    try:
        yield request.param
    finally:
        os.environ["SHOAL_RUNTIME_DIR"] = str(daemon.runtime_dir)


@pytest.fixture(scope="session")
def app(daemon: Daemon):  # type: ignore[no-untyped-def]
    import shoal

    return shoal.App.lookup("shoal-tests", create_if_missing=True)


@pytest.fixture
def sandbox(app, request):  # type: ignore[no-untyped-def]
    """A fresh default sandbox, terminated after the test (its id printed if the test fails)."""
    import shoal

    sb = shoal.Sandbox.create(app=app, timeout=120)
    yield sb
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"\nsandbox of the failed test: {sb.object_id}")
    sb.terminate()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(AGENT_CACHE, ignore_errors=True)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)

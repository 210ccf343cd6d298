"""gVisor sandboxes (``Sandbox.create(runtime="gvisor")``, decision 0069): runsc puts its own kernel between the
sandbox and the host; everything a user does with a runc sandbox works the same.

These tests look for gVisor where a user could tell: the sandbox's processes are not host processes, its kernel
is gVisor's; and for what shoal promises either way: root's files are stored as the shared range's root, the
sandbox has its own network (NAT, DNS, tunnels), and a daemon killed with -9 takes its gVisor sandboxes back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import shoal
from shoal.exception import InvalidError, NotFoundError, SandboxTimeoutError
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (gVisor) is not installed: make setup")


def _app() -> shoal.App:
    return shoal.App.lookup("gvisor-tests", create_if_missing=True)


def sh(sb: shoal.Sandbox, script: str, timeout: int = 120) -> tuple[int, str, str]:
    p = sb.exec("sh", "-c", script, timeout=timeout)
    out, err = p.stdout.read(), p.stderr.read()
    return p.wait(), out, err


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds ``marker``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@pytest.fixture
def gv(daemon):
    """A gVisor sandbox of the session's daemon, terminated afterwards."""
    sb = shoal.Sandbox.create(app=_app(), runtime="gvisor", timeout=300)
    yield sb
    sb.terminate()


def test_the_sandbox_runs_on_gvisors_kernel_not_the_hosts(daemon, gv):
    marker = f"gvisor-marker-{uuid.uuid4().hex[:8]}"
    p = gv.exec("bash", "-c", f"exec -a {marker} sleep 30")
    time.sleep(0.5)
    # Under runc the process would be a host process (in a pid namespace); under gVisor the Sentry runs it.
    assert host_processes_with(marker) == []
    rc, out, _ = sh(gv, f"ps -eo args | grep -c '^{marker}'")
    assert out.strip() == "1"
    assert p.poll() is None
    rc, out, _ = sh(gv, "cat /proc/version")
    assert rc == 0 and "Linux version 4.4.0" in out  # gVisor's own kernel, whatever the host runs
    assert "Linux version 4.4.0" not in Path("/proc/version").read_text()
    listed = json.loads(
        subprocess.run(
            [sys.executable, "-m", "shoal", "sandbox", "ls", "--json"],
            capture_output=True,
            text=True,
            check=True,
            env={**_env(daemon)},
        ).stdout
    )
    assert {i["sandbox_id"]: i["runtime"] for i in listed}[gv.object_id] == "gvisor"


def _env(daemon) -> dict[str, str]:
    return {**os.environ, "SHOAL_RUNTIME_DIR": str(daemon.runtime_dir), "PYTHONPATH": str(REPO / "src")}


def test_code_in_the_sandbox_cannot_open_the_agents_control_connection(daemon, gv):
    # runsc shows PID 1's descriptors to root in the sandbox (decision 0069); its host-backed control socket must
    # still not open through /proc/1/fd, or sandbox code could speak for the agent.
    script = (
        "import os\n"
        "for n in os.listdir('/proc/1/fd'):\n"
        "    t = os.readlink('/proc/1/fd/' + n)\n"
        "    if not t.startswith('host:'): continue\n"
        "    try: os.open('/proc/1/fd/' + n, os.O_RDWR | os.O_NONBLOCK)\n"
        "    except OSError as e: print(n, 'refused', e.errno)\n"
        "    else: print(n, 'OPENED', t)\n"
    )
    p = gv.exec("python3", "-c", script)
    out = p.stdout.read()
    assert p.wait() == 0, p.stderr.read()
    lines = out.splitlines()
    # The agent's own stdout and stderr (the sandbox's log, which its code writes anyway) may open; no other host fd.
    opened = [ln for ln in lines if "OPENED" in ln and ln.split()[0] not in ("1", "2")]
    assert opened == [], out
    assert any("refused" in ln for ln in lines), out


def test_exec_streams_stdin_codes_timeouts_workdir_env_and_pty(daemon):
    sb = shoal.Sandbox.create(
        "sh", "-c", "echo entry-out; echo entry-err >&2; sleep 600",
        app=_app(), runtime="gvisor", timeout=300, workdir="/srv", env={"GREETING": "hi"},
        secrets=[shoal.Secret.from_dict({"TOKEN": "s3cret"})],
    )  # fmt: skip
    try:
        assert next(iter(sb.stdout)) == "entry-out\n"
        assert next(iter(sb.stderr)) == "entry-err\n"
        p = sb.exec("sh", "-c", "pwd; echo $GREETING $TOKEN; echo oops >&2; exit 3")
        assert p.stdout.read() == "/srv\nhi s3cret\n"
        assert p.stderr.read() == "oops\n"
        assert p.wait() == 3
        p = sb.exec("cat")
        p.stdin.write(b"through stdin\n")
        p.stdin.write_eof()
        p.stdin.drain()
        assert p.stdout.read() == "through stdin\n"
        assert p.wait() == 0
        assert sb.exec("sleep", "30", timeout=1).wait() == -1  # Modal's exec timeout
        assert sb.exec("sh", "-c", "kill -9 $$").wait() == 137
        assert sb.exec("no-such-command").wait() == 127
        p = sb.exec("sh", "-c", "tty; stty size", pty=True)
        out = p.stdout.read()
        assert p.wait() == 0 and out.startswith("/dev/pts/"), out
    finally:
        sb.terminate()
    assert sb.poll() == 137


def test_lifetime_timeout_and_entrypoint_exit_code(daemon):
    sb = shoal.Sandbox.create("sh", "-c", "exit 7", app=_app(), runtime="gvisor")
    sb.wait()
    assert sb.returncode == 7
    sb = shoal.Sandbox.create("sleep", "600", app=_app(), runtime="gvisor", timeout=2)
    with pytest.raises(SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124


def test_files_written_as_root_are_stored_in_the_shared_range_and_the_file_api_works(daemon, gv):
    assert sh(gv, "echo data > /root/f; cp /bin/ls /tmp/ls2; chmod u+s /tmp/ls2")[0] == 0
    upper = daemon.data_dir / "sandboxes" / gv.object_id / "upper"
    for rel in ("root/f", "tmp/ls2"):  # /tmp too: not a memory tmpfs of runsc's
        st = (upper / rel).stat()
        assert (st.st_uid, st.st_gid) == (100000, 100000), rel  # sandbox root is never host root
    with gv.open("/srv/note.txt", "w") as f:
        f.write("from the file API")
    assert sh(gv, "cat /srv/note.txt")[1] == "from the file API"
    assert gv.filesystem.read_text("/root/f") == "data\n"
    assert "note.txt" in gv.ls("/srv")
    assert gv.filesystem.stat("/root/f").size == 5
    gv.filesystem.remove("/srv/note.txt")
    assert sh(gv, "test -e /srv/note.txt; echo $?")[1] == "1\n"


def test_network_nat_dns_and_block_network(daemon, gv):
    # The sandbox has gVisor's own network stack over its veth: it reaches out through shoal's NAT and DNS.
    rc, out, err = sh(gv, "grep nameserver /etc/resolv.conf; cat /proc/net/dev | grep -o eth0")
    assert rc == 0 and out.splitlines()[-1] == "eth0", (out, err)
    gateway = out.split()[1]
    code = f"import socket; s=socket.create_connection(('{gateway}', 53), timeout=5); print('dns tcp ok')"
    rc, out, err = sh(gv, f'python3 -c "{code}"')
    assert (rc, out) == (0, "dns tcp ok\n"), err  # shoal's DNS forwarder on the gateway, through the veth
    blocked = shoal.Sandbox.create(app=_app(), runtime="gvisor", block_network=True)
    try:
        code = "import socket; s=socket.socket(); s.settimeout(3); s.connect(('1.1.1.1', 53))"
        p = blocked.exec("python3", "-c", code)
        assert p.wait() == 1
        err = p.stderr.read()  # gVisor's stack answers "no route", the host's "network unreachable": both refuse
        assert "No route to host" in err or "Network is unreachable" in err, err
    finally:
        blocked.terminate()


def test_a_tunnel_reaches_a_server_in_a_gvisor_sandbox(daemon):
    sb = shoal.Sandbox.create(
        "sh", "-c", "mkdir -p /srv && echo served-by-gvisor > /srv/t && exec python3 -m http.server 8000 -d /srv",
        app=_app(), runtime="gvisor", encrypted_ports=[8000], timeout=300,
    )  # fmt: skip
    try:
        tunnel = sb.tunnels()[8000]
        ctx = ssl.create_default_context(cafile=str(daemon.data_dir / "tls" / "ca.pem"))
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{tunnel.url}/t", context=ctx, timeout=10) as resp:
                    assert resp.read() == b"served-by-gvisor\n"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        sb.terminate()


def test_a_gvisor_sandbox_survives_a_daemon_kill_9_and_leaves_nothing(own_daemon):
    app = _app()
    sb = shoal.Sandbox.create("sh", "-c", "sleep 600", app=app, runtime="gvisor", timeout=300)
    assert sh(sb, "echo state > /tmp/state")[0] == 0
    link = json.loads((own_daemon.runtime_dir / "net" / f"{sb.object_id}.json").read_text())["link"]
    own_daemon.restart(signal.SIGKILL)
    again = shoal.Sandbox.from_id(sb.object_id)
    assert sh(again, "cat /tmp/state")[1] == "state\n"
    again.terminate()
    assert again.poll() == 137
    # its namespace (a bind mount on a file of its run directory), veth and run directory are gone
    assert sb.object_id not in Path("/proc/self/mountinfo").read_text()
    assert not (own_daemon.runtime_dir / "sandboxes" / sb.object_id).exists()
    deadline = time.monotonic() + 5  # the kernel destroys a namespace, and its veth, in the background
    while f" {link}@" in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, f"{link} outlived its sandbox"
        time.sleep(0.1)
    state = own_daemon.runtime_dir / "oci" / "runsc"
    listed = subprocess.run(["runsc", "--root", str(state), "list"], capture_output=True, text=True).stdout
    assert sb.object_id not in listed


def test_what_gvisor_cannot_do_is_a_clear_error(daemon):
    with pytest.raises(InvalidError, match="nvproxy"):
        shoal.Sandbox.create(app=_app(), runtime="gvisor", gpu="any")
    with pytest.raises(InvalidError, match="virtual-machine runtime"):
        shoal.Sandbox.create(app=_app(), runtime="vm")


def _pool() -> dict:
    return run_blocking(default_client().request("GET", "/v1/status"))["warm_pool"]


def test_the_default_runtime_is_the_daemons_choice(own_daemon):
    own_daemon.restart_with("--default-runtime", "gvisor", "--warm-pool", "1")
    deadline = time.monotonic() + 60
    while _pool()["ready"] != 1:  # a gVisor pool's sandboxes wait with their agent already started
        assert time.monotonic() < deadline, _pool()
        time.sleep(0.1)
    sb = shoal.Sandbox.create("cat", app=_app(), timeout=120)
    try:
        assert _pool()["taken"] == 1
        sb.stdin.write("from the pool\n")
        sb.stdin.drain()
        assert next(iter(sb.stdout)) == "from the pool\n"
        assert sh(sb, "cat /proc/version")[1].startswith("Linux version 4.4.0")
        explicit = shoal.Sandbox.create(app=_app(), runtime="runc", timeout=120)
        assert not sh(explicit, "cat /proc/version")[1].startswith("Linux version 4.4.0")
        explicit.terminate()
    finally:
        sb.terminate()
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "shoal", "status", "--json"], capture_output=True, text=True, env=_env(own_daemon)
        ).stdout
    )
    assert status["runtimes"]["default"] == "gvisor"
    assert status["runtimes"]["kinds"]["gvisor"]["binary"].endswith("runsc")


def _await_pool(ready: int) -> None:
    deadline = time.monotonic() + 60
    while _pool()["ready"] != ready:
        assert time.monotonic() < deadline, _pool()
        time.sleep(0.05)


SLEEPERS = (  # the pids of the keep-alive command's processes
    "for p in /proc/[0-9]*; do [ \"$(cat $p/cmdline | tr '\\0' ' ')\" = 'sleep 172800 ' ] && echo ${p#/proc/}; done;"
    " true"
)


def test_a_pooled_gvisor_sandbox_is_taken_with_its_entrypoint_running_or_replaced(own_daemon):
    # A gVisor pool's sandboxes run the default image's keep-alive command already; a request whose entrypoint
    # would differ in any way (its env here) gets its own, and the pool's is gone without a trace.
    own_daemon.restart_with("--default-runtime", "gvisor", "--warm-pool", "1")
    _await_pool(1)
    plain = shoal.Sandbox.create(app=_app(), timeout=120)
    try:
        assert _pool()["taken"] == 1
        code, pids, _ = sh(plain, SLEEPERS)
        assert code == 0 and len(pids.split()) == 1, pids
        assert sh(plain, f"tr '\\0' '\\n' < /proc/{pids.strip()}/environ")[1].count("POOL_TEST") == 0
        _await_pool(1)
        with_env = shoal.Sandbox.create(app=_app(), timeout=120, env={"POOL_TEST": "mine"})
        try:
            assert _pool()["taken"] == 2
            code, pids, _ = sh(with_env, SLEEPERS)
            assert code == 0 and len(pids.split()) == 1, pids  # the pool's own was killed
            environ = sh(with_env, f"tr '\\0' '\\n' < /proc/{pids.strip()}/environ")[1].split()
            assert "POOL_TEST=mine" in environ
            assert with_env.poll() is None
        finally:
            with_env.terminate()
        assert with_env.returncode == 137
        assert plain.poll() is None and plain.exec("true").wait() == 0
    finally:
        plain.terminate()
    assert plain.returncode == 137
    assert plain.stdout.read() == "" and plain.stderr.read() == ""


def test_a_volume_is_shared_between_a_gvisor_and_a_runc_sandbox(daemon):
    name = f"gv-vol-{uuid.uuid4().hex[:8]}"
    vol = shoal.Volume.from_name(name, create_if_missing=True)
    try:
        gv = shoal.Sandbox.create(app=_app(), runtime="gvisor", volumes={"/data": vol}, timeout=120)
        rc_sb = shoal.Sandbox.create(app=_app(), volumes={"/data": vol}, timeout=120)
        try:
            assert sh(gv, "echo from-gvisor > /data/g.txt; mkdir /data/d; echo x > /data/d/f")[0] == 0
            gv.exec("sync").wait()
            assert sh(rc_sb, "cat /data/g.txt; stat -c %u:%g /data/g.txt /data/d/f")[1] == (
                "from-gvisor\n0:0\n0:0\n"  # the runc sandbox's root owns what gVisor's root wrote
            )
            assert sh(rc_sb, "echo from-runc > /data/r.txt")[0] == 0
            assert sh(gv, "cat /data/r.txt; stat -c %u /data/r.txt")[1] == "from-runc\n0\n"
            stored = daemon.data_dir / "volumes" / vol.object_id / "root" / "g.txt"
            assert (stored.stat().st_uid, stored.stat().st_gid) == (100000, 100000)
        finally:
            gv.terminate()
            rc_sb.terminate()
        assert b"".join(vol.read_file("g.txt")) == b"from-gvisor\n"
    finally:
        shoal.Volume.objects.delete(name, allow_missing=True)


def test_snapshot_filesystem_of_a_gvisor_sandbox_starts_either_runtime(daemon, gv):
    assert sh(gv, "mkdir -p /work && echo kept > /work/state && echo tmp > /tmp/t")[0] == 0
    # What a process that still runs has appended is in the snapshot.
    writer = gv.exec("sh", "-c", "for i in $(seq 500); do echo line-$i >> /work/log; done; echo written; sleep 120")
    assert next(iter(writer.stdout)) == "written\n"
    image = gv.snapshot_filesystem()
    for runtime in ("gvisor", "runc"):
        sb = shoal.Sandbox.create(app=_app(), image=image, runtime=runtime, timeout=120)
        try:
            assert sh(sb, "cat /work/state /tmp/t")[1] == "kept\ntmp\n", runtime
            assert sh(sb, "wc -l < /work/log; tail -n 1 /work/log")[1] == "500\nline-500\n", runtime
        finally:
            sb.terminate()


def test_mounts_into_a_running_gvisor_sandbox_are_refused_clearly(daemon, gv):
    with pytest.raises(InvalidError, match="gVisor"):
        gv.mount_image("/mnt/img", shoal.Image.debian_slim())


def test_snapshot_directory_of_a_gvisor_sandbox(daemon):
    vol = shoal.Volume.from_name("gvisor-snapdir", create_if_missing=True)
    gv = shoal.Sandbox.create(app=_app(), runtime="gvisor", volumes={"/data/vol": vol}, timeout=120)
    rc = None
    try:
        script = (
            "mkdir -p /repo/src /data/own && echo code > /repo/src/m.py && echo tmp > /tmp/t"
            " && chown 1000:1000 /repo/src && ln -s /etc /repo/etc-link && ln -s /etc /via-link"
        )
        assert sh(gv, script)[0] == 0
        image = gv.snapshot_directory("/repo")
        tmp = gv.snapshot_directory("/tmp")
        # Read back in a runc sandbox (mount_image is runc's): files, owners and links as the gVisor one had them.
        rc = shoal.Sandbox.create(app=_app(), runtime="runc", timeout=120)
        rc.mount_image("/r", image)
        rc.mount_image("/t", tmp)
        assert sh(rc, "cat /r/src/m.py /t/t; stat -c %u /r/src; readlink /r/etc-link")[1] == "code\ntmp\n1000\n/etc\n"
        with pytest.raises(NotFoundError):
            gv.snapshot_directory("/no/such/dir")
        with pytest.raises(InvalidError):
            gv.snapshot_directory("/via-link")  # links are not followed
        # The gofer mounts volumes out of the host's view of the root: refused, not copied without their files.
        for on_or_holding in ("/data/vol", "/data/vol/x", "/data", "/"):
            with pytest.raises(InvalidError, match="volume"):
                gv.snapshot_directory(on_or_holding)
        assert gv.snapshot_directory("/data/own")  # beside the volume is fine
        with pytest.raises(InvalidError, match="cannot be under"):
            gv.snapshot_directory("/proc/1")
    finally:
        gv.terminate()
        if rc is not None:
            rc.terminate()

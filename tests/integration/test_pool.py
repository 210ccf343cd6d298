"""The warm pool (``shoal serve --warm-pool N``): default-shape sandboxes precreated and taken by ``create``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import shoal
from shoal.network.tls import make_ca
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.conftest import DEFAULT_RUNTIME, Daemon, running_daemon
from tests.integration.test_metrics import scrape, value

OWN_ADDRESS = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('198.18.0.1', 9));"
    " print(s.getsockname()[0])"
)


def pool() -> dict:
    return run_blocking(default_client().request("GET", "/v1/status"))["warm_pool"]


def until_ready(n: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (p := pool())["ready"] != n:
        assert time.monotonic() < deadline, f"the pool did not reach {n} ready sandboxes: {p}"
        time.sleep(0.05)
    return p


@pytest.fixture
def pooled() -> Iterator[Daemon]:
    """A daemon of its own with a warm pool of two."""
    with running_daemon() as d:
        d.restart_with("--warm-pool", "2")
        yield d


def _app() -> shoal.App:
    return shoal.App.lookup("pool-tests", create_if_missing=True)


def test_default_creates_come_from_the_pool_and_it_refills(pooled):
    before = until_ready(2)
    assert before["image_id"].startswith("im-")
    sb = shoal.Sandbox.create(
        "bash", "-c", "echo $GREETING from $(pwd); sleep 600", app=_app(), env={"GREETING": "hi"}, workdir="/w/x"
    )
    try:
        assert pool()["taken"] == before["taken"] + 1
        assert next(iter(sb.stdout)) == "hi from /w/x\n"  # the request's command, env and workdir
        p = sb.exec("python3", "-c", OWN_ADDRESS)
        assert p.stdout.read().startswith("10.") and p.wait() == 0  # its network was wired in the pool
        # Pooled sandboxes are nobody's until taken: not listed, not counted.
        assert [s.object_id for s in shoal.Sandbox.list(app_id=_app().app_id)] == [sb.object_id]
        assert run_blocking(default_client().request("GET", "/v1/status"))["sandboxes_running"] == 1
        until_ready(2)  # refilled
        other = shoal.Sandbox.create(app=_app())
        try:
            # Two pooled sandboxes share nothing: files, processes, addresses.
            sb.exec("bash", "-c", "echo mine > /tmp/mine").wait()
            assert other.exec("test", "-e", "/tmp/mine").wait() == 1
            assert (
                other.exec("python3", "-c", OWN_ADDRESS).stdout.read()
                != sb.exec("python3", "-c", OWN_ADDRESS).stdout.read()
            )
            assert "sleep 600" not in other.exec("ps", "-eo", "args").stdout.read()
        finally:
            other.terminate()
    finally:
        sb.terminate()
    assert sb.returncode == 137


def test_other_shapes_start_the_usual_way(pooled):
    before = until_ready(2)
    made = [
        shoal.Sandbox.create(app=_app(), memory=512),
        shoal.Sandbox.create(app=_app(), block_network=True),
        shoal.Sandbox.create(app=_app(), image=shoal.Image.debian_slim().env({"X": "1"})),
    ]
    try:
        assert pool()["taken"] == before["taken"]
        for sb in made:
            assert sb.exec("true").wait() == 0
    finally:
        for sb in made:
            sb.terminate()


def test_timeouts_count_from_create_not_from_the_pool(pooled):
    until_ready(2)
    time.sleep(2.5)  # the pooled sandboxes age
    idle = shoal.Sandbox.create(app=_app(), idle_timeout=2)
    assert idle.poll() is None and idle.exec("true").wait() == 0
    started = time.monotonic()
    sb = shoal.Sandbox.create(app=_app(), timeout=2)
    with pytest.raises(shoal.exception.SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124 and time.monotonic() - started >= 1.8
    with pytest.raises(shoal.exception.SandboxTimeoutError, match="idle"):
        idle.wait()
    assert idle.returncode == 124


def pool_containers(d: Daemon) -> dict[str, int]:
    """The pooled containers the runtime holds: container id → the host pid that runs it (runc's init, or under
    gVisor the Sentry, which runsc records in ``<id>_sandbox:<id>.state``)."""
    if DEFAULT_RUNTIME == "gvisor":
        states = (d.runtime_dir / "oci" / "runsc").glob("*.state")
        return {s.name.split("_sandbox:")[0]: json.loads(s.read_text())["sandbox"]["pid"] for s in states}
    states = (d.runtime_dir / "oci" / "runc").glob("*/state.json")
    return {s.parent.name: json.loads(s.read_text())["init_process_pid"] for s in states}


def test_a_crashed_daemons_pool_is_cleaned_up_by_the_next(pooled):
    until_ready(2)
    old = set(pool_containers(pooled))
    assert len(old) == 2
    pooled.stop(signal.SIGKILL)
    pooled.start("--warm-pool", "2")
    until_ready(2)
    now = set(pool_containers(pooled))
    assert len(now) == 2 and not now & old  # the old ones were removed, two new ones made
    assert not [d for d in (pooled.data_dir / "sandboxes").iterdir() if d.name in old]
    sb = shoal.Sandbox.create(app=_app())
    assert sb.exec("echo", "ok").stdout.read() == "ok\n"
    sb.terminate()
    # Leaving the fixture stops the daemon, which removes its pool; the leak check then finds nothing.


def test_the_pools_image_is_in_use(pooled):
    pool_image = until_ready(2)["image_id"]
    env = {**pooled.env, "SHOAL_RUNTIME_DIR": str(pooled.runtime_dir)}
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "image", "prune", "--all", "--json"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "image", "rm", pool_image], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1 and "used by running sandboxes" in r.stderr
    sb = shoal.Sandbox.create(app=_app())  # the pool still serves
    assert sb.exec("echo", "ok").stdout.read() == "ok\n"
    sb.terminate()


def test_creates_work_at_once_after_the_pools_inits_were_killed(pooled):
    """The pool's containers wait in the runtime's ``created`` state; with their inits (under gVisor: their
    Sentries) killed from outside, the next creates still give working sandboxes at once (never a hang on a dead
    init)."""
    until_ready(2)
    killed = 0
    for pid in pool_containers(pooled).values():
        subprocess.run(["kill", "-9", str(pid)], check=True)
        killed += 1
    assert killed == 2
    app = _app()
    t0 = time.monotonic()
    made = []
    try:
        for _ in range(3):
            made.append(shoal.Sandbox.create(app=app, timeout=60))
            assert made[-1].exec("echo", "ok").stdout.read() == "ok\n"
        assert time.monotonic() - t0 < 10
    finally:
        for sb in made:
            sb.terminate()


def _shoal_run(d: Daemon, *cmd: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "run", "--app", "pool-tests", "--", *cmd],
        env=d.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_pool_follows_the_default_image_when_it_changes(tmp_path):
    """A new CA certificate on the host changes the default image: the pool's sandboxes of the old one are
    replaced instead of never being taken again (the miss shows in /metrics)."""
    cas = tmp_path / "cas"
    cas.mkdir()
    with running_daemon() as d:
        d.env["SHOAL_HOST_CA_DIR"] = str(cas)
        d.restart_with("--warm-pool", "2")
        before = until_ready(2)
        first = shoal.Sandbox.create(app=_app())
        first.terminate()
        assert pool()["taken"] == before["taken"] + 1
        make_ca(cas / "team.crt", tmp_path / "team.key", "pool test CA")
        # A new process resolves the default image anew (this one keeps the id it resolved, as Modal's does).
        listed = _shoal_run(d, "ls", "/usr/local/share/ca-certificates/shoal-host/")
        assert listed == "team.crt\n"  # the new default image: nothing pooled has it yet
        deadline = time.monotonic() + 60
        while (p := pool())["image_id"] == before["image_id"] or p["ready"] != 2:
            assert time.monotonic() < deadline, f"the pool kept the old image: {p}"
            time.sleep(0.1)
        assert p["missed"] >= 1
        assert _shoal_run(d, "ls", "/usr/local/share/ca-certificates/shoal-host/") == "team.crt\n"
        now = pool()
        assert now["taken"] == p["taken"] + 1  # served from the pool again
        metrics = scrape(d)
        assert value(metrics, "shoal_warm_pool_hits_total") == now["taken"] >= 2
        assert value(metrics, "shoal_warm_pool_misses_total") == now["missed"] >= 1

"""The daemon's HTTP API: OpenAPI document, socket permissions, TCP with a bearer token, bad requests,
and the SDK starting a daemon when none runs (the embedded default)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import shoal
from shoal.exception import AuthError, InvalidError

from ..conftest import Daemon, _daemon_env, leaks, remove_cgroup_parent


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self._path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self._path)
        self.sock = s


def call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, headers=None):
    """One request on a fresh connection (closed afterwards)."""
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, (json.loads(data) if data else None)


def test_socket_is_root_only(daemon):
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert daemon.socket.stat().st_uid == 0


def test_openapi_document_describes_every_route(daemon):
    status, doc = call(UnixHTTP(daemon.socket), "GET", "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path, method in [
        ("/v1/sandboxes", "post"),
        ("/v1/sandboxes/{sandbox_id}/execs", "post"),
        ("/v1/sandboxes/{sandbox_id}/execs/{exec_id}/output/{fd}", "get"),
        ("/v1/sandboxes/{sandbox_id}/execs/{exec_id}/stdin", "post"),
        ("/v1/sandboxes/{sandbox_id}/terminate", "post"),
        ("/v1/apps/lookup", "post"),
    ]:
        assert method in paths[path], (path, method)
    create = paths["/v1/sandboxes"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"app_id", "args", "timeout", "workdir"} <= set(schema["properties"])


def test_bad_requests_get_clear_errors(daemon):
    conn = UnixHTTP(daemon.socket)
    status, body = call(conn, "POST", "/v1/sandboxes", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "InvalidError" and "JSON" in body["error"]["message"]
    status, body = call(conn, "POST", "/v1/sandboxes", json.dumps({"app_id": "ap-x", "timeout": -5}).encode())
    assert status == 400 and "timeout" in body["error"]["message"]
    status, body = call(conn, "GET", "/v1/sandboxes/sb-0000000000000000000000/wait?timeout=abc")
    assert status == 404
    status, body = call(conn, "GET", "/v1/sandboxes/sb-doesnotexist")
    assert status == 404 and body["error"]["type"] == "NotFoundError"


def test_app_lookup_validates_names(daemon):
    with pytest.raises(InvalidError, match="app names"):
        shoal.App.lookup("bad name/../x", create_if_missing=True)


def test_tcp_listener_requires_the_bearer_token(own_daemon):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    own_daemon.restart_with("--tcp", f"127.0.0.1:{port}")
    token = (own_daemon.data_dir / "api-token").read_text().strip()
    assert stat.S_IMODE((own_daemon.data_dir / "api-token").stat().st_mode) == 0o600
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    status, body = call(conn, "GET", "/v1/status")
    assert status == 401 and body["error"]["type"] == "AuthError"
    status, body = call(conn, "GET", "/v1/status", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body = call(conn, "GET", "/v1/status", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and body["pid"] == own_daemon.proc.pid

    # The SDK speaks TCP with SHOAL_URL + SHOAL_TOKEN.
    os.environ["SHOAL_URL"] = f"http://127.0.0.1:{port}"
    os.environ["SHOAL_TOKEN"] = token
    try:
        app = shoal.App.lookup("tcp-app", create_if_missing=True)
        sb = shoal.Sandbox.create(app=app)
        assert sb.exec("echo", "over tcp").stdout.read() == "over tcp\n"
        sb.terminate()
        os.environ["SHOAL_TOKEN"] = "wrong"
        with pytest.raises(AuthError):
            shoal.App.lookup("tcp-app")
    finally:
        os.environ.pop("SHOAL_URL", None)
        os.environ.pop("SHOAL_TOKEN", None)


def test_a_second_daemon_on_the_same_dirs_is_refused(daemon):
    env = dict(daemon.env)
    proc = subprocess.run([sys.executable, "-m", "shoal", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "another shoal daemon" in proc.stderr


def test_sdk_starts_a_daemon_when_none_runs():
    """The embedded default: as root, with no daemon, the first SDK call starts one in the background."""
    if os.geteuid() != 0:
        pytest.skip("only root may start the daemon")
    root = Path(tempfile.mkdtemp(prefix="shoal-test-"))
    root.chmod(0o711)
    d = Daemon(root, _daemon_env(root))
    env = dict(d.env)
    env.pop("SHOAL_NO_AUTOSTART")
    script = (
        "import shoal\n"
        "app = shoal.App.lookup('auto', create_if_missing=True)\n"
        "sb = shoal.Sandbox.create(app=app)\n"
        "print(sb.exec('echo', 'embedded').stdout.read(), end='')\n"
        "sb.terminate()\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "embedded\n"
        pid = int((d.runtime_dir / "shoald.pid").read_text())
        assert Path(f"/proc/{pid}").exists()
        # A second client reuses it rather than starting another.
        again = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert int((d.runtime_dir / "shoald.pid").read_text()) == pid
    finally:
        pid_file = d.runtime_dir / "shoald.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, 15)
            for _ in range(200):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)
        left = leaks(d)
        remove_cgroup_parent(d)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, left


def test_non_root_callers_get_a_clear_message():
    """The SDK run by another user, wherever the checkout sits (``/root`` is closed to other users): its
    source and packages are bind-mounted in a private mount namespace under a directory that user can read,
    and the system's interpreter runs them."""
    src = Path(shoal.__file__).resolve().parents[1]
    site = Path(__import__("aiohttp").__file__).resolve().parents[1]
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that another user can run")
    view = Path(tempfile.mkdtemp(prefix="shoal-nobody-"))
    try:
        view.chmod(0o755)
        for name in ("src", "site", "run"):
            (view / name).mkdir()
        (view / "run").chmod(0o777)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.update(SHOAL_RUNTIME_DIR=str(view / "run"), PYTHONPATH=f"{view}/src:{view}/site", HOME=str(view))
        script = "import shoal\nshoal.App.lookup('x', create_if_missing=True)\n"
        inner = (
            f"mount --bind '{src}' '{view}/src' && mount --bind '{site}' '{view}/site' && exec setpriv"
            f' --reuid=65534 --regid=65534 --clear-groups -- {python} -c "$0"'
        )
        out = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(view, ignore_errors=True)
    assert out.returncode != 0
    assert "only root can start one" in out.stderr

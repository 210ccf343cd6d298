"""Sidecars (``sb._experimental_sidecars``): containers beside a sandbox with their own image, process,
environment and outbound policy, which the sandbox reaches by name whatever its allowlist, and which end with it.
"""

from __future__ import annotations

import signal
import time

import pytest

import shoal
from shoal.exception import AlreadyExistsError, InvalidError, NotFoundError
from tests.conftest import DEFAULT_RUNTIME

SERVE = (
    "import http.server, os; http.server.HTTPServer(('', {port}), http.server.SimpleHTTPRequestHandler).serve_forever()"
)


def _app() -> shoal.App:
    return shoal.App.lookup("sidecar-tests", create_if_missing=True)


def _fetch(sb, url: str, timeout: float = 3) -> tuple[int, str]:
    """(exit code, body or error) of one HTTP GET from inside ``sb`` (retried until its server listens)."""
    code = (
        "import sys, time, urllib.request\n"
        "deadline = time.time() + 20\n"
        "while True:\n"
        "    try:\n"
        f"        print(urllib.request.urlopen(sys.argv[1], timeout={timeout}).read().decode(), end='')\n"
        "        break\n"
        "    except OSError as e:\n"
        "        if time.time() > deadline or 'refused' not in str(e):\n"
        "            print(e, end=''); sys.exit(1)\n"
        "        time.sleep(0.1)\n"
    )
    p = sb.exec("python3", "-c", code, url)
    return p.wait(), p.stdout.read()


def _address(sb) -> str:
    code = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('192.0.2.1', 9))"
    p = sb.exec("python3", "-c", code + "; print(s.getsockname()[0])")
    assert p.wait() == 0
    return p.stdout.read().strip()


@pytest.fixture
def main(daemon):
    sb = shoal.Sandbox.create(app=_app(), outbound_cidr_allowlist=[], timeout=300)
    yield sb
    sb.terminate()


def test_a_sandbox_without_a_way_out_reaches_its_sidecar_by_name(main):
    image = shoal.Image.debian_slim()
    web = main._experimental_sidecars.create(
        "sh",
        "-c",
        "mkdir -p /srv && cd /srv && echo sidecar:$ROLE:$TOKEN > index.html"
        f' && exec python3 -c "{SERVE.format(port=8080)}"',
        name="web",
        image=image,
        env={"ROLE": "proxy"},
        secrets=[shoal.Secret.from_dict({"TOKEN": "only-here"})],
    )
    assert web.name == "web" and web.object_id != main.object_id
    # Its environment and secrets are its own: the sandbox has neither.
    assert _fetch(main, "http://web:8080/index.html") == (0, "sidecar:proxy:only-here\n")
    p = main.exec("sh", "-c", "echo ${TOKEN:-none}")
    assert p.stdout.read() == "none\n"
    # The sidecar reaches the sandbox as "main", and runs commands of its own.
    assert main.exec("sh", "-c", "mkdir -p /srv && echo from-main > /srv/index.html").wait() == 0
    main.exec("sh", "-c", f'cd /srv && exec python3 -c "{SERVE.format(port=8000)}"')
    assert _fetch(web, "http://main:8000/index.html") == (0, "from-main\n")
    p = web.exec("cat", "/srv/index.html")
    assert p.stdout.read() == "sidecar:proxy:only-here\n"

    # Listed with its sandbox, never among sandboxes.
    assert [s.name for s in main._experimental_sidecars.list()] == ["web"]
    assert main._experimental_sidecars.get(name="web").object_id == web.object_id
    assert web.object_id not in {sb.object_id for sb in shoal.Sandbox.list(app_id=_app().app_id)}
    assert web.poll() is None

    # Another sandbox cannot reach it; it cannot reach that sandbox.
    other = shoal.Sandbox.create(app=_app(), timeout=120)
    try:
        web_ip = _address(web)
        code, out = _fetch(other, f"http://{web_ip}:8080/index.html")
        assert code == 1, out
        assert _fetch(web, f"http://{_address(other)}:9/")[0] == 1
    finally:
        other.terminate()

    # Once it ends, the pair is gone from the packet filter: its address no longer answers the sandbox.
    web.terminate()
    assert web.wait(raise_on_termination=False) is None
    assert web.poll() == 137
    assert _fetch(main, f"http://{web_ip}:8080/index.html", timeout=1)[0] == 1
    assert main._experimental_sidecars.list() == []
    assert [s.name for s in main._experimental_sidecars.list(include_terminated=True)] == ["web"]


def test_sidecars_end_with_their_sandbox(daemon):
    sb = shoal.Sandbox.create(app=_app(), timeout=300)
    side = sb._experimental_sidecars.create("sleep", "infinity", name="sleeper", image=shoal.Image.debian_slim())
    assert side.poll() is None
    sb.terminate()
    deadline = time.monotonic() + 30
    while side.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert side.poll() == 137


def test_sidecar_names_and_arguments_are_checked(main):
    sidecars = main._experimental_sidecars
    image = shoal.Image.debian_slim()
    with pytest.raises(InvalidError, match="reserved"):
        sidecars.create("true", name="main", image=image)
    with pytest.raises(InvalidError, match="host name"):
        sidecars.create("true", name="Not_A_Label", image=image)
    with pytest.raises(InvalidError, match="main container"):
        sidecars.get(name="main")
    with pytest.raises(NotFoundError, match="no sidecar named"):
        sidecars.get(name="absent")
    with pytest.raises(InvalidError, match="workdir"):
        sidecars.create("true", name="w", image=image, workdir="relative")
    sidecars.create("sleep", "infinity", name="twin", image=image)
    with pytest.raises(AlreadyExistsError, match="twin"):
        sidecars.create("sleep", "infinity", name="twin", image=image)


def test_a_sandbox_without_a_network_cannot_have_sidecars(daemon):
    sb = shoal.Sandbox.create(app=_app(), block_network=True, timeout=60)
    try:
        with pytest.raises(InvalidError, match="block_network"):
            sb._experimental_sidecars.create("true", name="x", image=shoal.Image.debian_slim())
    finally:
        sb.terminate()


def test_sidecars_run_under_their_sandboxs_runtime(main):
    side = main._experimental_sidecars.create("sleep", "infinity", name="rt", image=shoal.Image.debian_slim())
    info = shoal.Sandbox.from_id(side.object_id)
    assert info._info.get("runtime") == DEFAULT_RUNTIME


def test_sidecars_are_taken_back_after_a_daemon_restart(own_daemon):
    sb = shoal.Sandbox.create(app=_app(), outbound_cidr_allowlist=[], timeout=300)
    web = sb._experimental_sidecars.create(
        "sh",
        "-c",
        f'mkdir -p /srv && cd /srv && echo up > index.html && exec python3 -c "{SERVE.format(port=8080)}"',
        name="web",
        image=shoal.Image.debian_slim(),
    )
    assert _fetch(sb, "http://web:8080/index.html") == (0, "up\n")
    own_daemon.restart(signal.SIGKILL)
    # Its name, its pair in the packet filter and its link to the sandbox's lifecycle survive.
    assert _fetch(sb, "http://web:8080/index.html") == (0, "up\n")
    assert [s.name for s in sb._experimental_sidecars.list()] == ["web"]
    sb.terminate()
    deadline = time.monotonic() + 30
    while web.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert web.poll() == 137

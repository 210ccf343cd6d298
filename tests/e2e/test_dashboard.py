"""The web dashboard in a real headless Chromium (Debian's, driven by Playwright): the sandbox list follows
sandboxes as they start and end, a sandbox's page shows its output as it is printed, a terminal runs commands,
terminate works; the listener lets in only who signed in, from its own origin (issue 17)."""

from __future__ import annotations

import http.cookiejar
import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import shoal
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.netkit import host_port_reach

CHROMIUM = shutil.which("chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is a test dependency: make setup")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: make setup"),
    # Playwright's synchronous API keeps an event loop running in this thread, so the SDK's blocking calls
    # warn that they would block it: here they block only the test's own driver, which is what a test wants.
    pytest.mark.filterwarnings("ignore::shoal.exception.AsyncUsageWarning"),
]


def dashboard() -> dict[str, str]:
    info: dict[str, str] = run_blocking(default_client().request("GET", "/v1/dashboard"))
    return info


@pytest.fixture(scope="module")
def browser(daemon) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(dashboard()["login_url"])
    yield pg
    context.close()
    assert errors == [], errors  # the page's own scripts never failed


def test_the_list_follows_sandboxes_and_a_page_shows_output_as_printed(page, app) -> None:  # type: ignore[no-untyped-def]
    row = 'tr[data-sandbox-id="{}"]'
    sb = shoal.Sandbox.create(
        "sh", "-c", "echo first; read go; echo second-$go >&2; sleep 120", app=app, timeout=180, tags={"ui": "test"}
    )
    try:
        page.wait_for_selector(row.format(sb.object_id) + " >> text=running")
        assert "ui=test" in page.inner_text(row.format(sb.object_id))

        page.click(f"text={sb.object_id}")
        page.wait_for_selector("#logs >> text=first")
        assert "second" not in page.inner_text("#logs")
        sb.stdin.write(b"now\n")
        sb.stdin.drain()
        page.wait_for_selector("#logs >> text=second-now")  # printed after the page was open

        page.on("dialog", lambda d: d.accept())
        page.click("#terminate")
        page.wait_for_selector("#state >> text=finished")
        sb.wait(raise_on_termination=False)
        assert sb.returncode == 137

        page.goto(dashboard()["url"] + "/#/sandboxes")
        page.wait_for_selector(row.format(sb.object_id) + " >> text=finished")
    finally:
        sb.terminate()


def test_a_terminal_in_the_browser(page, sandbox) -> None:  # type: ignore[no-untyped-def]
    page.goto(dashboard()["url"] + f"/#/sandboxes/{sandbox.object_id}")
    page.click("#open-terminal")
    page.wait_for_selector("#terminal .xterm-rows >> text=#")  # root's prompt
    page.keyboard.type("echo hi-$((6 * 7))\n")
    page.wait_for_selector("#terminal .xterm-rows >> text=hi-42")
    size = _stty_size(page, "first")
    assert size[0] == page.eval_on_selector("#terminal .xterm-rows", "e => e.children.length")  # fits the box
    # A narrower window: the terminal is fitted again and the shell is told (SIGWINCH).
    page.set_viewport_size({"width": 900, "height": 800})
    narrower = _stty_size(page, "again")
    assert narrower[1] < size[1] and narrower[0] == size[0], (size, narrower)


def _stty_size(page, tag: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    page.keyboard.type(f"echo {tag}=$(stty size | tr ' ' x)\n")
    line = page.wait_for_selector(f"#terminal .xterm-rows > div >> text=/^\\s*{tag}=\\d+x\\d+\\s*$/")
    rows, cols = (int(x) for x in line.inner_text().strip().split("=", 1)[1].split("x"))
    return rows, cols


def test_the_other_pages(page, daemon) -> None:  # type: ignore[no-untyped-def]
    vol = shoal.Volume.from_name("dashboard-test-volume", create_if_missing=True)
    with vol.batch_upload(force=True) as batch:
        batch.put_file(__file__, "/code/test_dashboard.py")
    shoal.Secret.objects.create("dashboard-test-secret", {"KEY": "never-shown"}, allow_existing=True)
    url = dashboard()["url"]
    page.goto(url + "/#/images")
    page.wait_for_selector("text=debian_slim")
    page.goto(url + "/#/volumes")
    page.click("text=dashboard-test-volume")
    page.wait_for_selector("td >> text=code/test_dashboard.py")
    page.goto(url + "/#/secrets")
    page.wait_for_selector("text=dashboard-test-secret")
    assert "never-shown" not in page.content()
    page.goto(url + "/#/apps")
    page.wait_for_selector("text=shoal-tests")


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def test_only_who_signed_in_from_the_dashboards_own_origin(daemon) -> None:  # type: ignore[no-untyped-def]
    info = dashboard()
    url = info["url"]
    token = info["login_url"].split("token=", 1)[1]
    assert _get(url + "/api/v1/sandboxes")[0] == 401
    assert "not signed in" in _get(url + "/", {"Accept": "text/html"})[1]
    assert _get(url + "/login?token=wrong")[0] == 401
    bearer = {"Authorization": f"Bearer {token}"}
    status, body = _get(url + "/api/v1/sandboxes", bearer)
    assert status == 200 and "sandboxes" in json.loads(body)
    assert _get(url + "/metrics", bearer)[1].count("shoal_sandboxes_running") >= 1
    # A page of another origin (DNS rebinding, or a cross-site request) gets nothing.
    assert _get(url + "/api/v1/sandboxes", {**bearer, "Host": "attacker.example:8720"})[0] == 421
    assert _get(url + "/api/v1/sandboxes", {**bearer, "Origin": "http://attacker.example"})[0] == 403


def test_a_sandbox_cannot_reach_the_dashboard(sandbox) -> None:  # type: ignore[no-untyped-def]
    port = int(dashboard()["url"].rsplit(":", 1)[1])
    lines = host_port_reach(sandbox, port)
    assert len(lines) == 2, lines  # the sandbox's own loopback and its gateway (the host)
    assert all(line.startswith("refused") for line in lines), lines
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # while the host reaches it


def test_objects_link_to_their_dashboard_pages(page, sandbox, app) -> None:  # type: ignore[no-untyped-def]
    url = dashboard()["url"]
    link = sandbox.get_dashboard_url()
    assert link == f"{url}/#/sandboxes/{sandbox.object_id}"
    page.goto(link)
    page.wait_for_selector(f"h1 >> text={sandbox.object_id}")
    assert app.get_dashboard_url() == f"{url}/#/sandboxes?app={app.app_id}"
    assert shoal.Image.debian_slim().get_dashboard_url() == f"{url}/#/images"


def test_shoal_dashboard_prints_the_login_url(daemon) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "dashboard", "--no-browser"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == dashboard()["login_url"]
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with browser.open(done.stdout.strip(), timeout=10) as r:  # follows the redirect, with the cookie it set
        assert r.status == 200 and "/static/app.js" in r.read().decode()

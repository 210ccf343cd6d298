"""The first half of the seed (reference/seed-modal-sandboxes.txt), run as written with `import shoal as modal`.

Each test holds one section's snippet unchanged and then asserts what a user
would check.  Every test runs twice: with the sandboxes under runc, then under gVisor (``each_runtime``).
"""

from __future__ import annotations

import asyncio
import time

import pytest

import shoal as modal

pytestmark = pytest.mark.usefixtures("each_runtime")


@pytest.fixture
def sandbox(each_runtime):
    """A fresh default sandbox of the daemon this run of the test talks to."""
    sb = modal.Sandbox.create(app=modal.App.lookup("sandbox-app", create_if_missing=True), timeout=120)
    yield sb
    sb.terminate()


def test_the_sections_run_under_each_runtime(sandbox, each_runtime):
    p = sandbox.exec("cat", "/proc/version")
    assert p.stdout.read().startswith("Linux version 4.4.0") == (each_runtime == "gvisor")  # gVisor's own kernel


def test_basic_usage(daemon, capsys):
    # Get or create an App reference
    app = modal.App.lookup("sandbox-app", create_if_missing=True)

    # Create a sandbox
    sb = modal.Sandbox.create(app=app)

    # Execute commands
    p = sb.exec("python", "-c", "print('Hello!')")
    print(p.stdout.read())  # "Hello!\n"

    # Clean up
    sb.terminate()

    assert capsys.readouterr().out == "Hello!\n\n"
    assert sb.poll() == 137


def test_timeouts(daemon):
    app = modal.App.lookup("sandbox-app", create_if_missing=True)
    sb = modal.Sandbox.create(
        timeout=600,  # Max 10 minutes total
        idle_timeout=60,  # Auto-terminate after 60s idle
        app=app,
    )
    try:
        assert sb.poll() is None
        info = sb.get_tags()
        assert info == {}
    finally:
        sb.terminate()


def test_working_directory(daemon):
    app = modal.App.lookup("sandbox-app", create_if_missing=True)
    sb = modal.Sandbox.create(
        workdir="/app",
        app=app,
    )
    try:
        p = sb.exec("pwd")
        assert p.stdout.read() == "/app\n"
    finally:
        sb.terminate()


def test_executing_commands(sandbox, capsys):
    sb = sandbox
    # Simple command
    p = sb.exec("python", "-c", "print(1+1)")
    p.wait()  # Wait for completion
    print(p.returncode)  # 0

    # Read output
    print(p.stdout.read())  # "2\n"
    print(p.stderr.read())  # ""

    assert capsys.readouterr().out == "0\n2\n\n\n"


def test_streaming_output(sandbox, capsys):
    sb = sandbox
    arrivals: list[float] = []
    p = sb.exec("bash", "-c", "for i in {1..5}; do echo $i; sleep 1; done")

    # Stream line by line
    for line in p.stdout:
        arrivals.append(time.monotonic())
        print(line, end="")

    assert capsys.readouterr().out == "1\n2\n3\n4\n5\n"
    # Lines arrive as they are printed (a second apart), not all together when the command ends.
    assert arrivals[-1] - arrivals[0] > 3, arrivals


def test_exec_with_timeout(sandbox):
    sb = sandbox
    started = time.monotonic()
    p = sb.exec("sleep", "100", timeout=5)
    # Modal's client returns -1 for an exec that reached its timeout (documented in README).
    assert p.wait() == -1
    assert 4.5 < time.monotonic() - started < 8


def test_with_entrypoint(daemon):
    app = modal.App.lookup("sandbox-app", create_if_missing=True)
    sb = modal.Sandbox.create(
        "python",
        "-m",
        "http.server",
        "8080",
        app=app,
        timeout=60,
    )
    lines = []
    try:
        # The server logs each request to stderr; ask for a page so it has something to say.
        p = sb.exec("python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/').read()")
        for _ in range(50):
            if p.wait() == 0:
                break
            time.sleep(0.1)
            p = sb.exec(
                "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/').read()"
            )
        sb.terminate()
        # Sandbox runs until command completes or timeout
        for line in sb.stdout:
            lines.append(line)
            print(line, end="")
        err = sb.stderr.read()
    finally:
        sb.terminate()
    assert '"GET / HTTP/1.1" 200' in err
    assert all(line.endswith("\n") for line in lines)


def test_entrypoint_stdout_lines(daemon):
    app = modal.App.lookup("sandbox-app", create_if_missing=True)
    sb = modal.Sandbox.create("bash", "-c", "for i in 1 2 3; do echo line$i; done; printf tail", app=app, timeout=60)
    out = list(sb.stdout)
    sb.wait()
    assert out == ["line1\n", "line2\n", "line3\n", "tail"]
    assert sb.returncode == 0


def test_graceful_shutdown(daemon):
    app = modal.App.lookup("sandbox-app", create_if_missing=True)
    sb = modal.Sandbox.create(app=app)
    sb.terminate()  # Request termination
    sb.wait(raise_on_termination=False)  # Wait for cleanup
    assert sb.returncode == 137


def test_check_status(sandbox, capsys):
    sb = sandbox
    if sb.poll() is None:
        print("Still running")
    else:
        print(f"Terminated with code: {sb.poll()}")
    sb.terminate()
    if sb.poll() is None:
        print("Still running")
    else:
        print(f"Terminated with code: {sb.poll()}")
    assert capsys.readouterr().out == "Still running\nTerminated with code: 137\n"


def test_async_usage(daemon, capsys):
    async def run_async():
        app = await modal.App.lookup.aio("sandbox-app", create_if_missing=True)
        sb = await modal.Sandbox.create.aio(app=app)

        p = await sb.exec.aio("python", "-c", "print('async!')")
        output = await p.stdout.read.aio()
        print(output)

        await sb.terminate.aio()

    asyncio.run(run_async())
    assert capsys.readouterr().out == "async!\n\n"


def test_llm_code_execution_shape(daemon):
    """The seed's execute_llm_code pattern, minus its pip_install image (images issue) and file write (files issue)."""

    def execute_llm_code(code: str) -> dict:
        app = modal.App.lookup("code-executor", create_if_missing=True)
        sb = modal.Sandbox.create(
            image=modal.Image.debian_slim(),
            timeout=30,
            block_network=True,
            app=app,
        )
        try:
            p = sb.exec("python", "-c", code, timeout=10)
            p.wait()
            return {
                "stdout": p.stdout.read(),
                "stderr": p.stderr.read(),
                "returncode": p.returncode,
            }
        finally:
            sb.terminate()

    assert execute_llm_code("print(6 * 7)") == {"stdout": "42\n", "stderr": "", "returncode": 0}
    result = execute_llm_code("import sys; sys.exit('boom')")
    assert result["returncode"] == 1
    assert result["stderr"] == "boom\n"


@pytest.mark.parametrize("flag", [True])
def test_security_best_practices(daemon, flag):
    app = modal.App.lookup("sandbox-app", create_if_missing=True)
    sb = modal.Sandbox.create(
        # Restrict Modal access
        restrict_modal_access=flag,
        # Block network
        block_network=flag,
        # Set timeout
        timeout=30,
        # Minimal image
        image=modal.Image.debian_slim(),
        app=app,
    )
    try:
        p = sb.exec("python", "-c", "print('ok')")
        assert p.stdout.read() == "ok\n"
    finally:
        sb.terminate()

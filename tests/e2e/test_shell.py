"""``shoal sandbox shell``, ``shoal sandbox exec -it`` and ``shoal run -it`` in a real terminal: tmux, typed into
with send-keys and read with capture-pane (issue 17)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed: make setup")


class Tmux:
    """A tmux server of our own (its own socket), one session ``t`` running the command under test."""

    def __init__(self, socket: Path, env: dict[str, str]) -> None:
        self.socket = socket
        self.env = {**env, "TERM": "xterm-256color"}

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", str(self.socket), *args], env=self.env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, argv: list[str], cols: int = 100, rows: int = 30) -> None:
        # A shell around the command prints its exit status and keeps the pane (and its screen) until the end:
        # tmux 3.3 stops reporting a pane's exit status (#{pane_dead_status}) once resize-window has been used.
        command = f'{shlex.join(argv)}; echo "[exited $?]"; sleep 600'
        self.tmux("new-session", "-d", "-s", "t", "-x", str(cols), "-y", str(rows), command)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", line)
        self.tmux("send-keys", "-t", "t", "Enter")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            assert time.monotonic() < deadline, f"{text!r} never showed; the screen:\n{screen}"
            time.sleep(0.1)

    def exit_status(self, timeout: float = 30) -> int:
        """The exit status of the command, once it has ended."""
        screen = self.wait_for("[exited ", timeout)
        return int(screen.rsplit("[exited ", 1)[1].split("]", 1)[0])


@pytest.fixture
def tmux(daemon, tmp_path) -> Iterator[Tmux]:  # type: ignore[no-untyped-def]
    t = Tmux(tmp_path / "tmux.sock", daemon.env)
    try:
        yield t
    finally:
        if t.socket.exists():
            subprocess.run(["tmux", "-S", str(t.socket), "kill-server"], capture_output=True, timeout=30)


def shoal_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "shoal", *args]


def test_a_shell_is_a_real_terminal(tmux, sandbox) -> None:  # type: ignore[no-untyped-def]
    tmux.start(shoal_cmd("sandbox", "shell", sandbox.object_id))
    tmux.wait_for("#")  # root's prompt
    tmux.type("echo hi-$((6 * 7))")
    tmux.wait_for("hi-42")
    tmux.type("tty; stty size")
    screen = tmux.wait_for("30 100")
    assert "/dev/pts/" in screen

    # Resizing our window resizes the sandbox's terminal.
    tmux.tmux("resize-window", "-t", "t", "-x", "120", "-y", "40")
    tmux.type("clear; stty size")
    tmux.wait_for("40 120")

    # Ctrl-C reaches the command in the sandbox, not the CLI: the shell lives on.
    tmux.type("clear; sleep 100")
    time.sleep(0.5)
    tmux.keys("C-c")
    tmux.type("echo after-$((1 + 1))")
    tmux.wait_for("after-2", timeout=20)  # a Ctrl-C that did not arrive leaves sleep running for 100 s

    tmux.type("exit 7")
    assert tmux.exit_status() == 7
    assert sandbox.poll() is None  # the shell ended, not the sandbox


def test_exec_it_sends_keys_and_passes_the_exit_code_on(tmux, sandbox) -> None:  # type: ignore[no-untyped-def]
    script = "tty >/dev/null && echo on-a-tty; read x; echo got-$x; exit 3"
    tmux.start(shoal_cmd("sandbox", "exec", "-it", sandbox.object_id, "--", "sh", "-c", script))
    tmux.wait_for("on-a-tty")
    tmux.type("abc")
    tmux.wait_for("got-abc")
    assert tmux.exit_status() == 3


def test_run_it_gives_a_fresh_sandbox_a_terminal(tmux, app) -> None:  # type: ignore[no-untyped-def]
    tmux.start(
        shoal_cmd("run", "-it", "--app", "shoal-tests-shell", "--", "sh", "-c", "stty size; read x; exit 5"),
        cols=90,
        rows=25,
    )
    tmux.wait_for("25 90", timeout=60)
    tmux.type("")
    assert tmux.exit_status() == 5
    # shoal run removes its sandbox afterwards.
    shell_app = shoal.App.lookup("shoal-tests-shell", create_if_missing=True)
    assert list(shoal.Sandbox.list(app_id=shell_app.app_id)) == []


def test_it_without_a_terminal_says_so(daemon, sandbox) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        shoal_cmd("sandbox", "exec", "-it", sandbox.object_id, "--", "true"),
        env=daemon.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"not a terminal" in done.stderr

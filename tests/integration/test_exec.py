"""sb.exec: exit codes, streams, text and bytes, stdin, environment, workdir, deadlines."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

import shoal
from shoal.exception import ConflictError, InvalidError


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 42", 42),
        ("exit 255", 255),
        ("kill -TERM $$", 128 + 15),
        ("kill -KILL $$", 128 + 9),
        ("kill -INT $$", 128 + 2),
    ],
)
def test_exit_code_table(sandbox, command, code):
    assert sandbox.exec("bash", "-c", command).wait() == code


def test_exec_deadline_gives_minus_one_and_ends_streams(sandbox):
    p = sandbox.exec("bash", "-c", "echo before; sleep 30 & wait", timeout=1)
    assert p.stdout.read() == "before\n"
    assert p.wait() == -1
    assert p.poll() == -1
    assert p.returncode == -1


def test_missing_command_is_127_with_message(sandbox):
    p = sandbox.exec("no-such-command-xyz")
    assert p.wait() == 127
    assert "no-such-command-xyz" in p.stderr.read()


def test_not_executable_is_126(sandbox):
    p = sandbox.exec("/etc/passwd")
    assert p.wait() == 126


def test_returncode_before_wait_is_invalid(sandbox):
    p = sandbox.exec("sleep", "5")
    with pytest.raises(InvalidError, match="wait"):
        _ = p.returncode
    assert p.poll() is None


def test_stdout_and_stderr_are_separate(sandbox):
    p = sandbox.exec("bash", "-c", "echo out; echo err >&2; echo out2")
    assert p.stdout.read() == "out\nout2\n"
    assert p.stderr.read() == "err\n"
    assert p.wait() == 0


def test_read_after_eof_is_empty(sandbox):
    p = sandbox.exec("echo", "once")
    assert p.stdout.read() == "once\n"
    assert p.stdout.read() == ""


def test_bytes_mode_carries_every_byte_value(sandbox):
    p = sandbox.exec("python3", "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4)", text=False)
    data = p.stdout.read()
    assert isinstance(data, bytes)
    assert data == bytes(range(256)) * 4


def test_text_mode_decodes_utf8_split_across_chunks(sandbox):
    script = (
        "import sys,time\nb='héllo wörld ✓'.encode()\nfor i in range(len(b)):\n"
        " sys.stdout.buffer.write(b[i:i+1]); sys.stdout.flush(); time.sleep(0.002)"
    )
    p = sandbox.exec("python3", "-c", script)
    assert p.stdout.read() == "héllo wörld ✓"


def test_ten_megabytes_of_output_intact(sandbox):
    size = 10 * 1024 * 1024
    script = f"import os,sys\nrnd=os.urandom(1<<20)\nfor _ in range({size >> 20}): sys.stdout.buffer.write(rnd)"
    p = sandbox.exec("python3", "-c", script, text=False)
    data = p.stdout.read()
    assert p.wait() == 0
    assert len(data) == size
    assert data[: 1 << 20] * (size >> 20) == data


def test_chunk_iteration_and_line_iteration(sandbox):
    p = sandbox.exec("bash", "-c", "printf 'a\\nb\\nc'", bufsize=1)
    assert list(p.stdout) == ["a\n", "b\n", "c"]
    p = sandbox.exec("bash", "-c", "printf 'a\\nb\\nc'")
    assert "".join(p.stdout) == "a\nb\nc"


def test_line_buffering_needs_text(sandbox):
    with pytest.raises(ValueError, match="line-buffering"):
        sandbox.exec("true", text=False, bufsize=1)


def test_stdin_round_trip(sandbox):
    p = sandbox.exec("bash", "-c", "while read line; do echo got:$line; done; echo done")
    p.stdin.write("one\n")
    p.stdin.write(b"two\n")
    p.stdin.drain()
    p.stdin.write("three\n")
    p.stdin.write_eof()
    p.stdin.drain()
    assert p.stdout.read() == "got:one\ngot:two\ngot:three\ndone\n"
    assert p.wait() == 0


def test_stdin_large_binary_round_trip(sandbox):
    payload = bytes(range(256)) * 40000  # ~10 MB
    p = sandbox.exec("python3", "-c", "import sys,hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
    p.stdin.write(payload)
    p.stdin.write_eof()
    p.stdin.drain()
    assert p.stdout.read().strip() == hashlib.sha256(payload).hexdigest()


def test_stdin_write_after_eof_is_refused(sandbox):
    p = sandbox.exec("cat")
    p.stdin.write_eof()
    p.stdin.drain()
    with pytest.raises(ValueError, match="closed"):
        p.stdin.write("late")
    assert p.wait() == 0


def test_stdin_buffer_limit(sandbox):
    p = sandbox.exec("cat")
    with pytest.raises(BufferError):
        p.stdin.write(b"x" * (17 << 20))
    p.stdin.write_eof()
    p.stdin.drain()


def test_env_and_secrets_reach_the_process(app):
    sb = shoal.Sandbox.create(
        app=app,
        env={"SANDBOX_LEVEL": "s", "DROPPED": None},
        secrets=[shoal.Secret.from_dict({"API_KEY": "xxx"})],
        timeout=60,
    )
    try:
        p = sb.exec(
            "bash",
            "-c",
            'echo "$SANDBOX_LEVEL $API_KEY $EXEC_LEVEL $EXEC_SECRET ${DROPPED-unset}"',
            env={"EXEC_LEVEL": "e"},
            secrets=[shoal.Secret.from_dict({"EXEC_SECRET": "es"})],
        )
        assert p.stdout.read() == "s xxx e es unset\n"
        # Later layers win: exec env over sandbox env.
        p = sb.exec("bash", "-c", "echo $SANDBOX_LEVEL", env={"SANDBOX_LEVEL": "override"})
        assert p.stdout.read() == "override\n"
    finally:
        sb.terminate()


def test_secret_example_from_seed(app):
    secret = shoal.Secret.from_dict({"API_KEY": "xxx"})
    sb = shoal.Sandbox.create(secrets=[secret], app=app)
    try:
        p = sb.exec("bash", "-c", "echo $API_KEY")
        assert p.stdout.read() == "xxx\n"
    finally:
        sb.terminate()


def test_exec_workdir(sandbox):
    assert sandbox.exec("pwd", workdir="/tmp").stdout.read() == "/tmp\n"
    assert sandbox.exec("pwd").stdout.read() == "/\n"
    p = sandbox.exec("pwd", workdir="/does/not/exist")
    assert p.wait() == 126
    assert "/does/not/exist" in p.stderr.read()
    with pytest.raises(InvalidError, match="absolute"):
        sandbox.exec("pwd", workdir="relative")


def test_python_and_pip_on_path(sandbox):
    p = sandbox.exec("bash", "-c", "python --version && pip --version")
    out = p.stdout.read()
    assert p.wait() == 0, p.stderr.read()
    assert out.startswith("Python 3.11")
    assert "pip " in out


def test_streamtype_devnull_and_stdout(sandbox, capfd):
    p = sandbox.exec("bash", "-c", "echo to-devnull", stdout=shoal.StreamType.DEVNULL)
    with pytest.raises(ValueError, match="DEVNULL"):
        p.stdout.read()
    assert p.wait() == 0
    p = sandbox.exec("bash", "-c", "echo printed-locally", stdout=shoal.StreamType.STDOUT)
    with pytest.raises(InvalidError, match="PIPE"):
        p.stdout.read()
    assert p.wait() == 0
    assert "printed-locally" in capfd.readouterr().out


def test_bad_arguments_are_clear_errors(sandbox):
    with pytest.raises(InvalidError, match="strings"):
        sandbox.exec("echo", 5)  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="65536"):
        sandbox.exec("echo", "x" * 70000)
    with pytest.raises(InvalidError, match="NUL"):
        sandbox.exec("echo", "a\x00b")
    with pytest.raises(InvalidError, match="environment variable name"):
        sandbox.exec("true", env={"BAD-NAME": "x"})
    with pytest.raises(InvalidError, match="needs a command"):
        sandbox.exec()
    with pytest.raises(InvalidError, match="timeout"):
        sandbox.exec("true", timeout=0)


def test_exec_on_finished_sandbox_is_conflict(app):
    sb = shoal.Sandbox.create(app=app)
    sb.terminate()
    with pytest.raises(ConflictError):
        sb.exec("true")


def test_many_execs_in_parallel(sandbox):
    async def run() -> list[str]:
        async def one(i: int) -> str:
            p = await sandbox.exec.aio("bash", "-c", f"echo {i}")
            return await p.stdout.read.aio()

        return await asyncio.gather(*(one(i) for i in range(40)))

    assert asyncio.run(run()) == [f"{i}\n" for i in range(40)]


def test_async_iteration_of_streams(sandbox):
    async def run() -> list[str]:
        p = await sandbox.exec.aio("bash", "-c", "for i in 1 2 3; do echo $i; done", bufsize=1)
        return [line async for line in p.stdout]

    assert asyncio.run(run()) == ["1\n", "2\n", "3\n"]


def test_partial_iteration_then_read_loses_nothing(sandbox):
    p = sandbox.exec("bash", "-c", "printf '1\\n2\\n3\\n4\\n'", bufsize=1)
    it = iter(p.stdout)
    assert next(it) == "1\n"
    assert p.stdout.read() == "2\n3\n4\n"


def test_zombies_are_reaped(sandbox):
    p = sandbox.exec(
        "bash", "-c", "for i in $(seq 20); do (sleep 0.01 &) ; done; sleep 0.5; ps -eo stat | grep -c '^Z' || true"
    )
    assert p.stdout.read().strip() == "0"


def test_background_process_survives_its_exec(sandbox):
    sandbox.exec("bash", "-c", "nohup sleep 60 >/dev/null 2>&1 &").wait()
    p = sandbox.exec("bash", "-c", "pgrep -x sleep")
    assert p.wait() == 0


def test_exec_on_a_pty_merges_stderr_into_stdout(sandbox):
    p = sandbox.exec("bash", "-c", "tty; test -t 0 && test -t 1 && test -t 2 && echo all-tty; echo err >&2", pty=True)
    out = p.stdout.read()
    assert p.wait() == 0
    assert out.replace("\r\n", "\n").split("\n")[1:] == ["all-tty", "err", ""]
    assert out.startswith("/dev/pts/")
    assert p.stderr.read() == ""


def test_entrypoint_on_a_pty(app):
    sb = shoal.Sandbox.create("bash", "-c", "tty; echo out; echo err >&2; exit 3", app=app, pty=True)
    sb.wait()
    assert sb.returncode == 3
    out = sb.stdout.read().replace("\r\n", "\n")
    assert out.startswith("/dev/pts/") and out.endswith("out\nerr\n")
    assert sb.stderr.read() == ""


def test_a_stream_is_an_iterator_too(sandbox):
    """``next(p.stdout)`` and ``await anext(p.stdout)``, as code written for Modal reads a stream."""
    p = sandbox.exec("bash", "-c", "echo one; echo two", bufsize=1)
    assert next(p.stdout) == "one\n"
    assert next(p.stdout) == "two\n"
    with pytest.raises(StopIteration):
        next(p.stdout)
    assert p.wait() == 0

    q = sandbox.exec("bash", "-c", "echo three; sleep 30", bufsize=1)
    assert next(q.stdout) == "three\n"
    q.stdout.close()  # gives up the rest: nothing is left waiting on the stream

    async def run() -> list[str]:
        r = await sandbox.exec.aio("bash", "-c", "echo four; echo five", bufsize=1)
        got = [await anext(r.stdout), await anext(r.stdout)]
        with pytest.raises(StopAsyncIteration):
            await anext(r.stdout)
        await r.stdout.aclose()
        return got

    assert asyncio.run(run()) == ["four\n", "five\n"]

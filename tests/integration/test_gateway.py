"""The gateway (``shoal.gateway``, decision 0075): the unmodified official ``modal`` client (1.6.4, a test
dependency) drives the daemon, with nothing but the environment ``shoal gateway env`` prints.

Each test runs a client program in a process of its own, as a user would, and checks what it printed; sandboxes
it makes are the daemon's like any other (the SDK sees them, and the session's leak check covers them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest

import shoal
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.conftest import REPO
from tests.netkit import host_port_reach

pytest.importorskip("modal_proto", reason="the official modal client is a test dependency: make setup")


def gateway_env() -> dict[str, str]:
    env: dict[str, str] = run_blocking(default_client().request("GET", "/v1/gateway"))["env"]
    return env


def run_client(program: str, *, env: dict[str, str] | None = None, timeout: int = 240) -> Any:
    """Run ``program`` (Python that imports the official ``modal``) against the session daemon's gateway; the JSON
    value of its last printed line."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SHOAL_"))}
    environ.update(gateway_env() if env is None else env)
    environ["MODAL_CONFIG_PATH"] = "/nonexistent/.modal.toml"  # no user's profile in the way
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, f"the client failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gateway_env_prints_what_points_the_client_here(daemon):
    env = {**os.environ, "SHOAL_RUNTIME_DIR": str(daemon.runtime_dir), "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(
        [sys.executable, "-m", "shoal", "gateway", "env"], env=env, capture_output=True, text=True, check=True
    ).stdout
    lines = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    assert set(lines) == {"MODAL_SERVER_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"}
    assert lines["MODAL_SERVER_URL"].startswith("http://127.0.0.1:")
    assert lines["MODAL_TOKEN_ID"] == gateway_env()["MODAL_TOKEN_ID"]
    assert (daemon.root / "data" / "gateway-tokens.json").stat().st_mode & 0o077 == 0


def test_the_seeds_basic_usage_through_the_official_client(daemon):
    got = run_client(
        """
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create(app=app)
        p = sb.exec("python", "-c", "import sys; print('Hello!'); print('oops', file=sys.stderr); sys.exit(3)")
        out, err, code = p.stdout.read(), p.stderr.read(), p.wait()
        running = sb.poll()
        sb.terminate()
        print(json.dumps([out, err, code, running, sb.poll(), sb.object_id]))
        """
    )
    assert got[:5] == ["Hello!\n", "oops\n", 3, None, 137]
    # The daemon's own API sees the same sandbox, ended the same way.
    assert shoal.Sandbox.from_id(got[5]).poll() == 137


def test_calls_made_right_after_create_wait_for_the_start(daemon):
    # SandboxCreateV2 answers once the sandbox is admitted, before its container has started (decision 0075):
    # a terminate or an exec sent at once must wait for the start, from the warm pool (the first two) or cold.
    got = run_client(
        """
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        ended = []
        for _ in range(4):
            sb = modal.Sandbox.create(app=app)
            sb.terminate()
            ended.append([sb.object_id, sb.wait(raise_on_termination=False), sb.returncode])
        sb = modal.Sandbox.create("sh", "-c", "echo entry; sleep 100", app=app, workdir="/tmp")
        p = sb.exec("pwd")
        first = [p.stdout.read(), p.wait(), next(iter(sb.stdout))]
        sb.terminate()
        print(json.dumps([ended, first]))
        """
    )
    ended, first = got
    assert [code for _, _, code in ended] == [137] * 4
    assert all(shoal.Sandbox.from_id(sandbox_id).poll() == 137 for sandbox_id, _, _ in ended)
    assert first == ["/tmp\n", 0, "entry\n"]


def test_entrypoint_streams_stdin_and_timeouts(daemon):
    got = run_client(
        """
        import json, time, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create("bash", "-c", "for i in 1 2 3; do echo line$i; done; echo bad >&2; exit 4",
                                  app=app, timeout=60)
        lines = list(sb.stdout)
        err = sb.stderr.read()
        sb.wait(raise_on_termination=False)
        cat = modal.Sandbox.create("cat", app=app, timeout=60)
        cat.stdin.write(b"echoed back\\n")
        cat.stdin.write_eof()
        cat.stdin.drain()
        echoed = cat.stdout.read()
        cat.wait()
        short = modal.Sandbox.create(app=app, timeout=2)
        t0 = time.monotonic()
        try:
            short.wait()
            raised = None
        except modal.exception.SandboxTimeoutError:
            raised = "SandboxTimeoutError"
        print(json.dumps([lines, err, sb.returncode, echoed, cat.returncode, raised, short.returncode,
                          time.monotonic() - t0]))
        """
    )
    lines, err, code, echoed, cat_code, raised, short_code, waited = got
    assert (lines, err, code) == (["line1\n", "line2\n", "line3\n"], "bad\n", 4)
    assert (echoed, cat_code) == ("echoed back\n", 0)
    assert (raised, short_code) == ("SandboxTimeoutError", 124)
    assert waited < 30


def test_exec_env_secrets_workdir_stdin_timeout_and_poll(daemon):
    got = run_client(
        """
        import json, time, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create(app=app, workdir="/work", env={"FROM_ENV": "e"},
                                  secrets=[modal.Secret.from_dict({"FROM_SECRET": "s"})])
        p = sb.exec("bash", "-c", "pwd; echo $FROM_ENV $FROM_SECRET $PER_EXEC", env={"PER_EXEC": "x"})
        env_out = p.stdout.read()
        c = sb.exec("cat")
        c.stdin.write(b"to stdin")
        c.stdin.write_eof()
        c.stdin.drain()
        stdin_out = c.stdout.read()
        t0 = time.monotonic()
        slow = sb.exec("sleep", "30", timeout=1)
        timed_out = slow.wait()
        took = time.monotonic() - t0
        q = sb.exec("sleep", "1")
        first = q.poll()
        time.sleep(2)
        print(json.dumps([env_out, stdin_out, c.wait(), timed_out, took, first, q.poll()]))
        sb.terminate()
        """
    )
    env_out, stdin_out, cat_code, timed_out, took, first, later = got
    assert env_out == "/work\ne s x\n"
    assert (stdin_out, cat_code) == ("to stdin", 0)
    assert timed_out == -1 and took < 5  # Modal's client answers -1 for an exec past its timeout
    assert (first, later) == (None, 0)


def test_one_engine_behind_both_clients(daemon):
    """A sandbox made through the gateway is the SDK's, and one made by the SDK is the official client's."""
    app = shoal.App.lookup("gateway-tests", create_if_missing=True)
    mine = shoal.Sandbox.create(app=app, name="made-by-shoal", timeout=120)
    try:
        mine.set_tags({"made": "shoal"})
        got = run_client(
            f"""
            import json, modal
            app = modal.App.lookup("gateway-tests")
            theirs = modal.Sandbox.from_id({mine.object_id!r})
            p = theirs.exec("echo", "reached")
            by_name = modal.Sandbox.from_name("gateway-tests", "made-by-shoal")
            listed = [s.object_id for s in modal.Sandbox.list(app_id=app.app_id, tags={{"made": "shoal"}})]
            made = modal.Sandbox.create(app=app, tags={{"made": "modal"}})
            made.set_tags({{"made": "modal", "extra": "1"}})
            print(json.dumps([p.stdout.read(), p.wait(), by_name.object_id, listed, theirs.get_tags(),
                              made.object_id]))
            """
        )
        out, code, by_name, listed, tags, made_id = got
        assert (out, code) == ("reached\n", 0)
        assert by_name == mine.object_id and listed == [mine.object_id]
        assert tags == {"made": "shoal"}
        made = shoal.Sandbox.from_id(made_id)
        try:
            assert made.get_tags() == {"made": "modal", "extra": "1"}
            assert made.exec("echo", "from shoal").stdout.read() == "from shoal\n"
        finally:
            made.terminate()
    finally:
        mine.terminate()


def test_images_are_built_with_their_logs_shown(daemon):
    got = run_client(
        """
        import contextlib, io, json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        image = modal.Image.debian_slim().run_commands("echo built-by-gateway > /built.txt").env({"IMAGE_VAR": "1"})
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown), modal.enable_output():
            sb = modal.Sandbox.create(app=app, image=image)
        p = sb.exec("bash", "-c", "cat /built.txt; echo $IMAGE_VAR; python3 --version")
        out = p.stdout.read()
        sb.terminate()
        print(json.dumps([out, shown.getvalue()]))
        """
    )
    out, shown = got
    lines = out.splitlines()
    assert lines[:2] == ["built-by-gateway", "1"] and lines[2].startswith("Python 3.")
    assert "echo built-by-gateway" in shown  # the build's log reached the client's output


def test_block_network_holds_through_the_gateway(daemon):
    got = run_client(
        """
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create(app=app, block_network=True)
        p = sb.exec("python3", "-c", "import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)")
        code = p.wait()
        sb.terminate()
        print(json.dumps(code))
        """
    )
    assert got == 1


def test_sandbox_filesystem_through_the_official_client(daemon):
    got = run_client(
        """
        import json, threading, time, modal
        from modal.types import FileWatchEventType
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create(app=app)
        fs = sb.filesystem
        fs.write_text("hello", "/work/dir/a.txt")  # parents made
        fs.write_bytes(b"\\x00\\x01", "/work/dir/b.bin")
        fs.make_directory("/work/dir/sub")
        listed = [(i.name, i.path, i.type.value, i.size) for i in fs.list_files("/work/dir")]
        st = fs.stat("/work/dir/a.txt")
        errors = []
        try:
            fs.read_text("/work/missing.txt")
        except Exception as e:
            errors.append(type(e).__name__)
        try:
            fs.remove("/work/dir")
        except Exception as e:
            errors.append(type(e).__name__)
        fs.remove("/work/dir", recursive=True)
        gone = sb.exec("test", "-e", "/work/dir").wait()
        events = []

        def watch():
            kinds = [FileWatchEventType.Create, FileWatchEventType.Remove]
            for event in fs.watch("/work", recursive=True, filter=kinds, timeout=4):
                events.append([event.type.value, event.paths])

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(1.5)
        sb.exec("bash", "-c", "mkdir -p /work/w; echo x > /work/w/f; echo y >> /work/w/f; rm /work/w/f").wait()
        watcher.join(15)
        out = [fs.read_text("/etc/hostname") != "", listed, [st.name, st.path, st.size, st.permissions], errors, gone]
        sb.terminate()
        print(json.dumps(out + [events]))
        """
    )
    nonempty, listed, st, errors, gone, events = got
    # Only the kinds asked for (the append is a Modify), each with the path it happened to.
    assert events == [["Create", ["/work/w"]], ["Create", ["/work/w/f"]], ["Remove", ["/work/w/f"]]]
    assert nonempty
    assert listed == [
        ["a.txt", "/work/dir/a.txt", "file", 5],
        ["b.bin", "/work/dir/b.bin", "file", 2],
        ["sub", "/work/dir/sub", "directory", listed[2][3]],
    ]
    assert st == ["a.txt", "/work/dir/a.txt", 5, "0644"]
    assert errors == ["SandboxFilesystemNotFoundError", "SandboxFilesystemDirectoryNotEmptyError"]
    assert gone == 1


def test_tunnels_and_filesystem_snapshots(daemon):
    got = run_client(
        """
        import json, socket, time, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create("python3", "-m", "http.server", "8000", app=app, unencrypted_ports=[8000],
                                  encrypted_ports=[8001])
        tunnels = sb.tunnels()
        host, port = tunnels[8000].tcp_socket
        answer = b""
        for _ in range(100):
            try:
                with socket.create_connection((host, port), timeout=2) as s:
                    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                    answer = s.recv(100)
                if answer:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        sb.exec("bash", "-c", "echo kept > /kept.txt").wait()
        image = sb.snapshot_filesystem()
        sb.terminate()
        again = modal.Sandbox.create(app=app, image=image)
        kept = again.exec("cat", "/kept.txt").stdout.read()
        again.terminate()
        print(json.dumps([sorted(tunnels), tunnels[8001].url[:8], answer[:15].decode(), image.object_id[:3], kept]))
        """
    )
    assert got == [[8000, 8001], "https://", "HTTP/1.0 200 OK", "im-", "kept\n"]


def test_app_run_named_secrets_and_handles_from_id(daemon):
    name = f"gateway-secret-{os.getpid()}"
    shoal.Secret.objects.create(name, {"NAMED": "from-shoal"})
    try:
        got = run_client(
            f"""
            import json, time, modal
            eph = modal.App("gateway-ephemeral")
            with eph.run():
                sb = modal.Sandbox.create(app=eph, secrets=[modal.Secret.from_name({name!r})])
                named = sb.exec("bash", "-c", "echo $NAMED").stdout.read()
            time.sleep(0.5)
            ended_with_run = sb.poll()
            app = modal.App.lookup("gateway-tests", create_if_missing=True)
            reader = modal.Sandbox.create("bash", "-c", "read x; echo got $x; echo err >&2", app=app, timeout=60)
            handle = modal.Sandbox.from_id(reader.object_id)  # a handle of the other kind (V1 calls)
            handle.stdin.write(b"abc\\n")
            handle.stdin.drain()
            out, err = handle.stdout.read(), handle.stderr.read()
            handle.wait(raise_on_termination=False)
            print(json.dumps([named, ended_with_run, out, err, handle.returncode]))
            """
        )
    finally:
        shoal.Secret.objects.delete(name)
    assert got == ["from-shoal\n", 137, "got abc\n", "err\n", 0]


def test_the_seeds_volume_examples_through_the_official_client(daemon, tmp_path):
    (tmp_path / "local.txt").write_text("local contents\n")
    (tmp_path / "local_dir").mkdir()
    (tmp_path / "local_dir" / "one.txt").write_text("one\n")
    (tmp_path / "big.bin").write_bytes(os.urandom(9 << 20))  # two of the client's 8 MiB blocks
    name = f"gateway-volume-{os.getpid()}"
    got = run_client(
        f"""
        import hashlib, json, os, modal
        os.chdir({str(tmp_path)!r})
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        volume = modal.Volume.from_name({name!r}, create_if_missing=True)
        sb = modal.Sandbox.create(volumes={{"/data": volume}}, app=app)
        sb.exec("bash", "-c", "echo 'hello' > /data/output.txt").wait()
        sb.terminate()
        sb2 = modal.Sandbox.create(volumes={{"/data": volume}}, app=app)
        persisted = sb2.exec("cat", "/data/output.txt").stdout.read()
        sb2.terminate()
        try:
            with volume.batch_upload() as batch:
                batch.put_file("local.txt", "/output.txt")
            clash = None
        except FileExistsError:
            clash = "FileExistsError"
        with modal.Volume.ephemeral() as vol:
            with vol.batch_upload() as batch:
                batch.put_file("local.txt", "/remote.txt")
                batch.put_directory("./local_dir", "/remote_dir")
                batch.put_file("big.bin", "/big.bin")
            sb = modal.Sandbox.create(volumes={{"/data": vol}}, app=app)
            inside = sb.exec("bash", "-c", "cat /data/remote.txt /data/remote_dir/one.txt; sha256sum < /data/big.bin")
            seen = inside.stdout.read()
            sb.exec("bash", "-c", "cat /data/remote.txt > /data/output.txt").wait()
            sb.terminate()
            sb.wait(raise_on_termination=False)
            out = b"".join(vol.read_file("output.txt")).decode()
            big = hashlib.sha256(b"".join(vol.read_file("big.bin"))).hexdigest()
            listed = sorted(e.path for e in vol.listdir("/", recursive=True))
            vol.remove_file("output.txt")
            after = sorted(e.path for e in vol.listdir("/"))
        modal.Volume.objects.delete({name!r})
        print(json.dumps([persisted, clash, seen, out, big, listed, after]))
        """
    )
    persisted, clash, seen, out, big, listed, after = got
    digest = hashlib.sha256((tmp_path / "big.bin").read_bytes()).hexdigest()
    assert (persisted, clash) == ("hello\n", "FileExistsError")
    assert seen == f"local contents\none\n{digest}  -\n"
    assert (out, big) == ("local contents\n", digest)
    assert listed == ["big.bin", "output.txt", "remote.txt", "remote_dir", "remote_dir/one.txt"]
    assert after == ["big.bin", "remote.txt", "remote_dir"]
    with pytest.raises(shoal.exception.NotFoundError):
        shoal.Volume.from_name(name).listdir("/")


def test_block_urls_must_be_the_gateways(daemon):
    """The block store's URLs are signed: an altered or made-up one is refused."""
    import asyncio
    import urllib.error
    import urllib.request

    from grpclib.client import Channel
    from modal_proto import api_pb2
    from modal_proto.api_grpc import ModalClientStub

    vol = shoal.Volume.from_name(f"gateway-blocks-{os.getpid()}", create_if_missing=True)
    try:
        with vol.batch_upload() as batch:
            batch.put_file("/etc/hostname", "/h.txt")
        env = gateway_env()

        async def get_urls() -> list[str]:
            host, port = env["MODAL_SERVER_URL"].removeprefix("http://").split(":")
            channel = Channel(host, int(port))
            try:
                metadata = {
                    "x-modal-token-id": env["MODAL_TOKEN_ID"],
                    "x-modal-token-secret": env["MODAL_TOKEN_SECRET"],
                }
                req = api_pb2.VolumeGetFile2Request(volume_id=vol.object_id, path="h.txt")
                return list((await ModalClientStub(channel).VolumeGetFile2(req, metadata=metadata)).get_urls)
            finally:
                channel.close()

        (url,) = asyncio.run(get_urls())
        with open("/etc/hostname", "rb") as f, urllib.request.urlopen(url) as answer:
            assert answer.read() == f.read()
        for bad in (url.replace("start=0", "start=1"), url.split("&sig=")[0] + "&sig=AAAA", url.split("?")[0]):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(bad).close()
            caught.value.close()
            assert caught.value.code == 403
    finally:
        shoal.Volume.objects.delete(f"gateway-blocks-{os.getpid()}")


def test_the_older_sandbox_calls_modal_still_uses(daemon):
    """The client's V1 calls (for gpu=, a pty, or MODAL_SANDBOX_V2=0): create with env, entrypoint streams and
    stdin, exec, wait, terminate — and gpu= answered as shoal's SDK answers it on this machine."""
    try:
        mine = shoal.Sandbox.create(app=shoal.App.lookup("gateway-tests", create_if_missing=True), gpu="T4")
        mine.terminate()
        sdk_says = "created"
    except shoal.exception.Error as e:
        sdk_says = type(e).__name__
    got = run_client(
        """
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create("bash", "-c", "read x; echo $GREETING $x", app=app, env={"GREETING": "hi"},
                                  timeout=60)
        sb.stdin.write(b"there\\n")
        sb.stdin.drain()
        out = sb.stdout.read()
        sb.wait(raise_on_termination=False)
        other = modal.Sandbox.create(app=app)
        p = other.exec("echo", "v1 exec")
        exec_out = p.stdout.read()
        other.terminate()
        other.wait(raise_on_termination=False)
        try:
            modal.Sandbox.create(app=app, gpu="T4").terminate()
            gpu = "created"
        except Exception as e:
            gpu = type(e).__name__
        print(json.dumps([sb.object_id, out, sb.returncode, exec_out, other.returncode, gpu]))
        """,
        env={**gateway_env(), "MODAL_SANDBOX_V2": "0"},
    )
    sandbox_id, out, code, exec_out, other_code, gpu = got
    assert (out, code, exec_out, other_code) == ("hi there\n", 0, "v1 exec\n", 137)
    assert shoal.Sandbox.from_id(sandbox_id).poll() == 0
    assert gpu == sdk_says


def test_readiness_connect_tokens_and_directory_snapshots(daemon):
    got = run_client(
        """
        import json, time, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create("bash", "-c", "sleep 1; exec python3 -m http.server 8000", app=app,
                                  readiness_probe=modal.Probe.with_tcp(8000))
        t0 = time.monotonic()
        sb.wait_until_ready(timeout=30)
        waited = time.monotonic() - t0
        p = sb.exec("python3", "-c", "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)")
        served = p.stdout.read()
        token = sb.create_connect_token(user_metadata={"user": "me"})
        sb.exec("bash", "-c", "mkdir -p /snapdir && echo in-dir > /snapdir/f.txt").wait()
        image = sb.snapshot_directory("/snapdir")
        sb.terminate()
        other = modal.Sandbox.create(app=app)
        other.mount_image("/mnt/snap", image)
        mounted = other.exec("cat", "/mnt/snap/f.txt").stdout.read()
        other.terminate()
        print(json.dumps([waited, served, token.url[:8], bool(token.token), image.object_id[:3], mounted]))
        """
    )
    waited, served, url, has_token, image, mounted = got
    assert 0.5 < waited < 20 and served == "200\n"
    assert (url, has_token, image, mounted) == ("https://", True, "im-", "in-dir\n")


@pytest.mark.skipif(shutil.which("runsc") is None, reason="memory snapshots need gVisor (runsc): make setup")
def test_memory_snapshots_through_the_official_client(daemon):
    got = run_client(
        """
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        counter = "import sys\\nn = 0\\nfor line in sys.stdin:\\n    n += 1\\n    print(n, line.strip(), flush=True)"
        sb = modal.Sandbox.create("python3", "-c", counter, app=app, runtime="gvisor")
        sb.stdin.write(b"a\\n")
        sb.stdin.drain()
        lines = sb.stdout
        first = next(iter(lines))
        snap = sb._experimental_snapshot()
        fork = modal.Sandbox._experimental_from_snapshot(snap)
        fork.stdin.write(b"b\\n")
        fork.stdin.drain()
        forked = next(iter(fork.stdout))
        sb.stdin.write(b"c\\n")
        sb.stdin.drain()
        original = next(iter(lines))
        again = modal.SandboxSnapshot.from_id(snap.object_id)
        second = modal.Sandbox._experimental_from_snapshot(again)
        second.stdin.write(b"d\\n")
        second.stdin.drain()
        twice = next(iter(second.stdout))
        for s in (sb, fork, second):
            s.terminate()
        print(json.dumps([first, forked, original, twice, snap.object_id[:3]]))
        """
    )
    # The fork carries on from the counter's memory (2), independently of the original and of another fork.
    assert got == ["1 a\n", "2 b\n", "2 c\n", "2 d\n", "sn-"]


def test_the_seeds_streaming_security_and_llm_sections(daemon):
    got = run_client(
        """
        import json, time, modal
        app = modal.App.lookup("sandbox-app", create_if_missing=True)
        sb = modal.Sandbox.create(app=app)
        arrivals = []
        p = sb.exec("bash", "-c", "for i in {1..3}; do echo $i; sleep 1; done")
        for line in p.stdout:
            arrivals.append([line, time.monotonic()])
        sb.terminate()

        sb = modal.Sandbox.create(  # (restrict_modal_access is gone from modal 1.6's create)
            block_network=True,
            timeout=30,
            image=modal.Image.debian_slim(),
            app=app,
        )
        ok = sb.exec("python", "-c", "print('ok')").stdout.read()
        sb.terminate()

        def execute_llm_code(code: str) -> dict:
            app = modal.App.lookup("code-executor", create_if_missing=True)
            sb = modal.Sandbox.create(image=modal.Image.debian_slim(), timeout=30, block_network=True, app=app)
            try:
                sb.filesystem.write_text(code, "/tmp/code.py")  # modal 1.6's file API (sb.open is gone)
                p = sb.exec("python", "/tmp/code.py", timeout=10)
                p.wait()
                return {"stdout": p.stdout.read(), "stderr": p.stderr.read(), "returncode": p.returncode}
            finally:
                sb.terminate()

        good, bad = execute_llm_code("print(6 * 7)"), execute_llm_code("import sys; sys.exit('boom')")
        print(json.dumps([arrivals, ok, good, bad]))
        """
    )
    arrivals, ok, good, bad = got
    assert [line for line, _ in arrivals] == ["1\n", "2\n", "3\n"]
    assert arrivals[-1][1] - arrivals[0][1] > 1.5  # each line as it was printed, not all at the end
    assert ok == "ok\n"
    assert good == {"stdout": "42\n", "stderr": "", "returncode": 0}
    assert bad == {"stdout": "", "stderr": "boom\n", "returncode": 1}


def test_sidecars_through_the_official_client(daemon):
    got = run_client(
        """
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        image = modal.Image.debian_slim()
        image.build(app)
        sb = modal.Sandbox.create(app=app)
        side = sb._experimental_sidecars.create("python3", "-m", "http.server", "9000", name="web", image=image)
        probe = (
            "import time, urllib.request as u\\n"
            "for _ in range(100):\\n"
            "    try:\\n"
            "        print(u.urlopen('http://web:9000/').status)\\n"
            "        break\\n"
            "    except OSError:\\n"
            "        time.sleep(0.1)"
        )
        reached = sb.exec("python3", "-c", probe).stdout.read()
        inside = side.exec("cat", "/etc/hostname")
        names = [s.name for s in sb._experimental_sidecars.list()]
        same = sb._experimental_sidecars.get(name="web").exec("echo", "again").stdout.read()
        side.terminate()
        after = [s.name for s in sb._experimental_sidecars.list()]
        sb.terminate()
        print(json.dumps([reached, inside.wait(), names, same, after]))
        """,
        timeout=120,
    )
    assert got == ["200\n", 0, ["web"], "again\n", []]


def test_sandbox_stats_and_names_through_the_official_client(daemon):
    got = run_client(
        """
        import json, time, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create(app=app, timeout=60, cpu=0.5)
        p = sb.exec("python3", "-c", "import time\\nend = time.time() + 2\\nwhile time.time() < end: pass")
        p.wait()
        time.sleep(1.2)
        s = sb._experimental_stats()
        name = "stats-" + sb.object_id[-8:].lower()
        sb._experimental_set_name(name)
        named = modal.Sandbox._experimental_from_name("gateway-tests", name).object_id == sb.object_id
        sb.terminate()
        cpu = s.percentile_stats["CPU Usage (cores)"]
        print(json.dumps({
            "seconds": s.duration.total_seconds(), "ordered": s.since < s.until, "unit": cpu.unit,
            "points": [p.percentile for p in cpu.percentiles], "p99": cpu.percentiles[-1].value,
            "memory": s.percentile_stats["Memory Usage (GiB)"].percentiles[0].value, "cost": s.cost,
            "billed_cpu": s.billed_cpu_core_seconds, "named": named,
        }))
        """,
        timeout=120,
    )
    assert got["ordered"] and 2 < got["seconds"] < 60, got
    assert got["unit"] == "cores" and got["points"] == [50.0, 90.0, 99.0], got
    assert got["p99"] > 0.5 and 0 < got["memory"] < 1 and got["cost"] is None, got
    assert got["billed_cpu"] >= 0.5 * 2, got
    assert got["named"], got  # sb._experimental_set_name, then found by that name


def test_what_the_gateway_does_not_serve_is_a_clear_error_not_a_hang(daemon):
    got = run_client(
        """
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        errors = []
        for attempt in (
            lambda: modal.Function.from_name("gateway-tests", "nothing").hydrate(),
            lambda: modal.Sandbox.create(app=app, experimental_options={"enable_docker": True}),
            lambda: modal.Sandbox.create(app=app, experimental_options={"node_labels": "zone=eu"}),
        ):
            try:
                attempt()
                errors.append(None)
            except Exception as e:
                errors.append([type(e).__name__, str(e)])
        print(json.dumps(errors))
        """,
        timeout=120,
    )
    unserved, unknown_option, labels = got
    assert unserved is not None and "shoal's gateway does not serve" in unserved[1], got
    # An experimental option shoal does not know is refused, not ignored; labels a lone daemon lacks too.
    assert unknown_option == ["InvalidError", "shoal knows one experimental option, node_labels; not enable_docker"]
    assert labels is not None and labels[0] == "InvalidError" and "lacks the labels" in labels[1], got


def test_persistent_sandboxes_through_the_official_client(daemon):
    got = run_client(
        """
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        sb = modal.Sandbox.create(app=app, timeout=None, _experimental_persistent=True)
        sb.exec("sh", "-c", "echo kept > /root/state").wait()
        sb._experimental_pause()
        kept = sb.exec("cat", "/root/state").stdout.read()  # the next call starts the next session
        sb.terminate()
        try:
            sb.exec("true")
            after = None
        except Exception as e:
            after = type(e).__name__
        print(json.dumps([sb.object_id, kept, after]))
        """,
        timeout=180,
    )
    object_id, kept, after = got
    assert kept == "kept\n", got
    assert after is not None, got  # a terminated persistent sandbox stays terminated
    assert object_id.startswith("sb-"), got


def test_local_files_ptys_and_the_seeds_sections(daemon, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("VALUE = 41\n")
    (tmp_path / "pkg" / "calc.py").write_text("import mod\nprint(mod.VALUE + 1)\n")
    (tmp_path / "pkg" / "run.sh").write_text("echo ran\n")
    (tmp_path / "pkg" / "run.sh").chmod(0o755)
    (tmp_path / "big.bin").write_bytes(os.urandom(5 << 20))  # over the client's 4 MiB: a blob upload
    got = run_client(
        f"""
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        image = (
            modal.Image.debian_slim()
            .add_local_dir({str(tmp_path / "pkg")!r}, "/app/pkg")
            .add_local_file({str(tmp_path / "big.bin")!r}, "/tmp/big.bin")
        )
        sb = modal.Sandbox.create(app=app, image=image)
        p = sb.exec("bash", "-c", "cat /app/pkg/mod.py; /app/pkg/run.sh; stat -c %a /tmp; sha256sum < /tmp/big.bin")
        mounted = p.stdout.read()
        t = sb.exec("bash", "-c", "tty; stty size", pty=True)
        tty = t.stdout.read()
        from modal_proto import api_pb2  # the deprecated pty_info= is how a client gives the terminal's size
        sized = api_pb2.PTYInfo(enabled=True, winsz_rows=33, winsz_cols=101, env_term="xterm")
        size = sb.exec("stty", "size", pty_info=sized).stdout.read()
        sb.terminate()
        baked = modal.Image.debian_slim().add_local_dir({str(tmp_path / "pkg")!r}, "/app/pkg", copy=True)
        baked = baked.run_commands("python3 /app/pkg/calc.py > /built")
        sb = modal.Sandbox.create(app=app, image=baked)
        built = sb.exec("cat", "/built").stdout.read()
        sb.terminate()
        print(json.dumps([mounted, tty, built, size]))
        """
    )
    mounted, tty, built, size = got
    assert size == "33 101\r\n"
    digest = hashlib.sha256((tmp_path / "big.bin").read_bytes()).hexdigest()
    assert mounted == f"VALUE = 41\nran\n1777\n{digest}  -\n"  # the image's /tmp kept its mode
    assert tty.startswith("/dev/pts/") and tty.endswith("\r\n")
    assert built == "42\n"


@pytest.mark.restart
def test_a_client_carries_on_across_a_daemon_restart(own_daemon):
    """A program keeps its sandbox and its handle while the daemon is stopped (even with -9) and started again:
    the gateway comes back on the port it was given, with the same credentials and signing key."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    own_daemon.restart_with("--gateway", f"127.0.0.1:{port}")
    mark = uuid.uuid4().hex
    program = textwrap.dedent(
        """
        import json, sys, modal
        app = modal.App.lookup("gateway-restart", create_if_missing=True)
        sb = modal.Sandbox.create("cat", app=app, timeout=120)
        image = modal.Image.debian_slim().run_commands("echo MARK > /built")  # built here: a handle to join
        modal.Sandbox.create(app=app, image=image).terminate()
        print(json.dumps("ready"), flush=True)
        sys.stdin.readline()  # the daemon is killed and started again meanwhile
        p = sb.exec("echo", "after the restart")
        sb.stdin.write(b"still the same entrypoint\\n")
        sb.stdin.write_eof()
        sb.stdin.drain()
        again = modal.Sandbox.create(app=app, image=image)  # the image's handle outlives the daemon that gave it
        built = again.exec("cat", "/built").stdout.read()
        again.terminate()
        print(json.dumps([p.stdout.read(), p.wait(), sb.stdout.read(), built]), flush=True)
        sb.wait(raise_on_termination=False)
        print(json.dumps(sb.returncode), flush=True)
        """
    ).replace("MARK", mark)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SHOAL_"))}
    environ.update(gateway_env(), MODAL_CONFIG_PATH="/nonexistent/.modal.toml")
    assert environ["MODAL_SERVER_URL"] == f"http://127.0.0.1:{port}"
    client = subprocess.Popen(
        [sys.executable, "-c", program], env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert json.loads(client.stdout.readline()) == "ready"
        own_daemon.stop(signal.SIGKILL)
        own_daemon.start("--gateway", f"127.0.0.1:{port}")
        client.stdin.write("go\n")
        client.stdin.flush()
        after = json.loads(client.stdout.readline())
        # (Once seen under the full suite's load: the exec ended 137 with no output.  The daemon's lines about its
        # agents say why, should it happen again.)
        agent_lines = [ln for ln in own_daemon.log.read_text().splitlines() if "agent" in ln or "process" in ln]
        assert after == ["after the restart\n", 0, "still the same entrypoint\n", f"{mark}\n"], agent_lines[-30:]
        assert json.loads(client.stdout.readline()) == 0
        assert client.wait(60) == 0
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=30)  # closes its pipes


@pytest.mark.restart
def test_uploads_keep_the_disk_reserve(own_daemon):
    """The block store refuses what would leave the data disk below ``--min-free-disk-mib``, as a create does."""
    own_daemon.restart_with("--min-free-disk-mib", str(1 << 30))  # a reserve of 1 PiB: larger than any disk
    got = run_client(
        """
        import io, json, modal
        vol = modal.Volume.from_name("gateway-full-disk", create_if_missing=True)
        try:
            with vol.batch_upload() as batch:
                batch.put_file(io.BytesIO(b"x" * 1000), "/a.bin")
            error = None
        except Exception as e:
            error = [type(e).__name__, str(e)]
        print(json.dumps(error))
        """,
        timeout=120,
    )
    assert got is not None and got[0] == "ResourceExhaustedError" and "--min-free-disk-mib" in got[1], got


def test_a_wrong_token_is_refused(daemon):
    env = {**gateway_env(), "MODAL_TOKEN_SECRET": "as-not-the-secret"}
    got = run_client(
        """
        import json, modal
        try:
            modal.App.lookup("gateway-tests", create_if_missing=True)
            print(json.dumps("accepted"))
        except modal.exception.AuthError as e:
            print(json.dumps(["AuthError", str(e)]))
        """,
        env=env,
    )
    assert got[0] == "AuthError" and "shoal gateway env" in got[1]


def test_a_sandbox_cannot_reach_the_gateway(daemon):
    port = int(gateway_env()["MODAL_SERVER_URL"].rsplit(":", 1)[1])
    app = shoal.App.lookup("gateway-tests", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=120)
    try:
        lines = host_port_reach(sb, port)
        assert len(lines) == 2, lines  # the sandbox's own loopback and its gateway (the host)
        assert all(line.startswith("refused") for line in lines), lines
    finally:
        sb.terminate()

"""Chaos: the daemon is killed with SIGKILL at random points, again and again, while the SDK is busy.

Meanwhile worker threads create, exec in and terminate sandboxes, write files into sandboxes, upload batches
of files to a volume, and read two output streams (an exec's and an entrypoint's) that print numbered lines.
Some kills land while a fresh daemon is still starting (recovering), the rest while it serves.  Afterwards:

* every sandbox a create returned is either still running and answers ``exec`` (re-adopted), or was terminated
  and reports its end; a sandbox whose create failed is absent, or running and answering, or reported ended;
  no sandbox turns up that nobody asked for;
* the numbered output arrived in full, with no gap and no duplicate, and a fresh reader sees the same bytes;
* each file written into a sandbox, and each batch uploaded to the volume, is absent (its call failed) or whole;
  nothing else (temporary or half-written files) is there;
* every SDK call completed or raised a ``shoal.exception.Error``: any other exception fails the test;
* nothing is left behind (the ``own_daemon`` fixture's leak check).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import signal
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import shoal
from shoal.exception import Error, SandboxFilesystemNotFoundError
from tests.conftest import Daemon

pytestmark = pytest.mark.restart

SEED = 20261204
KILLS = 14
STARTUP_KILLS = 0.25
"""The share of kills that land while the new daemon is still starting, before it says it is ready."""
LIVE = 3
"""Sandboxes the lifecycle worker keeps running at once (it terminates the oldest beyond that)."""

PRINTER = r"""
import os, time
i = 0
while not os.path.exists("/tmp/stop"):
    print(i, flush=True)
    i += 1
    time.sleep(0.02)
print("END", flush=True)
"""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Chaos:
    """What the workers did and saw."""

    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    done: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    foreign: list[str] = field(default_factory=list)
    """Exceptions from SDK calls that are not ``shoal.exception.Error``."""
    wrong: list[str] = field(default_factory=list)
    """Calls that completed with a wrong result."""

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, exception)`` for a shoal error; anything else is noted as foreign."""
        with self.lock:
            self.in_flight += 1
        try:
            result = fn(*args, **kwargs)
        except Error as e:
            with self.lock:
                self.failed[f"{what}: {type(e).__name__}"] += 1
            return False, e
        except Exception as e:
            with self.lock:
                self.foreign.append(
                    f"{what}: {type(e).__module__}.{type(e).__qualname__}: {e}\n{traceback.format_exc()}"
                )
            return False, e
        finally:
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            self.done[what] += 1
        return True, result


@dataclass
class Stream:
    """A reader of numbered lines that goes on after errors (the reader resumes at the offset it reached)."""

    name: str
    reader: Any
    lines: list[str] = field(default_factory=list)
    finished: bool = False
    errors: list[str] = field(default_factory=list)

    def run(self, chaos: Chaos, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                for line in self.reader:
                    self.lines.append(line)
                self.finished = True
                return
            except Error as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.2)
            except Exception as e:
                chaos.foreign.append(f"stream {self.name}: {type(e).__qualname__}: {e}\n{traceback.format_exc()}")
                return


def run_exec(sb: shoal.Sandbox, word: str) -> tuple[int, str]:
    p = sb.exec("echo", word, timeout=60)
    out = p.stdout.read()
    return p.wait(), out


def lifecycle_worker(chaos: Chaos, app: shoal.App, created: dict, failed_tokens: set, terminated: dict) -> None:
    """Create sandboxes (tagged with a token), exec in each, keep LIVE of them, terminate the oldest."""
    live: list[shoal.Sandbox] = []
    while not chaos.stop.is_set():
        token = uuid.uuid4().hex
        ok, sb = chaos.call("create", shoal.Sandbox.create, app=app, timeout=280, tags={"chaos": token})
        if not ok:
            failed_tokens.add(token)
            time.sleep(0.3)
            continue
        created[sb.object_id] = sb
        live.append(sb)
        ok, res = chaos.call("exec", run_exec, sb, token)
        if ok and res != (0, token + "\n"):
            chaos.wrong.append(f"exec in {sb.object_id} returned {res!r}")
        if len(live) > LIVE:
            victim = live.pop(0)
            ok, _ = chaos.call("terminate", victim.terminate)
            terminated[victim.object_id] = ok


def files_worker(chaos: Chaos, targets: list[shoal.Sandbox], writes: list, seed: int) -> None:
    """Write files of random sizes into sandboxes and read them back."""
    rng = random.Random(seed)
    k = 0
    while not chaos.stop.is_set():
        k += 1
        sb = rng.choice(targets)
        data = rng.randbytes(rng.randint(1, 1 << 20))
        path = f"/tmp/chaos/f{k}.bin"
        ok, _ = chaos.call("write_bytes", sb.filesystem.write_bytes, data, path)
        writes.append((sb, path, digest(data), len(data), ok))
        if ok:
            ok, back = chaos.call("read_bytes", sb.filesystem.read_bytes, path)
            if ok and back != data:
                chaos.wrong.append(f"{sb.object_id}:{path} read back {len(back)} bytes, not the {len(data)} written")
        time.sleep(rng.uniform(0.02, 0.2))


def volume_worker(chaos: Chaos, vol: shoal.Volume, uploads: list, seed: int) -> None:
    """Upload batches of two files (a big one first, then a small one) to the volume."""
    rng = random.Random(seed)
    k = 0
    while not chaos.stop.is_set():
        k += 1
        big = rng.randbytes(rng.randint(256 << 10, 2 << 20))
        small = rng.randbytes(rng.randint(1, 16 << 10))

        def upload(k: int = k, big: bytes = big, small: bytes = small) -> None:
            with vol.batch_upload() as batch:
                batch.put_file(io.BytesIO(big), f"b{k}/big.bin")
                batch.put_file(io.BytesIO(small), f"b{k}/small.bin")

        ok, _ = chaos.call("volume upload", upload)
        uploads.append((k, {"big.bin": (digest(big), len(big)), "small.bin": (digest(small), len(small))}, ok))
        time.sleep(rng.uniform(0.1, 0.5))


def readies(d: Daemon) -> int:
    return d.log.read_text(errors="replace").count("daemon ready")


def wait_ready(d: Daemon, before: int, timeout: float = 60) -> None:
    """Until the daemon started last says it is ready (its log has more "daemon ready" lines than ``before``)."""
    deadline = time.monotonic() + timeout
    while readies(d) <= before:
        assert d.proc is not None
        if d.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the restarted daemon did not become ready:\n{d.log.read_text()[-4000:]}")
        time.sleep(0.02)


def echo_works(sb: shoal.Sandbox) -> bool:
    p = sb.exec("echo", "alive", timeout=60)
    return p.stdout.read() == "alive\n" and p.wait() == 0


@pytest.mark.timeout(300)
def test_sigkill_storm_loses_nothing_acknowledged(own_daemon):
    d = own_daemon
    rng = random.Random(SEED)
    app = shoal.App.lookup("chaos-tests", create_if_missing=True)
    vol_name = f"chaos-{uuid.uuid4().hex[:10]}"
    vol = shoal.Volume.from_name(vol_name, create_if_missing=True)
    vol.hydrate()

    # Sandboxes that live through the storm: one whose exec prints numbered lines, one whose entrypoint does, and
    # a plain one; files are written into the first and the last.
    s_exec = shoal.Sandbox.create(app=app, timeout=280, tags={"chaos": "stable"})
    s_entry = shoal.Sandbox.create("python3", "-c", PRINTER, app=app, timeout=280, tags={"chaos": "stable"})
    s_plain = shoal.Sandbox.create(app=app, timeout=280, tags={"chaos": "stable"})
    printer = s_exec.exec("python3", "-c", PRINTER, bufsize=1)
    streams = [Stream("exec", printer.stdout), Stream("entrypoint", s_entry.stdout)]

    chaos = Chaos()
    created: dict[str, shoal.Sandbox] = {}
    failed_tokens: set[str] = set()
    terminated: dict[str, bool] = {}
    writes: list = []
    uploads: list = []
    deadline = time.monotonic() + 200
    readers = [
        threading.Thread(target=s.run, args=(chaos, deadline), name=f"read-{s.name}", daemon=True) for s in streams
    ]
    workers = [
        threading.Thread(target=lifecycle_worker, args=(chaos, app, created, failed_tokens, terminated), daemon=True),
        threading.Thread(target=files_worker, args=(chaos, [s_exec, s_plain], writes, SEED + 1), daemon=True),
        threading.Thread(target=volume_worker, args=(chaos, vol, uploads, SEED + 2), daemon=True),
    ]
    for t in readers + workers:
        t.start()
    t0 = time.monotonic()
    while not all(s.lines for s in streams):
        assert time.monotonic() - t0 < 30, "the printers printed nothing"
        time.sleep(0.05)

    # The storm.
    kills: list[tuple[int, int, int]] = []  # (exec lines, entrypoint lines, worker calls in flight) at each kill
    during_startup = 0
    before = readies(d) - 1
    try:
        for _ in range(KILLS):
            if rng.random() < STARTUP_KILLS:
                during_startup += 1
                time.sleep(rng.uniform(0.0, 0.4))
            else:
                wait_ready(d, before)
                time.sleep(rng.uniform(0.2, 1.5))
            kills.append((len(streams[0].lines), len(streams[1].lines), chaos.in_flight))
            assert d.proc is not None
            d.stop(signal.SIGKILL)
            assert d.proc.returncode == -signal.SIGKILL, d.proc.returncode
            before = readies(d)
            d.start()
        wait_ready(d, before)
        time.sleep(1.0)  # a little work against a daemon that stays up
    finally:
        chaos.stop.set()
        for t in workers:
            t.join(120)
    storm = time.monotonic() - t0
    assert not any(t.is_alive() for t in workers), "a worker hangs"

    # Let the printers finish, and read their streams to the end.
    for sb in (s_exec, s_entry):
        ok, e = chaos.call("write stop", sb.filesystem.write_bytes, b"", "/tmp/stop")
        assert ok, e
    for t in readers:
        t.join(max(1.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in readers), "a stream reader hangs"

    summary = (
        f"storm {storm:.0f}s, {len(kills)} kills ({during_startup} during start-up); done {dict(chaos.done)};"
        f" failed {dict(chaos.failed)}; stream errors {[s.errors for s in streams]};"
        f" {len(chaos.foreign)} foreign exceptions: {[f.split(chr(10))[0] for f in chaos.foreign]}"
    )
    print(summary)
    log_tail = d.log.read_text(errors="replace")[-6000:]
    assert not chaos.wrong, (chaos.wrong, summary)
    assert len(kills) == KILLS

    # The storm hit work in flight, and every kind of work got done during it.
    assert sum(1 for k in kills if k[2] > 0) >= KILLS // 2, (kills, summary)
    for what in ("create", "exec", "write_bytes", "read_bytes", "volume upload"):
        assert chaos.done[what] >= 3, (what, summary)

    # Output: all lines, in order, each once; the readers moved on between kills (they resumed after restarts).
    assert printer.wait() == 0
    s_entry.wait()
    assert s_entry.returncode == 0
    for s in streams:
        assert s.finished, (s.name, summary)
        n = len(s.lines) - 1
        assert s.lines == [f"{i}\n" for i in range(n)] + ["END\n"], (s.name, s.lines[:5], s.lines[-5:])
    for col in (0, 1):
        progressed = sum(1 for a, b in itertools.pairwise(kills) if b[col] > a[col])
        assert progressed >= KILLS // 4, (col, kills, summary)
    assert shoal.Sandbox.from_id(s_entry.object_id).stdout.read() == "".join(streams[1].lines)

    # Sandboxes: re-adopted and answering, or reported ended; none that nobody asked for.
    for sb in (s_exec, s_plain):
        assert shoal.Sandbox.from_id(sb.object_id).poll() is None
        assert echo_works(sb)
    for sid in created:
        fresh = shoal.Sandbox.from_id(sid)
        rc = fresh.poll()
        if terminated.get(sid):
            assert rc == 137, (sid, rc)
        elif sid not in terminated:
            assert rc is None, f"{sid} ended ({rc}) though nobody stopped it\n{log_tail}"
        if rc is None:
            assert echo_works(fresh), sid
    stable = {s_exec.object_id, s_plain.object_id}
    for sb in shoal.Sandbox.list(app_id=app.app_id):
        if sb.object_id in created or sb.object_id in stable:
            continue
        token = sb.get_tags().get("chaos")
        assert token in failed_tokens, f"{sb.object_id} (tags {sb.get_tags()}) was never asked for"
        assert echo_works(sb), sb.object_id

    # Files in sandboxes: each absent (its write failed) or whole; nothing else in the directory.
    for sb in (s_exec, s_plain):
        ours = [w for w in writes if w[0] is sb]
        names = {f.name for f in sb.filesystem.list_files("/tmp/chaos")}
        assert names <= {w[1].rsplit("/", 1)[-1] for w in ours}, sorted(names)
        for _, path, want, size, ok in ours:
            try:
                data = sb.filesystem.read_bytes(path)
            except SandboxFilesystemNotFoundError:
                assert not ok, f"{path} was written but is gone"
                continue
            assert (digest(data), len(data)) == (want, size), f"{path} is half-written: {len(data)} of {size} bytes"

    # The volume: each batch wholly there or wholly absent (and there if its upload returned); nothing else.
    top = {e.path.strip("/") for e in vol.listdir("/")}
    assert top <= {f"b{k}" for k, _, _ in uploads}, sorted(top)
    present = 0
    for k, files, ok in uploads:
        got = {}
        for name in files:
            try:
                data = b"".join(vol.read_file(f"b{k}/{name}"))
            except FileNotFoundError:
                continue
            got[name] = (digest(data), len(data))
        if got:
            present += 1
            assert got == files, f"batch b{k} is partial or half-written: {got} != {files}"
            assert {e.path.rsplit("/", 1)[-1] for e in vol.listdir(f"b{k}")} == set(files)
        else:
            assert not ok, f"batch b{k} was uploaded but is gone"
    assert present >= 3, summary

    shoal.Volume.objects.delete(vol_name)
    # Last, so that the checks above report too: every SDK call completed or raised a shoal error.
    assert not chaos.foreign, "SDK calls raised exceptions that are not shoal errors:\n" + "\n".join(chaos.foreign)

"""The hostile-link battery: a sandbox that plants links in a volume, or races renames, cannot make the
daemon's volume API read, list, copy, remove or write anything outside that volume.

The daemon runs as root, so each of these would otherwise be a host escape.  Every operation must either
act inside the volume or fail; none may return host content, hang on a FIFO, or touch the host files
(canaries) the links point at.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal
from shoal.exception import Error, InvalidError
from shoal.volume import FileEntryType


def _name() -> str:
    return f"hostile-{uuid.uuid4().hex[:10]}"


def _read(v: shoal.Volume, path: str) -> bytes:
    return b"".join(v.read_file(path))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fails(fn, *args, **kwargs) -> BaseException:  # type: ignore[no-untyped-def]
    """Run ``fn``; it must raise a shoal error or a builtin file error, and quickly."""
    start = time.monotonic()
    with pytest.raises((Error, OSError)) as err:
        fn(*args, **kwargs)
    assert time.monotonic() - start < 10, f"{fn} took too long (blocked on something?)"
    return err.value


@pytest.fixture
def canary() -> Iterator[Path]:
    """A host directory the sandbox points links at; nothing may read, change or add to it."""
    d = Path(tempfile.mkdtemp(prefix="shoal-canary-"))
    (d / "canary.txt").write_text("host canary: never readable through a volume\n")
    (d / "canary.txt").chmod(0o600)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.fixture
def volumes(daemon) -> Iterator[tuple[shoal.Volume, shoal.Volume]]:
    a, b = _name(), _name()
    va = shoal.Volume.from_name(a, create_if_missing=True).hydrate()
    vb = shoal.Volume.from_name(b, create_if_missing=True).hydrate()
    with vb.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"other volume's secret\n"), "secret.txt")
    yield va, vb
    shoal.Volume.objects.delete(a, allow_missing=True)
    shoal.Volume.objects.delete(b, allow_missing=True)


def _host_root(daemon, v: shoal.Volume) -> Path:
    return daemon.data_dir / "volumes" / v.object_id / "root"


def _plant(daemon, app, victim: shoal.Volume, other: shoal.Volume, canary: Path) -> shoal.Sandbox:
    # runc plants: a FIFO made under gVisor lives in its kernel's memory only and never reaches the volume
    # (decision 0069); what is tested here is the daemon's volume API over hostile contents.
    sb = shoal.Sandbox.create(app=app, volumes={"/data": victim, "/other": other}, timeout=180, runtime="runc")
    script = f"""
set -e
cd /data
echo inside > real.txt
mkdir -p dir && echo d > dir/f.txt
ln -s /etc/shadow shadow
ln -s / root
ln -s ../../../../../../../../../../etc up
ln -s {_host_root(daemon, other)} other
ln -s {daemon.data_dir} datadir
ln -s {canary} canary
ln -s /etc dir/escape
ln real.txt hard
mkfifo fifo
ln -s fifo fifolink
if ln /etc/passwd /data/pw 2>/dev/null; then echo "hard link across mounts worked"; exit 1; fi
if ln /other/secret.txt /data/stolen 2>/dev/null; then echo "hard link across volumes worked"; exit 1; fi
"""
    p = sb.exec("bash", "-c", script)
    assert p.wait() == 0, p.stdout.read() + p.stderr.read()
    return sb


def test_planted_links_never_lead_out_of_the_volume(daemon, app, volumes, canary):
    victim, other = volumes
    shadow_before = _sha(Path("/etc/shadow"))
    sb = _plant(daemon, app, victim, other, canary)
    try:
        # read_file: links are never followed, FIFOs never opened.
        for path in (
            "shadow",
            "root/etc/shadow",
            "root/etc/passwd",
            "up/shadow",
            "up/passwd",
            "other/secret.txt",
            "datadir/state.db",
            "datadir/secrets.key",
            "canary/canary.txt",
            "dir/escape/passwd",
            "fifo",
            "fifolink",
            "root",
        ):
            _fails(_read, victim, path)
            _fails(victim.read_file_into_fileobj, path, io.BytesIO())
        assert _read(victim, "hard") == b"inside\n"  # a hard link inside the volume is just a file

        # listdir / iterdir: links are listed as links and never descended into.
        entries = {e.path: e.type for e in victim.listdir("/", recursive=True)}
        for link in ("shadow", "root", "up", "other", "datadir", "canary", "dir/escape", "fifolink"):
            assert entries[link] == FileEntryType.SYMLINK, link
        assert entries["fifo"] == FileEntryType.FIFO
        assert entries["hard"] == FileEntryType.FILE
        assert not any(p.startswith(("root/", "up/", "other/", "datadir/", "canary/", "dir/escape/")) for p in entries)
        for link in ("root", "up", "other", "datadir", "canary", "dir/escape", "shadow"):
            # A link lists as itself (like a file), never as what it points at.
            assert [(e.path, e.type) for e in victim.listdir(link)] == [(link, FileEntryType.SYMLINK)]
            assert [e.path for e in victim.iterdir(link)] == [link]
        for path in ("root/etc", "up/passwd", "other/secret.txt", "datadir/volumes", "canary/canary.txt"):
            _fails(victim.listdir, path)

        # copy_files: links are copied as links; nothing is read through them.
        victim.copy_files(["shadow"], "shadow-copy")
        victim.copy_files(["dir"], "dir-copy", recursive=True)
        copied = {e.path: e.type for e in victim.listdir("dir-copy", recursive=True)}
        assert copied == {"dir-copy/f.txt": FileEntryType.FILE, "dir-copy/escape": FileEntryType.SYMLINK}
        assert os.readlink(_host_root(daemon, victim) / "shadow-copy") == "/etc/shadow"
        _fails(_read, victim, "shadow-copy")
        for src in ("root/etc/passwd", "other/secret.txt", "canary/canary.txt", "datadir/state.db", "fifo"):
            _fails(victim.copy_files, [src], "stolen")
        _fails(victim.copy_files, ["root/etc"], "stolen", recursive=True)
        assert "stolen" not in {e.path for e in victim.listdir("/")}

        # Uploads through a link fail and create nothing on the host.
        marker = f"pwned-{uuid.uuid4().hex[:8]}"
        for target in (f"root/tmp/{marker}", f"canary/{marker}", f"other/{marker}", f"datadir/{marker}"):
            err = _fails(_upload, victim, target, b"x")
            assert isinstance(err, InvalidError), err
        assert not Path(f"/tmp/{marker}").exists()
        assert sorted(p.name for p in canary.iterdir()) == ["canary.txt"]
        assert not (_host_root(daemon, other) / marker).exists()
        assert not (daemon.data_dir / marker).exists()
        # Overwriting a link replaces the link itself, never its target.
        _upload(victim, "shadow", b"replaced in the volume", force=True)
        assert _read(victim, "shadow") == b"replaced in the volume"
        assert _sha(Path("/etc/shadow")) == shadow_before
        # An absolute upload path means the volume's root, not the host's.
        _upload(victim, f"/etc/{marker}", b"in the volume")
        assert not Path(f"/etc/{marker}").exists()
        assert (_host_root(daemon, victim) / "etc" / marker).read_bytes() == b"in the volume"

        # A sub_path through a link is refused (it would mount the host's root).
        for sub in ("root", "canary", "shadow", "dir/escape"):
            _fails(shoal.Sandbox.create, app=app, volumes={"/mnt": victim.with_mount_options(sub_path=sub)})

        # remove_file: removes links themselves, never what they point at.
        for path in ("canary/canary.txt", "other/secret.txt", "datadir/state.db", "root/etc/hostname"):
            _fails(victim.remove_file, path)
        for link in ("root", "canary", "other", "datadir", "up"):
            victim.remove_file(link, recursive=True)
        victim.remove_file("dir-copy", recursive=True)
        assert (canary / "canary.txt").read_text().startswith("host canary")
        assert _read(other, "secret.txt") == b"other volume's secret\n"
        assert (daemon.data_dir / "state.db").exists() and Path("/etc/hostname").exists()

    finally:
        sb.terminate()
    assert _sha(Path("/etc/shadow")) == shadow_before


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self._path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self._path)
        self.sock = s


def _raw_upload(daemon, v: shoal.Volume, path: str, data: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    header = json.dumps({"path": path, "mode": 0o644, "size": len(data)}).encode()
    body = len(header).to_bytes(4, "big") + header + data + (0).to_bytes(4, "big")
    conn = _UnixHTTP(daemon.socket)
    try:
        conn.request("PUT", f"/v1/volumes/{v.object_id}/files", body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_daemon_refuses_escaping_upload_paths_even_without_the_sdk(daemon, volumes):
    victim, _ = volumes
    for bad in ("../escape", "a/../../escape", "a/..", "nul\x00byte", "x" * 300):
        status, body = _raw_upload(daemon, victim, bad, b"data")
        assert status == 400 and body["error"]["type"] == "InvalidError", (bad, body)
    status, body = _raw_upload(daemon, victim, "/", b"data")
    assert status == 400
    assert not (daemon.data_dir / "volumes" / victim.object_id / "escape").exists()
    assert not (daemon.data_dir / "volumes" / "escape").exists()
    assert victim.listdir("/") == []
    # A truncated body commits nothing.
    header = json.dumps({"path": "partial.txt", "mode": 0o644, "size": 100}).encode()
    conn = _UnixHTTP(daemon.socket)
    try:
        truncated = len(header).to_bytes(4, "big") + header + b"x"
        conn.request("PUT", f"/v1/volumes/{victim.object_id}/files", body=truncated)
        assert conn.getresponse().status == 400
    finally:
        conn.close()
    assert victim.listdir("/") == []
    assert list((daemon.data_dir / "volumes" / victim.object_id / "staging").iterdir()) == []


def _upload(v: shoal.Volume, path: str, data: bytes, force: bool = False) -> None:
    with v.batch_upload(force=force) as batch:
        batch.put_file(io.BytesIO(data), path)


HOST_NAMES = {"etc", "bin", "usr", "boot", "proc", "sys", "var", "canary.txt", "shadow", "passwd"}
"""Names that only the host's root, /etc or the canary dir hold: seeing one means a link was followed."""


def _host_like(paths: set[str]) -> bool:
    return any(p.rstrip("/").split("/")[-1] in HOST_NAMES for p in paths)


def test_racing_renames_never_redirect_the_daemon(daemon, app, volumes, canary):
    """A sandbox swaps a directory for a link to ``/`` (or to a host canary) in a tight loop while the
    daemon reads, lists, uploads into, copies, removes below, and mounts that path."""
    victim, _ = volumes
    root = _host_root(daemon, victim)
    sb = shoal.Sandbox.create(app=app, volumes={"/data": victim}, timeout=180)
    racer = f"""
mkdir -p /data/race/real && echo in > /data/race/real/f
cd /data/race
end=$((SECONDS + 30))
while [ $SECONDS -lt $end ]; do
  mv real tmp; ln -s / real; rm real
  ln -s {canary} real; rm real
  mv tmp real
done
"""
    sb.exec("bash", "-c", racer)
    try:
        deadline = time.monotonic() + 10
        while not (root / "race" / "real" / "f").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen: dict[str, int] = {"ok": 0, "refused": 0}
        stop = threading.Event()
        problems: list[str] = []

        def note(ok: bool) -> None:
            seen["ok" if ok else "refused"] += 1

        def hammer() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    data = _read(victim, "race/real/f")
                    if data != b"in\n":
                        problems.append(f"read returned {data[:60]!r}")
                    note(True)
                except (Error, OSError):
                    note(False)
                for path in ("race/real/etc/passwd", "race/real/canary.txt"):
                    with contextlib.suppress(Error, OSError):
                        problems.append(f"read {path}: {_read(victim, path)[:60]!r}")
                try:
                    names = {e.path for e in victim.listdir("race/real")}
                    if _host_like(names):
                        problems.append(f"listdir saw {sorted(names)[:5]}")
                    note(True)
                except (Error, OSError):
                    note(False)
                try:
                    _upload(victim, f"race/real/up-{i}", b"u")
                    note(True)
                except (Error, OSError):
                    note(False)
                try:
                    victim.copy_files(["race/real"], f"copy-{i}", recursive=True)
                    copied = {e.path for e in victim.listdir(f"copy-{i}", recursive=True)}
                    copy_dir = root / f"copy-{i}"
                    if _host_like(copied) or (not copy_dir.is_symlink() and (copy_dir / "canary.txt").exists()):
                        problems.append(f"copy saw {sorted(copied)[:5]}")
                    victim.remove_file(f"copy-{i}", recursive=True)
                except (Error, OSError):
                    pass
                with contextlib.suppress(Error, OSError):
                    victim.remove_file(f"race/real/up-{i}")

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for _ in range(6):  # sandboxes mounting the racing path as sub_path
                try:
                    other = shoal.Sandbox.create(
                        app=app, volumes={"/mnt": victim.with_mount_options(sub_path="race/real")}, timeout=60
                    )
                except (Error, OSError):
                    continue
                try:
                    listing = other.exec("ls", "/mnt").stdout.read().split()
                    if _host_like(set(listing)):
                        problems.append(f"a sub_path mount showed {listing[:8]}")
                finally:
                    other.terminate()
            time.sleep(3)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not problems, problems[:5]
        assert seen["ok"] > 0, seen  # the race did not just make everything fail
        # Nothing landed outside the volume.
        assert not any(Path("/").glob("up-*"))
        assert sorted(x.name for x in canary.iterdir()) == ["canary.txt"]
    finally:
        sb.terminate()

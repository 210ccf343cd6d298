"""``Image.from_registry``: pulls from a registry on loopback that the tests start and fill themselves.

The registry is Debian's ``docker-registry`` (distribution) on 127.0.0.1 with
a temporary config and storage; images are OCI layouts built here from tar
archives (busybox-static for a runnable root) and pushed with ``skopeo``.
No outside network is needed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import shoal
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.conftest import REGISTRY_TMP_PREFIX

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "ls", "stat", "test", "pwd", "env", "sleep", "id", "readlink", "wc")

pytestmark = pytest.mark.skipif(
    not (shutil.which("docker-registry") and shutil.which("skopeo") and BUSYBOX.exists()),
    reason="needs docker-registry, skopeo and busybox-static (make setup installs them)",
)


# ---------------------------------------------------------------------------------------------- building images


def tar_of(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info, data = (e, None) if isinstance(e, tarfile.TarInfo) else e
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def file(name: str, data: bytes, mode: int = 0o644, **kw) -> tuple[tarfile.TarInfo, bytes]:
    return entry(name, tarfile.REGTYPE, data, mode, **kw), data


def directory(name: str, mode: int = 0o755) -> tarfile.TarInfo:
    return entry(name, tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> tarfile.TarInfo:
    return entry(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def busybox_layer() -> bytes:
    entries: list = [directory("bin"), file("bin/busybox", BUSYBOX.read_bytes(), 0o755)]
    entries += [symlink(f"bin/{a}", "busybox") for a in APPLETS]
    entries += [directory(d) for d in ("tmp", "proc", "sys", "dev", "etc", "work")]
    return tar_of(entries)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(layout: Path, data: bytes) -> dict:
    digest = sha(data)
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def oci_manifest(
    layout: Path, layers: list[bytes], config: dict, arch: str = "amd64", compression: str = "gzip"
) -> dict:
    """Write a manifest's blobs into ``layout``; returns its descriptor."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    layer_descs, diff_ids = [], []
    for raw in layers:
        if compression == "zstd":
            blob = subprocess.run(["zstd", "-q", "-c"], input=raw, check=True, capture_output=True).stdout
        else:
            blob = gzip.compress(raw, mtime=0)
        media = f"application/vnd.oci.image.layer.v1.tar+{compression}"
        layer_descs.append({"mediaType": media, **write_blob(layout, blob)})
        diff_ids.append(sha(raw))
    cfg = {
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cfg_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", **write_blob(layout, json.dumps(cfg).encode())}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg_desc,
        "layers": layer_descs,
    }
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **write_blob(layout, json.dumps(manifest).encode()),
        "platform": {"os": "linux", "architecture": arch},
    }


def oci_layout(root: Path, top: dict) -> Path:
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    top = {**top, "annotations": {"org.opencontainers.image.ref.name": "latest"}}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return root


# ---------------------------------------------------------------------------------------------- the registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRegistry:
    """A docker-registry process on loopback."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    auth: tuple[str, str] | None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def push(
        self,
        layers: list[bytes],
        name: str,
        config: dict | None = None,
        *,
        index: bool = False,
        compression: str = "gzip",
    ) -> str:
        """Push an image of ``layers``; returns its reference.  ``index``: as a two-platform index."""
        layout = Path(tempfile.mkdtemp(dir=self.root, prefix="layout-"))
        config = {"Env": ["PATH=/bin"], **(config or {})}
        top = oci_manifest(layout, layers, config, compression=compression)
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
        if index:
            arm = oci_manifest(layout, [tar_of([file("arch", b"arm64\n")])], config, arch="arm64")
            index_type = "application/vnd.oci.image.index.v1+json"
            idx = {"schemaVersion": 2, "mediaType": index_type, "manifests": [arm, top]}
            top = {"mediaType": index_type, **write_blob(layout, json.dumps(idx).encode())}
            argv.append("--all")
        oci_layout(layout, top)
        if self.auth:
            argv += ["--dest-creds", f"{self.auth[0]}:{self.auth[1]}"]
        ref = f"{self.host}/{name}"
        subprocess.run([*argv, f"oci:{layout}:latest", f"docker://{ref}"], check=True, capture_output=True)
        shutil.rmtree(layout)
        return ref

    def blob_paths(self) -> list[Path]:
        return list((self.root / "storage").rglob("blobs/sha256/*/*/data"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def make_registry() -> Iterator:
    started: list[LocalRegistry] = []

    def start(auth: tuple[str, str] | None = None) -> LocalRegistry:
        root = Path(tempfile.mkdtemp(prefix=REGISTRY_TMP_PREFIX))
        port = free_port()
        lines = [
            "version: 0.1",
            "log: {level: error, accesslog: {disabled: true}}",
            f"storage: {{filesystem: {{rootdirectory: {root / 'storage'}}}, delete: {{enabled: true}}}}",
            f"http: {{addr: '127.0.0.1:{port}', secret: {os.urandom(8).hex()}}}",
        ]
        if auth:
            hashed = subprocess.run(["htpasswd", "-Bbn", *auth], check=True, capture_output=True, text=True).stdout
            (root / "htpasswd").write_text(hashed)
            lines.append(f"auth: {{htpasswd: {{realm: shoal-test, path: {root / 'htpasswd'}}}}}")
        (root / "config.yml").write_text("\n".join(lines) + "\n")
        log = open(root / "registry.log", "wb")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=log, stderr=log)
        log.close()
        reg = LocalRegistry(root, port, proc, auth)
        started.append(reg)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (root / "registry.log").read_text()
                    raise RuntimeError(f"docker-registry did not start: {log_text}") from None
                time.sleep(0.05)
        return reg

    yield start
    for reg in started:
        reg.stop()
        shutil.rmtree(reg.root, ignore_errors=True)


@pytest.fixture(scope="module")
def registry(make_registry) -> LocalRegistry:
    return make_registry()


def resolve_logs(ref: dict) -> tuple[list[str], dict]:
    """Resolve a wire image ref directly (no SDK cache): its log lines and final answer."""

    async def go() -> tuple[list[str], dict]:
        lines: list[str] = []
        final: dict = {}
        buf = b""
        async for chunk in default_client().stream("POST", "/v1/images/resolve", json_body=ref):
            buf += chunk
            *done, buf = buf.split(b"\n")
            for raw in done:
                if raw.strip():
                    item = json.loads(raw)
                    if "log" in item or "event" in item or "message" in item:
                        lines.append(json.dumps(item))
                    else:
                        final = item
        return lines, final

    return run_blocking(go())


def sh(sb: shoal.Sandbox, script: str) -> str:
    p = sb.exec("sh", "-c", script)
    p.wait()
    return p.stdout.read()


def store_layers(daemon) -> set[str]:
    return {p.name for p in (daemon.data_dir / "images" / "layers").iterdir() if p.is_dir()}


# ---------------------------------------------------------------------------------------------- pulls


def test_a_pulled_image_without_python_runs_with_its_config(app, registry):
    ref = registry.push(
        [busybox_layer()],
        "test/busybox:v1",
        {"Env": ["PATH=/bin", "GREETING=hello from the image"], "WorkingDir": "/work", "User": "0"},
    )
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.from_registry(ref), timeout=60)
    try:
        assert sh(sb, "test -e /usr/bin/python3 || echo no-python") == "no-python\n"
        assert sh(sb, "echo $GREETING; pwd; id -u") == "hello from the image\n/work\n0\n"
        assert sh(sb, "stat -c '%u %a' /bin/busybox") == "0 755\n"
    finally:
        sb.terminate()


PY_CHECK = (
    "import sys, ssl, sqlite3, ctypes, lzma, bz2, zlib, hashlib, decimal, uuid, readline, json;"
    " sqlite3.connect(':memory:').execute('select 1');"
    " print('.'.join(map(str, sys.version_info[:2])), sys.executable, ssl.OPENSSL_VERSION.split()[0])"
)


def wheel(name: str) -> bytes:
    """A pure-Python wheel holding one module ``name`` (built here: the sandbox has no network)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}.py", "VALUE = 42\n")
        info = f"{name}-1.0.dist-info"
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return buf.getvalue()


@pytest.mark.parametrize("version", ["3.11", "3.14"])
def test_add_python_lays_a_python_over_an_image_without_one(app, registry, version):
    ref = registry.push([busybox_layer()], "test/busybox:add-python")
    image = shoal.Image.from_registry(ref, add_python=version).run_commands(
        "python -c \"open('/built', 'w').write('ok')\""
    )
    sb = shoal.Sandbox.create(app=app, image=image, timeout=120)
    try:
        # A whole interpreter on an image with no C library of its own: its extension modules load.
        assert sh(sb, f'python3 -c "{PY_CHECK}"') == f"{version} /usr/local/bin/python3 OpenSSL\n"
        assert (
            sh(sb, "cat /built; command -v python; command -v pip")
            == "ok/usr/local/bin/python\n" + "/usr/local/bin/pip\n"
        )
        # pip installs beside itself, on sys.path.
        with sb.open("/tmp/shoal_probe-1.0-py3-none-any.whl", "wb") as f:
            f.write(wheel("shoal_probe"))
        out = sh(
            sb,
            "pip install -q --no-index /tmp/shoal_probe-1.0-py3-none-any.whl 2>&1; python -c "
            "'import shoal_probe; print(shoal_probe.VALUE, shoal_probe.__file__)'",
        )
        assert out.endswith("42 /usr/local/lib/python3/dist-packages/shoal_probe.py\n"), out
        # The image's own files and tools are as they were.
        assert sh(sb, "test -e /usr/bin/python3 || echo none; ls /bin/busybox") == "none\n/bin/busybox\n"
    finally:
        sb.terminate()


def test_the_image_command_and_entrypoint_run_as_the_sandbox_entrypoint(app, registry):
    ref = registry.push(
        [busybox_layer()],
        "test/cmd:v1",
        {"Entrypoint": ["sh", "-c"], "Cmd": ["echo from-the-image-cmd; exit 3"]},
    )
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.from_registry(ref), timeout=60)
    sb.wait(raise_on_termination=False)
    assert sb.stdout.read() == "from-the-image-cmd\n"
    assert sb.returncode == 3


def test_a_second_pull_of_the_same_digest_downloads_nothing(daemon, registry):
    ref = registry.push([busybox_layer(), tar_of([file("marker", b"one\n")])], "test/cache:v1")
    wire = {"kind": "registry", "registry": {"tag": ref}}
    first_logs, first = resolve_logs(wire)
    assert first.get("image_id"), first
    assert any("pulling" in line for line in first_logs)
    # Take the layer blobs away from the registry: only the manifest can be fetched now.
    removed = 0
    for blob in registry.blob_paths():
        try:
            json.loads(blob.read_bytes())  # manifests and configs are JSON; layers are gzip
        except ValueError:
            blob.unlink()
            removed += 1
    assert removed >= 2
    second_logs, second = resolve_logs(wire)
    assert second.get("image_id") == first["image_id"], (second, second_logs)
    assert not any("pulling" in line for line in second_logs)
    assert any("up to date" in line for line in second_logs)

    # A new digest behind the same tag is pulled; the layer both share is not converted again.
    before = store_layers(daemon)
    registry.push([busybox_layer(), tar_of([file("marker", b"two\n")])], "test/cache:v1")
    third_logs, third = resolve_logs(wire)
    assert third.get("image_id") and third["image_id"] != first["image_id"]
    assert any("already in the store" in line for line in third_logs)
    converted = [x for x in store_layers(daemon) - before if "registry_blob" in layer_meta(daemon, x)]
    assert len(converted) == 1  # (the image builder may add its own layer on top: the host's CA certificates)


def test_a_multi_platform_index_gives_the_amd64_image(app, registry):
    ref = registry.push([busybox_layer(), tar_of([file("arch", b"amd64\n")])], "test/multi:v1", index=True)
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.from_registry(ref), timeout=60)
    try:
        assert sh(sb, "cat /arch") == "amd64\n"
    finally:
        sb.terminate()


@pytest.mark.skipif(not shutil.which("zstd"), reason="zstd is not installed (make setup installs it)")
def test_zstd_compressed_layers(app, registry):
    ref = registry.push([busybox_layer(), tar_of([file("z", b"zstd\n")])], "test/zstd:v1", compression="zstd")
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.from_registry(ref), timeout=60)
    try:
        assert sh(sb, "cat /z") == "zstd\n"
    finally:
        sb.terminate()


def test_whiteouts_and_opaque_directories_of_later_layers(app, registry):
    lower = tar_of(
        [
            directory("a"),
            file("a/keep", b"keep\n"),
            file("a/gone", b"gone\n"),
            directory("d"),
            directory("d/old"),
            file("d/old/x", b"x\n"),
            file("d/y", b"y\n"),
            directory("tree"),
            file("tree/deep", b"deep\n"),
        ]
    )
    upper = tar_of(
        [
            file("a/.wh.gone", b""),
            file("d/.wh..wh..opq", b""),
            file("d/new", b"new\n"),
            file(".wh.tree", b""),
            file(".wh..wh.plnk", b""),  # AUFS bookkeeping: ignored
        ]
    )
    ref = registry.push([busybox_layer(), lower, upper], "test/whiteouts:v1")
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.from_registry(ref), timeout=60)
    try:
        assert sh(sb, "ls /a") == "keep\n"
        assert sh(sb, "ls /d") == "new\n"
        assert sh(sb, "test -e /tree || echo no-tree") == "no-tree\n"
        assert sh(sb, "ls -a / | grep -c wh") == "0\n"
        # The sandbox writes over it as usual; a snapshot of it keeps the image's deletions.
        sh(sb, "echo more > /a/more")
        snap = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    sb2 = shoal.Sandbox.create(app=app, image=snap, timeout=60)
    try:
        assert sh(sb2, "ls /a; ls /d") == "keep\nmore\nnew\n"
    finally:
        sb2.terminate()


# ---------------------------------------------------------------------------------------------- hostile images


HOSTILE_REFUSED = {
    "dotdot": ([file("../../../../../../../tmp/{sentinel}", b"escaped")], "climbs out"),
    "dotdot-inside": ([directory("a"), file("a/../../{sentinel}", b"escaped")], "climbs out"),
    "through-symlink": ([symlink("etc", "/tmp"), file("etc/{sentinel}", b"escaped")], "symlink"),
    "through-relative-symlink": (
        [directory("x"), symlink("x/up", "../../../../../../tmp"), file("x/up/{sentinel}", b"escaped")],
        "symlink",
    ),
    "hardlink-out": ([entry("stolen", tarfile.LNKTYPE, linkname="/tmp/{sentinel}-victim")], "this layer"),
    "hardlink-dotdot": ([entry("stolen", tarfile.LNKTYPE, linkname="../../../../tmp/{sentinel}-victim")], "climbs out"),
    "huge-file": (None, "larger than"),
}


def huge_declared_file() -> bytes:
    """A tar whose member claims a terabyte (the data is not there; the header must be enough to refuse it)."""
    info = entry("huge", tarfile.REGTYPE)
    info.size = 1 << 40
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    return header + b"\0" * 4096


@pytest.mark.parametrize("case", sorted(HOSTILE_REFUSED))
def test_hostile_layers_are_refused(daemon, registry, case):
    # Everything hostile points into /tmp at names of this test's own: a broken unpacker fails the test
    # without touching the host's real files.
    sentinel = f"shoal-escape-{os.getpid()}-{case}"
    victim = Path(f"/tmp/{sentinel}-victim")
    victim.write_bytes(b"untouched")
    try:
        entries, message = HOSTILE_REFUSED[case]
        if entries is None:
            layer = huge_declared_file()
        else:
            fixed = []
            for e in entries:
                info = e[0] if isinstance(e, tuple) else e
                info.name = info.name.replace("{sentinel}", sentinel)
                info.linkname = info.linkname.replace("{sentinel}", sentinel)
                fixed.append(e)
            layer = tar_of(fixed)
        ref = registry.push([busybox_layer(), layer], f"hostile/{case}:v1")
        before = store_layers(daemon)
        with pytest.raises(shoal.exception.InvalidError) as err:
            shoal.Image.from_registry(ref).build()
        assert "refused" in str(err.value) and message in str(err.value), str(err.value)
        assert not Path(f"/tmp/{sentinel}").exists()
        assert not Path(f"/{sentinel}").exists()
        assert victim.read_bytes() == b"untouched" and victim.stat().st_nlink == 1
    finally:
        victim.unlink()
    # The refused layer left nothing: no layer, nothing staged (the busybox layer may have been added).
    assert all(layer_has_busybox(daemon, x) for x in store_layers(daemon) - before)
    assert list((daemon.data_dir / "images" / "tmp").iterdir()) == []


def layer_meta(daemon, layer: str) -> dict:
    return json.loads((daemon.data_dir / "images" / "layers" / f"{layer}.json").read_text())


def layer_has_busybox(daemon, layer: str) -> bool:
    return (daemon.data_dir / "images" / "layers" / layer / "bin" / "busybox").exists()


def test_hostile_entries_that_can_be_neutralized_are(app, daemon, registry):
    layer = tar_of(
        [
            directory("dev-in-image"),
            entry("dev-in-image/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
            entry("dev-in-image/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0),
            file("/abs/file", b"absolute names are relative to the layer\n"),
            file("suid-root", b"#!/bin/sh\nid -u\n", 0o4755, uid=0, gid=0),
            file("suid-alien", b"x", 0o4755, uid=10_000_000, gid=10_000_000),
            symlink("abs-link", "/etc/shadow"),
            file("xattr-file", b"x", pax_headers={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02" + "\0" * 16}),
            entry("fifo", tarfile.FIFOTYPE, mode=0o644),
        ]
    )
    ref = registry.push([busybox_layer(), layer], "hostile/neutralized:v1")
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.from_registry(ref), timeout=60)
    try:
        assert sh(sb, "ls -A /dev-in-image") == ""  # device nodes dropped
        assert sh(sb, "cat /abs/file") == "absolute names are relative to the layer\n"
        assert sh(sb, "stat -c '%a %u' /suid-root") == "4755 0\n"  # root of the sandbox, not of the host
        assert sh(sb, "stat -c '%a %u' /suid-alien") == "755 65534\n"  # an owner outside the range: nobody, no suid
        assert sh(sb, "readlink /abs-link") == "/etc/shadow\n"  # inert text; resolves inside the sandbox
        assert sh(sb, "stat -c %F /fifo") == "fifo\n"
    finally:
        sb.terminate()
    # On the host, the files belong to the sandbox range, and no capability was set.
    owners = set()
    for layer_dir in (daemon.data_dir / "images" / "layers").iterdir():
        suid = layer_dir / "suid-root"
        if suid.exists():
            owners.add(suid.stat().st_uid)
            with pytest.raises(OSError):
                os.getxattr(layer_dir / "xattr-file", "security.capability")
    assert owners == {100000}


# ---------------------------------------------------------------------------------------------- credentials and errors


@pytest.fixture(scope="module")
def private_registry(make_registry) -> LocalRegistry:
    return make_registry(auth=("shoal-user", "s3cret-pw"))


def test_a_registry_that_needs_a_login(app, private_registry, tmp_path):
    ref = private_registry.push([busybox_layer()], "private/app:v1")
    with pytest.raises(shoal.exception.PermissionDeniedError):
        shoal.Image.from_registry(ref).build()
    wrong = shoal.Secret.from_dict({"REGISTRY_USERNAME": "shoal-user", "REGISTRY_PASSWORD": "wrong"})
    with pytest.raises(shoal.exception.PermissionDeniedError):
        shoal.Image.from_registry(ref, secret=wrong).build()
    with pytest.raises(shoal.exception.InvalidError):
        shoal.Image.from_registry(ref, secret=shoal.Secret.from_dict({"USER": "x"})).build()
    good = shoal.Secret.from_dict({"REGISTRY_USERNAME": "shoal-user", "REGISTRY_PASSWORD": "s3cret-pw"})
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.from_registry(ref, secret=good), timeout=60)
    try:
        assert sh(sb, "echo in") == "in\n"
        # The password reached neither the image's record nor the sandbox.
        images = run_blocking(default_client().request("GET", "/v1/images"))["images"]
        assert "s3cret-pw" not in json.dumps(images)
        assert "s3cret-pw" not in sh(sb, "env")
    finally:
        sb.terminate()
    # A Dockerfile whose FROM is that private image logs in with registry_secret.
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {ref}\nRUN echo built > /built\n")
    with pytest.raises(shoal.exception.PermissionDeniedError):
        shoal.Image.from_dockerfile(dockerfile).build()
    built = shoal.Image.from_dockerfile(dockerfile, registry_secret=good)
    sb2 = shoal.Sandbox.create(app=app, image=built, timeout=60)
    try:
        assert sh(sb2, "cat /built") == "built\n"
    finally:
        sb2.terminate()


def test_a_named_secret_for_a_registry(app, private_registry):
    ref = private_registry.push([busybox_layer(), tar_of([file("named", b"ok\n")])], "private/named:v1")
    name = f"registry-login-{os.getpid()}"
    shoal.Secret.objects.create(name, {"REGISTRY_USERNAME": "shoal-user", "REGISTRY_PASSWORD": "s3cret-pw"})
    try:
        image = shoal.Image.from_registry(ref, secret=shoal.Secret.from_name(name))
        sb = shoal.Sandbox.create(app=app, image=image, timeout=60)
        try:
            assert sh(sb, "cat /named") == "ok\n"
        finally:
            sb.terminate()
    finally:
        shoal.Secret.objects.delete(name)


def test_reference_and_argument_errors(daemon, registry):
    with pytest.raises(shoal.exception.InvalidError):
        shoal.Image.from_registry("Not/Valid:tag")
    with pytest.raises(shoal.exception.InvalidError):
        shoal.Image.from_registry("-oops")
    with pytest.raises(shoal.exception.InvalidError, match=r"Python 3\.12 is not available.*3\.11 \(Debian bookworm\)"):
        shoal.Image.from_registry("busybox", add_python="3.12")
    with pytest.raises(shoal.exception.InvalidError):
        shoal.Image.from_registry("busybox", unknown_option=True)
    with pytest.raises(shoal.exception.NotFoundError):
        shoal.Image.from_registry(f"{registry.host}/no/such:image").build()
    with pytest.raises(shoal.exception.ServiceError):
        shoal.Image.from_registry(f"127.0.0.1:{free_port()}/nobody/listens:here").build()

"""``Image.from_registry``: pull an OCI/Docker image with skopeo and turn its layers into shoal layers.

1. ``skopeo inspect --raw`` reads the tag's manifest; a multi-platform index
   is narrowed to linux/amd64.  That platform manifest's digest is the cache
   key: an image already pulled at the same digest is used as it is, without
   downloading anything else (the registry is still asked what the tag points
   to; if it cannot be reached, the last image pulled for the tag is used).
2. ``skopeo copy docker://REPO@DIGEST oci:TMP`` downloads it (skopeo checks
   every blob's digest) into the store's staging area.
3. Each layer becomes one layer of the store, unpacked by
   :mod:`shoal.images.layertar` (whiteouts translated for overlayfs, hostile
   entries refused).  Layers are named after their blob digest, so images
   sharing a base share its layers, and a layer already converted is skipped.
4. The image config's Env, Cmd, Entrypoint, WorkingDir and User become the
   image's config.

Credentials (``secret=`` with REGISTRY_USERNAME and REGISTRY_PASSWORD) reach
skopeo in a private auth file (mode 0600, deleted afterwards), never on its
command line, and are never stored with the image.  Registries on loopback
are contacted without TLS verification (and over plain HTTP), as Docker does;
any other registry needs valid TLS (the host's trust store, so extra CAs
installed there count).  See docs/decisions/0062-registry-images-layer-per-layer.md.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from shoal.exception import Error, InvalidError, NotFoundError, PermissionDeniedError, ServiceError
from shoal.images import layertar
from shoal.images.base import BASE_ENV
from shoal.images.store import LayerStore
from shoal.store.state import ImageRow, State
from shoal.wire import ids, reference
from shoal.wire.image_config import ImageConfig

if TYPE_CHECKING:
    from shoal.wire.images import ImageRef

log = logging.getLogger(__name__)

CONVERT_VERSION = 1
"""Bump when the conversion changes: new layer and image ids, so old conversions are not reused."""
PLATFORM = {"os": "linux", "architecture": "amd64"}
MAX_IMAGE_BYTES = 64 << 30
"""Most uncompressed file bytes one image may unpack to."""
MAX_IMAGE_ENTRIES = 4_000_000
INSPECT_TIMEOUT = "120s"
COPY_TIMEOUT = "3600s"
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
}
LogFn = Callable[[str], None]


@dataclass
class Credentials:
    """A registry login."""

    username: str
    password: str


class Registry:
    """Pulls registry images into one daemon's layer store."""

    def __init__(
        self,
        state: State,
        store: LayerStore,
        owner_low: int,
        owner_count: int,
        named_secret: Callable[[str], dict[str, str]] | None = None,
        hold: Callable[[list[str], int], None] | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.owner_low = owner_low
        self.owner_count = owner_count
        self.named_secret = named_secret
        self.hold = hold
        """Counts layers in use by a pull in progress up (+1) or down (-1), so a prune keeps them."""
        self._locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------ entry point

    async def resolve(self, ref: ImageRef, log_line: LogFn) -> tuple[str, ImageConfig]:
        """The image id and config of ``ref.registry``, pulling it if this digest was never pulled."""
        src = ref.registry
        if src is None:
            raise InvalidError("a registry image needs its reference (registry.tag)")
        try:
            parsed = reference.parse(src.tag)
        except reference.BadReference as exc:
            raise InvalidError(str(exc)) from None
        creds = self._credentials(src.secret_env, src.secret_name)
        loop = asyncio.get_running_loop()

        def threadsafe(line: str) -> None:
            loop.call_soon_threadsafe(log_line, line)

        with self._authfile(parsed, creds) as authfile:
            try:
                digest, manifest = await asyncio.to_thread(self._platform_manifest, parsed, authfile)
            except ServiceError as exc:
                cached = self._last_pull(str(parsed))
                if cached is None:
                    raise
                log_line(f"{parsed}: the registry cannot be reached ({exc}); using the image pulled before")
                return cached
            image_id = image_id_for(digest, self.owner_low)
            lock = self._locks.setdefault(image_id, asyncio.Lock())
            async with lock:
                if not ref.force_build:
                    found = self._existing(image_id)
                    if found is not None:
                        log_line(f"{parsed}: up to date ({digest[:19]}), nothing to pull")
                        return found
                log_line(f"pulling {parsed} ({digest[:19]}) for linux/amd64")
                blobs = [str(d.get("digest", "")) for d in manifest.get("layers") or [] if isinstance(d, dict)]
                layers = [layer_id_for(b, self.owner_low) for b in blobs]
                if self.hold is not None:
                    self.hold(layers, +1)  # from before the first layer is published until the image is recorded
                try:
                    cfg = await asyncio.to_thread(self._pull, parsed, digest, authfile, threadsafe)
                    self._record(image_id, src.tag, digest, cfg)
                finally:
                    if self.hold is not None:
                        self.hold(layers, -1)
        log_line(f"{parsed}: ready as {image_id}")
        return image_id, cfg

    def _record(self, image_id: str, tag: str, digest: str, cfg: ImageConfig) -> None:
        self.state.add_image(
            ImageRow(
                image_id,
                {"kind": "registry", "tag": tag, "digest": digest, "platform": "linux/amd64", "v": CONVERT_VERSION},
                cfg.to_json(),
                time.time(),
            )
        )

    def _existing(self, image_id: str) -> tuple[str, ImageConfig] | None:
        row = self.state.image(image_id)
        if row is None:
            return None
        cfg = ImageConfig.from_json(row.config)
        if all(self.store.exists(layer) for layer in cfg.layers):
            return image_id, cfg
        return None

    def _last_pull(self, tag: str) -> tuple[str, ImageConfig] | None:
        rows = [
            r
            for r in self.state.images()
            if r.recipe.get("kind") == "registry" and _normalized(str(r.recipe.get("tag", ""))) == tag
        ]
        for row in sorted(rows, key=lambda r: r.created_at, reverse=True):
            found = self._existing(row.id)
            if found is not None:
                return found
        return None

    # ------------------------------------------------------------ credentials

    def _credentials(self, env: dict[str, str], secret_name: str | None) -> Credentials | None:
        values = dict(env)
        if secret_name is not None:
            if self.named_secret is None:
                raise InvalidError("this daemon cannot read named secrets for registry pulls")
            values.update(self.named_secret(secret_name))
        if not values:
            return None
        user, password = values.get("REGISTRY_USERNAME"), values.get("REGISTRY_PASSWORD")
        if not user or password is None:
            raise InvalidError("a registry secret must hold REGISTRY_USERNAME and REGISTRY_PASSWORD")
        return Credentials(user, password)

    @contextmanager
    def _authfile(self, ref: reference.Reference, creds: Credentials | None) -> Iterator[Path | None]:
        """A private containers-auth.json for this pull (None: no secret given, skopeo's defaults apply)."""
        if creds is None:
            yield None
            return
        path = self.store.tmp / f"auth-{os.urandom(8).hex()}.json"
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        key = "docker.io" if ref.host == reference.DOCKER_HUB else ref.host
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"auths": {key: {"auth": token}}}, f)
            yield path
        finally:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ skopeo

    def _skopeo(self, ref: reference.Reference, authfile: Path | None, timeout: str, *args: str) -> list[str]:
        if not shutil.which("skopeo"):
            raise InvalidError("skopeo is not installed: run `make setup` (or apt-get install skopeo)")
        argv = ["skopeo", "--command-timeout", timeout, "--tmpdir", str(self.store.tmp)]
        if not Path("/etc/containers/policy.json").exists():
            argv.append("--insecure-policy")  # no signature policy configured on this host: accept, as docker pull does
        argv += args
        if authfile is not None:
            argv += ["--authfile", str(authfile)]
        return argv

    def _tls(self, ref: reference.Reference, flag: str) -> list[str]:
        return [f"{flag}=false"] if ref.loopback else []

    def _platform_manifest(self, ref: reference.Reference, authfile: Path | None) -> tuple[str, dict[str, Any]]:
        """The digest and content of the linux/amd64 manifest the reference points to now."""
        argv = self._skopeo(ref, authfile, INSPECT_TIMEOUT, "inspect", "--raw", "--retry-times", "2")
        argv += self._tls(ref, "--tls-verify")
        raw = _run([*argv, ref.transport()], str(ref))
        manifest = _manifest(raw, ref)
        if manifest.get("mediaType", "") in INDEX_TYPES or "manifests" in manifest:
            for m in manifest.get("manifests") or []:
                p = m.get("platform") or {} if isinstance(m, dict) else {}
                if p.get("os") == "linux" and p.get("architecture") == "amd64" and "digest" in m:
                    digest = str(m["digest"])
                    if not reference.DIGEST_RE.match(digest):
                        break
                    raw = _run([*argv, ref.transport(digest)], str(ref))
                    if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
                        raise ServiceError(f"{ref}: the registry sent a manifest that does not match its digest")
                    return digest, _manifest(raw, ref)
            raise InvalidError(f"{ref} has no linux/amd64 image (shoal runs linux/amd64 images)")
        return "sha256:" + hashlib.sha256(raw).hexdigest(), manifest

    def _pull(self, ref: reference.Reference, digest: str, authfile: Path | None, log_line: LogFn) -> ImageConfig:
        work = self.store.tmp / f"pull-{os.urandom(8).hex()}"
        work.mkdir(mode=0o700)
        try:
            layout = work / "oci"
            argv = self._skopeo(ref, authfile, COPY_TIMEOUT, "copy", "--retry-times", "2")
            argv += [*self._tls(ref, "--src-tls-verify"), ref.transport(digest), f"oci:{layout}:image"]
            _run(argv, str(ref), log_line)
            return self._convert(ref, layout, log_line)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------ conversion

    def _convert(self, ref: reference.Reference, layout: Path, log_line: LogFn) -> ImageConfig:
        index = _json(layout / "index.json")
        manifests = index.get("manifests") or []
        if len(manifests) != 1:
            raise InvalidError(f"{ref}: expected one manifest in the pulled layout, found {len(manifests)}")
        manifest = _json(_blob(layout, manifests[0]["digest"]))
        config = _json(_blob(layout, manifest["config"]["digest"]))
        if config.get("os", "linux") != "linux" or config.get("architecture", "amd64") != "amd64":
            raise InvalidError(f"{ref} is a {config.get('os')}/{config.get('architecture')} image, not linux/amd64")
        layers = manifest.get("layers") or []
        budget = layertar.Budget(MAX_IMAGE_BYTES, MAX_IMAGE_ENTRIES)
        ids_out: list[str] = []
        for n, desc in enumerate(layers, 1):
            media, blob_digest = str(desc.get("mediaType", "")), str(desc.get("digest", ""))
            if media not in LAYER_TYPES:
                raise InvalidError(f"{ref}: layer {n} has media type {media!r}, which shoal cannot unpack")
            layer_id = layer_id_for(blob_digest, self.owner_low)
            ids_out.append(layer_id)
            size = int(desc.get("size", 0))
            if self.store.exists(layer_id):
                log_line(f"layer {n}/{len(layers)} {blob_digest[7:19]}: already in the store")
                continue
            with self.store.lock(layer_id):
                if self.store.exists(layer_id):
                    continue
                started = time.monotonic()
                stats = self._unpack(_blob(layout, blob_digest), LAYER_TYPES[media], layer_id, blob_digest, budget)
                log_line(
                    f"layer {n}/{len(layers)} {blob_digest[7:19]}: {size / 1e6:.1f} MB →"
                    f" {stats.files} files, {stats.bytes / 1e6:.1f} MB in {time.monotonic() - started:.1f} s"
                    + (f" ({stats.whiteouts} deletions)" if stats.whiteouts else "")
                )
                if stats.dropped_count:
                    log_line(
                        f"layer {n}: left out {stats.dropped_count} device nodes or special files:"
                        f" {', '.join(stats.dropped[:5])}"
                    )
        return image_config(config.get("config") or {}, ids_out, log_line)

    def _unpack(
        self, blob: Path, compression: str, layer_id: str, blob_digest: str, budget: layertar.Budget
    ) -> layertar.Stats:
        return layertar.unpack_staged(
            self.store,
            layer_id,
            lambda: _decompressed(blob, compression),
            self.owner_low,
            self.owner_count,
            budget,
            f"layer {blob_digest[:19]}",
            {"registry_blob": blob_digest},
        )


def image_id_for(manifest_digest: str, owner_low: int) -> str:
    """The image id of a converted registry image (same digest and uid range: same image)."""
    key = json.dumps({"kind": "registry", "manifest": manifest_digest, "platform": "linux/amd64", "uid": owner_low})
    return ids.from_digest("image", hashlib.sha256(f"{key}:v{CONVERT_VERSION}".encode()).digest())


def layer_id_for(blob_digest: str, owner_low: int) -> str:
    """The store id of a converted registry layer."""
    key = f"registry-layer:v{CONVERT_VERSION}:{blob_digest}:{owner_low}"
    return ids.from_digest("image", hashlib.sha256(key.encode()).digest())


def image_config(cfg: dict[str, Any], layers: list[str], log_line: LogFn) -> ImageConfig:
    """The shoal config of an OCI image config's ``config`` object."""
    env: dict[str, str] = {}
    for item in cfg.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            k, _, v = item.partition("=")
            if k and "\x00" not in item:
                env[k] = v
    env.setdefault("PATH", BASE_ENV["PATH"])

    def argv(value: Any) -> list[str] | None:
        return [str(a) for a in value] if isinstance(value, list) and value else None

    user = str(cfg.get("User") or "") or None
    return ImageConfig(
        env=env,
        cmd=argv(cfg.get("Cmd")),
        entrypoint=argv(cfg.get("Entrypoint")),
        workdir=str(cfg["WorkingDir"]) if cfg.get("WorkingDir") else None,
        layers=layers,
        user=user,
    )


# ------------------------------------------------------------ helpers


def _manifest(raw: bytes, ref: reference.Reference) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise ServiceError(f"{ref}: the registry sent a manifest that is not a JSON object")
    return manifest


def _normalized(tag: str) -> str:
    try:
        return str(reference.parse(tag))
    except reference.BadReference:
        return tag


def _run(argv: list[str], what: str, log_line: LogFn | None = None) -> bytes:
    """Run skopeo; stdout, or the mapped error with its message."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    err_lines: list[str] = []

    def pump_stderr(stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            err_lines.append(line)
            del err_lines[:-40]

    t = threading.Thread(target=pump_stderr, args=(proc.stderr,), daemon=True)
    t.start()
    out = b""
    if log_line is None:
        out = proc.stdout.read()
    else:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                log_line(line)
    rc = proc.wait()
    t.join()
    if rc != 0:
        raise _error(what, "\n".join(err_lines[-8:]) or f"skopeo exited with {rc}")
    return out


def _env() -> dict[str, str]:
    keep = ("PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOME"] = "/root"
    return env


def _error(what: str, message: str) -> Error:
    low = message.lower()
    # "401" as a word: a registry's port (127.0.0.1:40131) must not read as a status.
    if "unauthorized" in low or "authentication required" in low or "denied" in low or re.search(r"\b401\b", low):
        return PermissionDeniedError(f"the registry refused access to {what}: {message}")
    if "manifest unknown" in low or "not found" in low or "name unknown" in low:
        return NotFoundError(f"{what} was not found in its registry: {message}")
    if "connection refused" in low or "no such host" in low or "timeout" in low or "i/o timeout" in low:
        return ServiceError(f"the registry of {what} cannot be reached: {message}")
    return InvalidError(f"pulling {what} failed: {message}")


def _json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(4 << 20)
        out = json.loads(data)
    except (OSError, ValueError) as exc:
        raise InvalidError(f"the pulled image is malformed ({path.name}: {exc})") from None
    if not isinstance(out, dict):
        raise InvalidError(f"the pulled image is malformed ({path.name} is not an object)")
    return out


def _blob(layout: Path, digest: str) -> Path:
    if not reference.DIGEST_RE.match(digest):
        raise InvalidError(f"the pulled image names a blob {digest[:80]!r} that is not a sha256 digest")
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


@contextmanager
def _decompressed(blob: Path, compression: str) -> Iterator[IO[bytes]]:
    if compression == "gzip":
        with open(blob, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as g:
            yield g  # type: ignore[misc]  # a GzipFile is a binary stream
    elif compression == "zstd":
        if not shutil.which("zstd"):
            raise InvalidError("this image has zstd-compressed layers: install zstd (apt-get install zstd)")
        proc = subprocess.Popen(["zstd", "-dc", "--", str(blob)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()
    else:
        with open(blob, "rb") as f:
            yield f

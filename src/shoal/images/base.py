"""The base image: Debian slim with Python, bootstrapped once with mmdebstrap.

Like Modal's ``debian_slim``: ``python`` and ``pip`` on PATH, pip allowed to
install into the system (Debian's externally-managed marker removed), and a
default command that keeps a bare sandbox alive for create-then-exec.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from shoal.exception import InvalidError, ServiceError
from shoal.images.store import LayerStore, shift_tree
from shoal.wire import ids
from shoal.wire.image_config import ImageConfig
from shoal.wire.pythons import PYTHON_SUITES, ROLLING_SUITES

RECIPE_VERSION = 1
PACKAGES = ["python3", "python3-pip", "python-is-python3", "ca-certificates", "procps"]
KEEP_ALIVE_CMD = ["sleep", "172800"]
_builds: set[subprocess.Popen[str]] = set()
"""Bootstraps in progress (``stop_builds`` ends them)."""
_builds_lock = threading.Lock()
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
"""HOME is not set here: the agent sets it from /etc/passwd for whoever a process runs as (Docker's rule)."""


def recipe(python_version: str) -> dict[str, object]:
    """The content that identifies the base image."""
    return {
        "kind": "debian_slim",
        "python": python_version,
        "suite": PYTHON_SUITES[python_version],
        "packages": PACKAGES,
        "v": RECIPE_VERSION,
    }


def image_id(python_version: str) -> str:
    """Deterministic id of the base image for a Python version."""
    digest = hashlib.sha256(json.dumps(recipe(python_version), sort_keys=True).encode()).digest()
    return ids.from_digest("image", digest)


def config(python_version: str, layer_id: str) -> ImageConfig:
    """The base image's config."""
    return ImageConfig(env=dict(BASE_ENV), cmd=list(KEEP_ALIVE_CMD), layers=[layer_id], python=python_version)


def build(
    store: LayerStore,
    python_version: str,
    uid_offset: int,
    log: Callable[[str], None],
) -> str:
    """Make sure the base layer exists; returns its layer id.  Blocks (tens of seconds when it builds)."""
    layer_id = image_id(python_version)
    if store.exists(layer_id):
        return layer_id
    with store.lock(layer_id):
        if store.exists(layer_id):
            return layer_id
        if not shutil.which("mmdebstrap"):
            raise InvalidError("mmdebstrap is not installed: run `make setup` (or apt-get install mmdebstrap)")
        staged = store.staging(layer_id)
        suite = PYTHON_SUITES[python_version]
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--include=" + ",".join(PACKAGES),
            "--aptopt=Acquire::Retries=3",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            suite,
            str(staged),
        ]
        sources = sources_line(suite)
        if sources:
            argv.append(sources)
        log(f"building base image: Debian {suite} with Python {python_version} (mmdebstrap, once)")
        # An image's files get the usual modes, whatever the daemon's own umask (0077) is.
        # Its own session, so that a stopping daemon can end it with everything it started (apt, dpkg).
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, umask=0o022, start_new_session=True
        )
        assert proc.stdout is not None
        tail: list[str] = []
        with _builds_lock:
            _builds.add(proc)
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail = [*tail[-40:], line]
                log(line)
            returncode = proc.wait()
        except BaseException:
            _stop(proc)  # Ctrl-C in `shoal setup`: the bootstrap is in another session and did not see it
            proc.wait()
            shutil.rmtree(staged, ignore_errors=True)
            raise
        finally:
            with _builds_lock:
                _builds.discard(proc)
        if returncode != 0:
            shutil.rmtree(staged, ignore_errors=True)
            if returncode == -signal.SIGTERM or returncode == 128 + signal.SIGTERM:
                raise ServiceError("building the base image was stopped (the daemon is stopping)")
            raise InvalidError("building the base image failed:\n" + "\n".join(tail[-15:]))
        if not (staged / "usr/bin" / f"python{python_version}").exists():
            found = sorted(p.name for p in (staged / "usr/bin").glob("python3.*") if p.name[7:].isdigit())
            shutil.rmtree(staged, ignore_errors=True)
            raise InvalidError(
                f"Debian {suite} no longer carries Python {python_version} (it has {', '.join(found) or 'none'}):"
                " shoal's table of suites (shoal.images.base.PYTHON_SUITES) needs updating"
            )
        _customize(staged)
        shift_tree(staged, uid_offset)
        store.publish(layer_id, staged, {"recipe": recipe(python_version)})
        log("base image ready")
        return layer_id


def stop_builds() -> None:
    """End every base-image bootstrap in progress, with the processes it started (the daemon is stopping)."""
    with _builds_lock:
        running = list(_builds)
    for proc in running:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)


def _host_sources(suite: str, paths: list[Path] | None = None) -> str | None:
    """The host's Debian mirror, for ``suite``, in one-line sources format, if it has one.

    Hosts behind a proxy or with a local mirror configure it for apt; the bootstrap uses the same mirror, also
    for a suite the host itself does not use (another Python version's).
    """
    for_suite: list[str] = []
    any_suite: list[str] = []
    if paths is None:
        paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = dict(
                    line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#")
                )
                uris = [u for u in fields.get("URIs", "").split() if "debian-security" not in u]
                suites = fields.get("Suites", "").split()
                any_suite += [u for u in uris if _is_debian_mirror(u) and any(s in DEBIAN_SUITES for s in suites)]
                if suite in suites:
                    for_suite += uris
        else:
            for line in text.splitlines():
                words = line.split()
                if not words or words[0] != "deb":
                    continue
                rest = words[1:]
                if rest and rest[0].startswith("["):  # options: "[arch=amd64 signed-by=…]"
                    end = next((i for i, w in enumerate(rest) if w.endswith("]")), len(rest))
                    rest = rest[end + 1 :]
                if len(rest) < 2 or "security" in rest[0]:
                    continue
                uri, dist = rest[0], rest[1]
                if dist == suite:
                    for_suite.append(uri)
                if dist in DEBIAN_SUITES and _is_debian_mirror(uri):
                    any_suite.append(uri)
    mirrors = for_suite or any_suite
    return f"deb {mirrors[0]} {suite} main" if mirrors else None


DEFAULT_MIRROR = "http://deb.debian.org/debian"


def sources_line(suite: str) -> str | None:
    """The one-line source the bootstrap (and then apt in the image) uses for ``suite``; None: mmdebstrap's
    default.  A rolling suite's line says not to check its Release file's expiry."""
    line = _host_sources(suite)
    if suite not in ROLLING_SUITES:
        return line
    return (line or f"deb {DEFAULT_MIRROR} {suite} main").replace("deb ", "deb [check-valid-until=no] ", 1)


DEBIAN_SUITES = frozenset({"buster", "bullseye", "bookworm", "trixie", "forky", "sid"})


def _is_debian_mirror(uri: str) -> bool:
    return uri.rstrip("/").endswith("/debian")


def _customize(root: Path) -> None:
    """Make the bootstrap behave like Modal's debian_slim."""
    for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    pip_conf = root / "etc/pip.conf"
    pip_conf.write_text("[global]\nroot-user-action = ignore\ndisable-pip-version-check = true\n")
    os.chmod(pip_conf, 0o644)
    for d in ("var/lib/apt/lists", "var/cache/apt/archives"):
        p = root / d
        if p.is_dir():
            for child in p.iterdir():
                if child.is_file():
                    child.unlink()
    os.chmod(root, 0o755)

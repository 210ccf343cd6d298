"""Build the agent binary from its C source (static, so it runs in any image)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(name) for name in ("agent.c", "fstool.c", "userns.c", "runscexec.c"))
"""Everything compiled into the binary: the agent, the filesystem tool it becomes as `shoal-agent fs`, and two
host-side helpers: one makes sandboxes' user namespaces (`shoal-agent userns`), one is how runsc is run
(`shoal-agent runsc-exec`: /proc/sys/net hidden, membarrier off for commands that start no Sentry)."""
BINARY_NAME = "shoal-agent"


def source_digest() -> str:
    """Digest of the agent sources, recorded beside the binary built from them."""
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    return h.hexdigest()


def ensure_agent(dest_dir: Path, cache: Path | None = None) -> Path:
    """Return the path of an agent binary built from the current source, building it if needed.

    ``cache``: a directory of binaries by source digest that daemons on fresh data directories share (the test
    suite's, ``scripts/local-cluster``'s nodes): one is copied from it rather than compiled again (~1 s), and a
    binary compiled here is stored in it.  Used only if owned by this user and writable by no one else, since
    what it holds runs as root."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(dest_dir, 0o755)
    binary = dest_dir / BINARY_NAME
    stamp = dest_dir / f"{BINARY_NAME}.sha256"
    digest = source_digest()
    if binary.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return binary
    cache = cache if cache is not None and _trusted_dir(cache) else None
    cached = cache / digest / BINARY_NAME if cache is not None else None
    tmp = dest_dir / f".{BINARY_NAME}.{os.getpid()}"
    if cached is not None and _trusted_file(cached):
        shutil.copyfile(cached, tmp)
    else:
        _compile(tmp)
        if cache is not None:
            _store(cache / digest, tmp)
    os.chmod(tmp, 0o755)
    os.rename(tmp, binary)
    stamp.write_text(digest + "\n")
    return binary


def stage_agent(binary: Path, staged: Path) -> None:
    """Put a copy of ``binary`` at ``staged`` (on the runtime directory's filesystem, where sandboxes' hard links
    to it are made), unless the one there is the same.  Replaced by a rename: sandboxes linked to an earlier copy
    keep it."""
    staged.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(staged.parent, 0o755)
    with contextlib.suppress(OSError):
        if staged.read_bytes() == binary.read_bytes():
            return
    tmp = staged.with_name(f".{staged.name}.{os.getpid()}")
    shutil.copyfile(binary, tmp)
    os.chmod(tmp, 0o755)
    os.rename(tmp, staged)


def _compile(out: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError(
            "a C compiler is needed to build the sandbox agent: run `make setup` (apt-get install gcc libc6-dev)"
        )
    res = subprocess.run(
        [cc, "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), *map(str, SOURCES)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        out.unlink(missing_ok=True)
        raise RuntimeError(f"building the sandbox agent failed:\n{res.stderr[-2000:]}")


def _trusted_dir(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _trusted_file(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022 and _trusted_dir(path.parent)
    )


def _store(entry: Path, built: Path) -> None:
    """Put a freshly built binary in the cache (complete or not at all: several daemons may start at once)."""
    try:
        entry.mkdir(mode=0o755, exist_ok=True)
        part = entry / f".{BINARY_NAME}.{os.getpid()}"
        shutil.copyfile(built, part)
        os.chmod(part, 0o755)
        os.rename(part, entry / BINARY_NAME)
    except OSError:
        pass  # the cache only saves time

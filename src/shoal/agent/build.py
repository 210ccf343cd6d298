"""Build the agent binary from its C source (static, so it runs in any image)."""

from __future__ import annotations

import hashlib
import os
import shutil
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


def ensure_agent(dest_dir: Path) -> Path:
    """Return the path of an agent binary built from the current source, building it if needed."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(dest_dir, 0o755)
    binary = dest_dir / BINARY_NAME
    stamp = dest_dir / f"{BINARY_NAME}.sha256"
    digest = source_digest()
    if binary.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError(
            "a C compiler is needed to build the sandbox agent: run `make setup` (apt-get install gcc libc6-dev)"
        )
    tmp = dest_dir / f".{BINARY_NAME}.{os.getpid()}"
    res = subprocess.run(
        [cc, "-static", "-O2", "-Wall", "-Wextra", "-o", str(tmp), *map(str, SOURCES)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the sandbox agent failed:\n{res.stderr[-2000:]}")
    os.chmod(tmp, 0o755)
    os.rename(tmp, binary)
    stamp.write_text(digest + "\n")
    return binary

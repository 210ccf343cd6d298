"""A cluster of daemons on Ray built by ``scripts/local-cluster`` on this one machine, for the tests that need one:
bringing it up and down (checking that nothing is left), and the official client run against the head's gateway."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.conftest import REPO, restore_environ

SCRIPT = REPO / "scripts" / "local-cluster"


def local_cluster(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHOAL_VENV_BIN": str(Path(sys.executable).parent)}  # this run's Python and Ray
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False, env=env)


@contextlib.contextmanager
def cluster_env(*up_args: str) -> Iterator[dict[str, str]]:
    """A cluster made by ``local-cluster up *up_args``, its environment (SHOAL_URL, SHOAL_TOKEN of the head) set for
    the SDK while it lasts; removed afterwards, and nothing of it left on the machine."""
    up = local_cluster("up", *up_args)
    if up.returncode != 0:
        local_cluster("down")
        pytest.fail(f"local-cluster up failed:\n{up.stderr[-3000:]}")
    env = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()[-2:])
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        restore_environ(saved)
        down = local_cluster("down")
        assert down.returncode == 0, down.stderr[-3000:]
        assert leftovers() == []


def leftovers() -> list[str]:
    """What a cluster leaves on the machine if `down` missed it."""
    found: list[str] = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith("shoal-lc-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {ln.split(':')[1].strip()}" for ln in links.splitlines() if ": shlc" in ln]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"nft {t}" for t in tables.splitlines() if "shoal_local_cluster" in t]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/shoal-lc")]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("shoal-lc")]
    found += [
        f"mount {ln.split()[4]}" for ln in Path("/proc/self/mountinfo").read_text().splitlines() if "shoal-lc" in ln
    ]
    found += [f"dir {p}" for p in (Path("/var/tmp/shoal-lc"), Path("/run/shoal-local-cluster")) if p.exists()]
    return found


def official_client(program: str, *args: str) -> Any:
    """What ``program`` printed last (JSON): the official modal client run in the head's namespace, pointed at the
    head's gateway only."""
    pytest.importorskip("modal", reason="the gateway extra is not installed: make setup")
    gateway: dict[str, str] = run_blocking(default_client().request("GET", "/v1/gateway"))["env"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SHOAL_"))}
    environ.update(gateway, MODAL_CONFIG_PATH="/nonexistent/.modal.toml")
    done = subprocess.run(
        ["nsenter", "--net=/run/netns/shoal-lc-node0", "--", sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])

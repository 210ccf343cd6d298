"""``shoal setup``: build the sandbox agent and the base image ahead of the first sandbox."""

from __future__ import annotations

import os
import shutil
import time

import click

from shoal.agent.build import ensure_agent
from shoal.engine.config import Config
from shoal.images import base
from shoal.images.store import LayerStore
from shoal.wire.pythons import check_python_version

REQUIRED_TOOLS = ["mmdebstrap", "cc"]


@click.command("setup")
@click.option("--python", "python_version", default=None, help="Python version of the base image (default 3.11)")
def setup_cmd(python_version: str | None) -> None:
    """Prepare this machine: agent binary and base image (idempotent)."""
    if os.geteuid() != 0:
        raise click.ClickException("shoal setup must run as root")
    missing = [t for t in REQUIRED_TOOLS if not shutil.which(t)]
    if missing or not (shutil.which("runc") or shutil.which("crun")):
        raise click.ClickException(
            f"missing tools: {', '.join(missing) or 'runc'}; install the system packages (`make setup` does)"
        )
    cfg = Config()
    agent = ensure_agent(cfg.agent_dir, cfg.agent_cache)
    click.echo(f"agent: {agent}")
    store = LayerStore(cfg.images_dir)
    version = check_python_version(python_version)
    started = time.monotonic()
    layer = base.build(store, version, cfg.idmap.host_id, click.echo)
    click.echo(f"base image: {layer} (Python {version}) in {store.path(layer)} [{time.monotonic() - started:.1f}s]")

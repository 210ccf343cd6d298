"""What ``GET /v1/status`` answers: the daemon, its runtime, paths, sandboxes, images, GPUs and warm pool."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from shoal.wire.cluster import ClusterInfo


class StatusImage(BaseModel):
    """An image as ``shoal status`` lists it."""

    image_id: str
    kind: str | None
    created_at_us: int


class DaemonStatus(BaseModel):
    """``shoal status``."""

    version: str
    pid: int
    runtime: str
    runtime_path: str
    data_dir: str
    socket: str
    sandboxes_running: int
    images: list[StatusImage]
    idmap: dict[str, int]
    tunnel_ca: str | None
    gpu: dict[str, Any]
    """The GPU inventory and who holds what (``shoal.gpu.scheduler``)."""
    warm_pool: dict[str, Any]
    """The warm pool's size and state (``shoal.engine.pool``)."""
    capacity: dict[str, int]
    """``max_sandboxes``, ``live`` (running or starting), ``left`` (how many more fit); with per-sandbox uid
    ranges ``uid_slots`` and ``uid_slots_left``, else ``key_quota_left`` (the host's kernel key quota for the
    sandboxes' shared user) where the kernel says."""
    tunnels: dict[str, Any] = {}
    """``domain`` and ``port`` of the shared, name-routed tunnel listener (``--tunnel-domain``), when there is one."""
    runtimes: dict[str, Any] = {}
    """``default`` (what sandboxes run under unless they ask) and ``kinds``: ``runc`` and ``gvisor``, each with its
    ``binary``, or ``missing`` saying why this daemon lacks it."""
    uid_ranges: dict[str, Any] = {}
    """``mode`` (``per-sandbox`` or ``shared``), ``note`` (why), ``first_host_id`` and ``ids_per_sandbox``."""
    cluster: ClusterInfo = ClusterInfo(enabled=False)
    """The cluster this daemon belongs to (``shoal serve --ray``), and its nodes."""


class DashboardInfo(BaseModel):
    """``shoal dashboard``: where the web dashboard listens, and the URL that signs a browser in (secret)."""

    url: str
    login_url: str


class GatewayEnv(BaseModel):
    """``shoal gateway env``: the environment that points the official modal client at the daemon's gateway."""

    env: dict[str, str]

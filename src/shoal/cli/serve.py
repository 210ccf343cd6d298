"""``shoal serve``: run the daemon in the foreground, or detached with ``--background``."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from pathlib import Path

import click

from shoal.engine.config import UID_RANGE_MODES, Config, dashboard_address, gateway_address
from shoal.engine.uids import MAX_SLOTS
from shoal.network.config import NetworkConfig
from shoal.network.tls import check_covers
from shoal.runtime.registry import RUNTIMES
from shoal.util import jsonlog
from shoal.wire.cluster import parse_labels


def _config(
    socket: str | None,
    data_dir: str | None,
    runtime_dir: str | None,
    tcp: str | None,
    runtime: str | None,
    host_cas: bool = True,
    warm_pool: int | None = None,
    allow_private_ranges: tuple[str, ...] = (),
    max_sandboxes: int | None = None,
    uid_ranges: str | None = None,
    uid_slots: int | None = None,
    total_pids: int | None = None,
    total_memory_mib: int | None = None,
    min_free_disk_mib: int | None = None,
    options: dict[str, object] | None = None,
) -> Config:
    """The daemon's settings from its options (``options``: the tunnel and runtime ones, by name)."""
    kwargs: dict[str, object] = {}
    extra = dict(options or {})
    default_runtime = extra.pop("default_runtime", None)
    net: dict[str, object] = {k: v for k, v in extra.items() if v is not None}
    if allow_private_ranges:
        net["allow_private"] = list(allow_private_ranges)
    if net:
        try:
            network = kwargs["network"] = NetworkConfig(**net)  # type: ignore[arg-type]
            if network.tunnel_cert:
                check_covers(Path(network.tunnel_cert), f"*.{network.tunnel_domain}")
        except ValueError as exc:
            hint = "--allow-private-range" if "range" in str(exc) else "--tunnel-domain"
            raise click.BadParameter(str(exc), param_hint=hint) from None
    given = {
        "warm_pool": warm_pool,
        "max_sandboxes": max_sandboxes,
        "uid_ranges": uid_ranges,
        "uid_slots": uid_slots,
        "total_pids_limit": total_pids,
        "total_memory_mib": total_memory_mib,
        "min_free_disk_mib": min_free_disk_mib,
        "default_runtime": default_runtime,
    }
    kwargs.update({name: value for name, value in given.items() if value is not None})  # else env or default
    if not host_cas:
        kwargs["trust_host_cas"] = False
    if data_dir:
        kwargs["data_dir"] = Path(data_dir)
    if runtime_dir:
        kwargs["runtime_dir"] = Path(runtime_dir)
    if socket:
        kwargs["socket_path"] = Path(socket)
    if runtime:
        kwargs["runtime"] = runtime
    cfg = Config(**kwargs)  # type: ignore[arg-type]
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not port.isdigit():
            raise click.BadParameter("expected HOST:PORT", param_hint="--tcp")
        cfg.tcp_host = host or "127.0.0.1"
        cfg.tcp_port = int(port)
    return cfg


def _run(cfg: Config, ready_fd: int | None) -> None:
    from shoal.server.daemon import serve

    async def main() -> None:
        ready = asyncio.Event()

        async def report() -> None:
            await ready.wait()
            if ready_fd is not None:
                os.write(ready_fd, b"ok")
                os.close(ready_fd)

        task = asyncio.create_task(report())
        try:
            await serve(cfg, ready)
        finally:
            task.cancel()

    asyncio.run(main())


@click.command("serve")
@click.option("--socket", help="Unix socket for the API (default /run/shoal/shoald.sock)")
@click.option("--data-dir", help="state, images and outputs (default /var/lib/shoal)")
@click.option("--runtime-dir", help="sockets, bundles and mounts (default /run/shoal)")
@click.option("--tcp", metavar="HOST:PORT", help="also listen on TCP (bearer token required)")
@click.option(
    "--gateway",
    metavar="HOST:PORT|off",
    help="where the gateway for the official modal client listens (loopback only; `shoal gateway env`);"
    " default 127.0.0.1:8719, or $SHOAL_GATEWAY; off: no gateway",
)
@click.option(
    "--runtime",
    type=click.Choice(list(RUNTIMES)),
    help="OCI runtime of runc sandboxes (default: crun where it works, else runc)",
)
@click.option(
    "--default-runtime",
    type=click.Choice(["runc", "gvisor"]),
    help="what sandboxes run under unless they ask (Sandbox.create(runtime=)): runc containers or gVisor"
    " (runsc); default runc, or $SHOAL_DEFAULT_RUNTIME",
)
@click.option(
    "--host-cas/--no-host-cas",
    default=True,
    help="give images the host's extra CA certificates (/usr/local/share/ca-certificates); default on",
)
@click.option(
    "--warm-pool",
    type=click.IntRange(0, 64),
    help="keep N sandboxes of the default shape ready ahead of time (faster create); default 2, or $SHOAL_WARM_POOL",
)
@click.option(
    "--max-sandboxes",
    type=click.IntRange(1, 1_000_000),
    help="sandboxes held at once (running or starting); more are refused; default 1000, or $SHOAL_MAX_SANDBOXES",
)
@click.option(
    "--uid-ranges",
    type=click.Choice(UID_RANGE_MODES),
    help="a host uid range per sandbox (needs id-mapped mounts on the data directory's filesystem), one shared"
    " by all, or per sandbox where possible; default auto, or $SHOAL_UID_RANGES",
)
@click.option(
    "--uid-slots",
    type=click.IntRange(1, MAX_SLOTS),
    help="host uid ranges of 65,536 ids for sandboxes (at most this many at once); default 16384, or $SHOAL_UID_SLOTS",
)
@click.option(
    "--total-pids",
    type=click.IntRange(16, 1 << 22),
    help="processes of all sandboxes together; default the host's pid table less a reserve, or $SHOAL_TOTAL_PIDS",
)
@click.option(
    "--total-memory-mib",
    type=click.IntRange(64, 1 << 30),
    help="memory of all sandboxes together, in MiB; default the host's less a reserve, or $SHOAL_TOTAL_MEMORY_MIB",
)
@click.option(
    "--min-free-disk-mib",
    type=click.IntRange(0, 1 << 30),
    help="free space kept on the data directory's filesystem: creates are refused below it; default 512, or"
    " $SHOAL_MIN_FREE_DISK_MIB",
)
@click.option(
    "--allow-private-range",
    "allow_private_ranges",
    metavar="CIDR",
    multiple=True,
    help="let sandboxes reach this private range (within 10/8, 172.16/12, 192.168/16, 100.64/10, 192.0.0/24),"
    " denied by default; repeatable; a cloud metadata address only when given by itself (never 169.254/16);"
    " default $SHOAL_ALLOW_PRIVATE_RANGES",
)
@click.option(
    "--tunnel-domain",
    metavar="DOMAIN",
    help="a DNS domain whose names all point at this machine (a wildcard record): each TLS tunnel is then"
    " <unique>.DOMAIN on one port (--tunnel-port), routed by name, as Modal's; default $SHOAL_TUNNEL_DOMAIN,"
    " else each tunnel gets a port of its own",
)
@click.option(
    "--tunnel-port",
    type=click.IntRange(0, 65535),
    help="the port name-routed tunnels share (default 443, or $SHOAL_TUNNEL_PORT; 0: any free port)",
)
@click.option(
    "--tunnel-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="a certificate chain (PEM) for *.DOMAIN to serve instead of one from shoal's local CA, e.g. a publicly"
    " trusted wildcard certificate; needs --tunnel-key",
)
@click.option("--tunnel-key", type=click.Path(exists=True, dir_okay=False), help="the key of --tunnel-cert (PEM)")
@click.option(
    "--egress-ca-file",
    type=click.Path(exists=True, dir_okay=False),
    help="CA certificates (PEM) to trust, beside the host's store, for the servers that sandboxes' outbound"
    " policies add headers for (e.g. a company's TLS-inspecting proxy); default $SHOAL_EGRESS_CA_FILE",
)
@click.option(
    "--dashboard",
    metavar="HOST:PORT|off",
    help="the web dashboard's loopback address (default 127.0.0.1:8720, or $SHOAL_DASHBOARD; a port in use"
    " falls back to a free one; off: none); `shoal dashboard` prints its login URL",
)
@click.option(
    "--metrics-public",
    is_flag=True,
    help="serve GET /metrics on the --tcp listener without the bearer token (for a Prometheus that has none);"
    " default $SHOAL_METRICS_PUBLIC",
)
@click.option(
    "--uid-first-slot",
    type=click.IntRange(0, MAX_SLOTS - 1),
    help="the first of this daemon's uid ranges, so that daemons sharing a host take disjoint ones; default 0,"
    " or $SHOAL_UID_FIRST_SLOT",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="join the Ray cluster at ADDRESS (host:port of its head) as one node of a shoal cluster; needs --tcp and"
    " the `ray` extra (decision 0077); or $SHOAL_RAY_ADDRESS",
)
@click.option("--node-name", help="this daemon's name in the cluster; default the host name, or $SHOAL_NODE_NAME")
@click.option(
    "--node-labels",
    metavar="K=V,…",
    help="labels a create may ask for to land on this node; or $SHOAL_NODE_LABELS",
)
@click.option(
    "--advertise-url",
    metavar="URL",
    help="where the cluster's other nodes reach this daemon's API; default the --tcp address, or $SHOAL_ADVERTISE_URL",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=lambda: os.environ.get("SHOAL_LOG_FORMAT") or "text",
    show_default="text, or $SHOAL_LOG_FORMAT",
    help="the daemon's log: lines of text, or one JSON object per line",
)
@click.option("--background", is_flag=True, help="detach; return once the daemon is ready")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def serve_cmd(
    socket: str | None,
    data_dir: str | None,
    runtime_dir: str | None,
    tcp: str | None,
    gateway: str | None,
    runtime: str | None,
    default_runtime: str | None,
    host_cas: bool,
    warm_pool: int | None,
    allow_private_ranges: tuple[str, ...],
    max_sandboxes: int | None,
    uid_ranges: str | None,
    uid_slots: int | None,
    total_pids: int | None,
    total_memory_mib: int | None,
    min_free_disk_mib: int | None,
    tunnel_domain: str | None,
    tunnel_port: int | None,
    tunnel_cert: str | None,
    tunnel_key: str | None,
    egress_ca_file: str | None,
    dashboard: str | None,
    metrics_public: bool,
    uid_first_slot: int | None,
    ray_address: str | None,
    node_name: str | None,
    node_labels: str | None,
    advertise_url: str | None,
    log_format: str,
    background: bool,
    verbose: bool,
) -> None:
    """Run the shoal daemon (as root)."""
    if os.geteuid() != 0:
        raise click.ClickException("the shoal daemon must run as root (it creates namespaces, mounts and cgroups)")
    cfg = _config(
        socket,
        data_dir,
        runtime_dir,
        tcp,
        runtime,
        host_cas,
        warm_pool,
        allow_private_ranges,
        max_sandboxes,
        uid_ranges,
        uid_slots,
        total_pids,
        total_memory_mib,
        min_free_disk_mib,
        {
            "default_runtime": default_runtime,
            "tunnel_domain": tunnel_domain,
            "tunnel_port": tunnel_port,
            "tunnel_cert": str(Path(tunnel_cert).resolve()) if tunnel_cert else None,
            "tunnel_key": str(Path(tunnel_key).resolve()) if tunnel_key else None,
            "egress_ca_file": str(Path(egress_ca_file).resolve()) if egress_ca_file else None,
        },
    )
    if gateway is not None:
        cfg.gateway = gateway_address(gateway)
    if metrics_public:
        cfg.metrics_public = True
    if dashboard is not None:
        cfg.dashboard = dashboard_address(dashboard)
    _cluster_options(cfg, uid_first_slot, ray_address, node_name, node_labels, advertise_url)
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if not background:
        jsonlog.configure(level, fmt, log_format == "json")
        _run(cfg, None)
        return
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        log_fd = os.open(cfg.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        jsonlog.configure(level, fmt, log_format == "json")
        cfg.runtime_dir.mkdir(parents=True, exist_ok=True)
        cfg.pid_path.write_text(f"{os.getpid()}\n")
        try:
            _run(cfg, w)
        finally:
            cfg.pid_path.unlink(missing_ok=True)
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        ok = f.read() == b"ok"
    if not ok:
        tail = cfg.log_path.read_text(errors="replace")[-2000:] if cfg.log_path.exists() else ""
        raise click.ClickException(f"the daemon did not start; its log ({cfg.log_path}) ends with:\n{tail}")
    click.echo(f"shoal daemon running (pid {cfg.pid_path.read_text().strip()}), socket {cfg.socket}")


def _cluster_options(
    cfg: Config,
    uid_first_slot: int | None,
    ray_address: str | None,
    node_name: str | None,
    node_labels: str | None,
    advertise_url: str | None,
) -> None:
    """Apply the options of a daemon that shares its host or joins a cluster, checking they fit together."""
    if uid_first_slot is not None:
        cfg.uid_first_slot = uid_first_slot
    if cfg.uid_first_slot + cfg.uid_slots > MAX_SLOTS:
        raise click.UsageError(f"--uid-first-slot + --uid-slots must not pass {MAX_SLOTS}")
    if ray_address is not None:
        cfg.ray_address = ray_address
    if node_name is not None:
        cfg.node_name = node_name
    if node_labels is not None:
        try:
            cfg.node_labels = parse_labels(node_labels)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--node-labels") from None
    if advertise_url is not None:
        cfg.advertise_url = advertise_url
    if cfg.ray_address is None:
        return
    if cfg.tcp_port is None:
        raise click.UsageError("--ray needs --tcp HOST:PORT: the cluster's other nodes reach this daemon there")
    if cfg.advertise_url is None:
        host = cfg.tcp_host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            raise click.UsageError(
                "--tcp listens on every address: say which one the other nodes use (--advertise-url)"
            )
        cfg.advertise_url = f"http://{host}:{cfg.tcp_port}"
    if importlib.util.find_spec("ray") is None:
        raise click.UsageError("--ray needs Ray: pip install 'shoal[ray]' (make setup installs it)")

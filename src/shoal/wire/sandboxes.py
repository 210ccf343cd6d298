"""Sandboxes on the wire: create, exec, network policy, tags, and what the API answers about them."""

from __future__ import annotations

import enum
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from shoal.exception import Error
from shoal.wire import gpu as gpu_request
from shoal.wire import policy
from shoal.wire.base import MAX_TIMEOUT, EnvDict, WireModel, Workdir, check_argv, check_sandbox_name
from shoal.wire.images import ImageRef
from shoal.wire.outbound import MAX_HEADERS, OutboundHeaders
from shoal.wire.volumes import VolumeMount


class SandboxState(enum.StrEnum):
    """Where a sandbox is in its life; it only ever moves forward (``shoal.engine.sandbox``)."""

    CREATING = "creating"
    RUNNING = "running"
    FINISHED = "finished"


OutboundCidrs = Annotated[
    list[str] | None, AfterValidator(lambda v: None if v is None else policy.check_cidrs(v, "outbound_cidr_allowlist"))
]
"""``outbound_cidr_allowlist``: IPv4 networks (None: no CIDR list)."""
InboundCidrs = Annotated[
    list[str] | None, AfterValidator(lambda v: None if v is None else policy.check_cidrs(v, "inbound_cidr_allowlist"))
]
"""``inbound_cidr_allowlist``: IPv4 networks that may use the tunnels (None: anybody)."""
Domains = Annotated[list[str] | None, AfterValidator(lambda v: None if v is None else policy.check_domains(v))]
"""``outbound_domain_allowlist``: names, ``*.`` wildcards allowed (None: no name list)."""


class NetworkPolicy(WireModel):
    """``sb._experimental_set_outbound_network_policy``: the allowlists that replace a sandbox's (None: open)."""

    outbound_cidr_allowlist: OutboundCidrs = None
    outbound_domain_allowlist: Domains = None


class OutboundPolicyUpdate(WireModel):
    """``sb._experimental_update_outbound_policy``: the header replacements that replace all of a sandbox's."""

    outbound_headers: OutboundHeaders

    @model_validator(mode="after")
    def _total(self) -> OutboundPolicyUpdate:
        if sum(len(r.headers) for r in self.outbound_headers) > MAX_HEADERS:
            raise ValueError(f"Outbound policy cannot have more than {MAX_HEADERS} header replacements")
        return self


class ConnectTokenRequest(WireModel):
    """``sb.create_connect_token``: a token for the authenticating proxy in front of ``port``."""

    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    user_metadata: Annotated[str, Field(max_length=8192)] = ""
    """Passed to the sandbox's server as ``X-Verified-User-Data`` with every request made with the token."""

    @field_validator("user_metadata")
    @classmethod
    def _header_safe(cls, v: str) -> str:
        if any(c in v for c in "\r\n\x00"):
            raise ValueError("user_metadata must not contain line breaks or NUL (it travels as an HTTP header)")
        return v


class ReadinessProbe(WireModel):
    """``Sandbox.create(readiness_probe=Probe...)``: a TCP port on the sandbox's loopback, or a command."""

    tcp_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    exec_argv: list[str] | None = None
    interval_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 100

    @field_validator("exec_argv")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an exec readiness probe needs a command")
        return None if v is None else check_argv(v, "readiness probe command")

    @model_validator(mode="after")
    def _one_kind(self) -> ReadinessProbe:
        if (self.tcp_port is None) == (self.exec_argv is None):
            raise ValueError("a readiness probe has either tcp_port or exec_argv")
        return self


Runtime = Literal["runc", "gvisor"]
"""What a sandbox runs under (decision 0069)."""
RUNTIMES: tuple[str, ...] = ("runc", "gvisor")


class CreateSandbox(WireModel):
    """``Sandbox.create``."""

    app_id: str
    args: list[str] = []
    image: ImageRef = ImageRef()
    name: str | None = None
    tags: dict[str, str] = {}
    env: EnvDict = {}
    secret_env: EnvDict = {}
    secret_ids: Annotated[list[str], Field(max_length=100)] = []
    """Named secrets (``st-…``), resolved by the daemon; their values never cross the API."""
    timeout: Annotated[int, Field(ge=1, le=MAX_TIMEOUT)] = 300
    idle_timeout: Annotated[int, Field(ge=1, le=MAX_TIMEOUT)] | None = None
    workdir: Workdir = None
    gpu: Annotated[str, Field(max_length=64)] | None = None
    cpu: Annotated[float, Field(gt=0, le=1024)] | None = None
    cpu_limit: Annotated[float, Field(gt=0, le=1024)] | None = None
    memory: Annotated[int, Field(ge=6, le=1 << 22)] | None = None
    memory_limit: Annotated[int, Field(ge=6, le=1 << 22)] | None = None
    block_network: bool = False
    outbound_cidr_allowlist: OutboundCidrs = None
    outbound_domain_allowlist: Domains = None
    inbound_cidr_allowlist: InboundCidrs = None
    outbound_headers: OutboundHeaders | None = None
    """``_experimental_outbound_policy``: headers set on its outbound HTTPS requests outside the sandbox."""
    node_labels: Annotated[dict[str, str], Field(max_length=16)] | None = None
    """In a cluster: land on a node that has all these labels (``experimental_options={"node_labels": "k=v"}``)."""
    encrypted_ports: list[int] = []
    h2_ports: list[int] = []
    unencrypted_ports: list[int] = []
    volumes: Annotated[list[VolumeMount], Field(max_length=64)] = []
    readiness_probe: ReadinessProbe | None = None
    pty: bool = False
    """Run the entrypoint on a pseudo-terminal (its stderr then arrives merged into stdout)."""
    verbose: bool = False
    """Record every exec and file operation in the sandbox's logs (source ``system``)."""
    runtime: Runtime | None = None
    """``runc`` (a container) or ``gvisor`` (runsc: gVisor's kernel between the sandbox and the host); None: the
    daemon's default (``shoal serve --default-runtime``)."""
    sidecar_of: str | None = None
    """A sidecar's sandbox (set by the daemon for ``sb._experimental_sidecars.create``, refused from clients)."""
    sidecar_name: str | None = None
    """A sidecar's name: its sandbox reaches it by it (``http://<name>:port``)."""
    enable_snapshot: bool = False
    """``_experimental_enable_snapshot``: the sandbox will have memory snapshots taken, which need gVisor (it runs
    under gVisor when ``runtime`` is not given and the daemon has it)."""
    persistent: bool = False
    """``_experimental_persistent``: a sandbox that runs as a sequence of sessions, each starting from the files
    the last one left (pause/resume); ``timeout`` and ``idle_timeout`` are the daemon's per session."""
    persistent_of: str | None = None
    """A persistent sandbox's session: its ``ps-…`` id (set by the daemon, refused from clients)."""

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        return check_argv(v, "entrypoint")

    @model_validator(mode="after")
    def _network(self) -> CreateSandbox:
        policy.check_ports(self.encrypted_ports, self.h2_ports, self.unencrypted_ports)
        if self.block_network and (self.encrypted_ports or self.h2_ports or self.unencrypted_ports):
            raise ValueError("Cannot specify open ports when `block_network` is enabled")
        allowlists = (self.outbound_cidr_allowlist, self.outbound_domain_allowlist, self.inbound_cidr_allowlist)
        if self.block_network and any(a is not None for a in allowlists):
            raise ValueError("Cannot specify network allowlists when `block_network` is enabled")
        if self.outbound_headers is not None:
            if self.block_network:
                raise ValueError("`_experimental_outbound_policy` cannot be used when `block_network` is enabled")
            if self.outbound_domain_allowlist:
                raise ValueError("`_experimental_outbound_policy` cannot be used with `outbound_domain_allowlist`")
            if sum(len(r.headers) for r in self.outbound_headers) > MAX_HEADERS:
                raise ValueError(f"Outbound policy cannot have more than {MAX_HEADERS} header replacements")
        return self

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return str(gpu_request.parse(v))
        except Error as exc:
            raise ValueError(str(exc)) from None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return check_sandbox_name(v)

    @model_validator(mode="after")
    def _limits(self) -> CreateSandbox:
        if self.cpu is not None and self.cpu_limit is not None and self.cpu_limit < self.cpu:
            raise ValueError(f"cpu limit ({self.cpu_limit}) is below the request ({self.cpu})")
        if self.memory is not None and self.memory_limit is not None and self.memory_limit < self.memory:
            raise ValueError(f"memory limit ({self.memory_limit} MiB) is below the request ({self.memory} MiB)")
        return self


TerminalSide = Annotated[int, Field(ge=1, le=10000)]
INTERACTIVE_SHELL = ("/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi")
"""What a terminal into a sandbox runs unless told otherwise (``shoal sandbox shell``, the dashboard): bash where
the image has it, else sh."""


class TerminalSize(WireModel):
    """``POST .../execs/{exec_id}/resize``: a process's terminal is now this big (it gets SIGWINCH)."""

    rows: TerminalSide
    cols: TerminalSide


class ExecRequest(WireModel):
    """``sb.exec``."""

    exec_id: str | None = None
    args: Annotated[list[str], Field(min_length=1)]
    workdir: Workdir = None
    env: EnvDict = {}
    secret_env: EnvDict = {}
    secret_ids: Annotated[list[str], Field(max_length=100)] = []
    timeout: Annotated[int, Field(ge=1, le=MAX_TIMEOUT)] | None = None
    stdout: Literal["pipe", "devnull"] = "pipe"
    stderr: Literal["pipe", "devnull"] = "pipe"
    pty: bool = False
    pty_size: tuple[TerminalSide, TerminalSide] | None = None
    """With ``pty``: the terminal's (rows, columns) at the start (default 24x80); ``.../resize`` changes it."""

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        return check_argv(v)


class TagsUpdate(WireModel):
    """``sb.set_tags``."""

    tags: dict[str, str]


class Result(BaseModel):
    """How a sandbox ended (Modal's GenericResult)."""

    status: Literal["success", "failure", "terminated", "timeout", "init_failure", "internal_failure"]
    """``internal_failure``: shoal lost it, not its code (its cluster node died); ``exitcode`` says 137."""
    exitcode: int | None = None
    message: str = ""


class PersistentInfo(BaseModel):
    """What a persistent sandbox adds to its ``SandboxInfo``."""

    persistent_id: str
    session_id: str | None
    """The running session; None while paused (the next call that needs one starts it)."""
    sessions: int
    """How many sessions it has had."""
    exit_image: str | None = None
    """The files the next session starts from (the last session's exit snapshot)."""


class SandboxInfo(BaseModel):
    """A sandbox as the API shows it (never its secrets)."""

    sandbox_id: str
    app_id: str
    name: str | None
    tags: dict[str, str]
    state: SandboxState
    created_at_us: int
    image_id: str
    timeout: int
    idle_timeout: int | None
    result: Result | None
    returncode: int | None
    runtime: str = "runc"
    """What it runs under: ``runc`` or ``gvisor``."""
    persistent: PersistentInfo | None = None
    """Set for a persistent sandbox (under its object id)."""
    node: str | None = None
    """The cluster node it runs on (``shoal serve --ray``); None outside a cluster."""


class ExecInfo(BaseModel):
    """A process as the API shows it."""

    exec_id: str
    args: list[str]
    state: str
    returncode: int | None
    pid: int | None = None


class WaitResult(BaseModel):
    """Answer of a long-poll wait."""

    done: bool
    returncode: int | None = None


class SandboxList(BaseModel):
    """``Sandbox.list``."""

    sandboxes: list[SandboxInfo]


class ExecList(BaseModel):
    """The processes of a sandbox."""

    execs: list[ExecInfo]


class Readiness(BaseModel):
    """``sb.wait_until_ready``: whether the probe succeeded within the wait."""

    ready: bool


class LogEntry(BaseModel):
    """A line of ``sb.logs``: the entrypoint's output or a lifecycle event."""

    timestamp_us: int
    source: str
    message: str
    sandbox_id: str | None = None
    """Whose line it is (``app.logs``, which merges the app's sandboxes)."""


class LogEntries(BaseModel):
    """``sb.logs.fetch``."""

    entries: list[LogEntry]


class ConnectCredentials(BaseModel):
    """``sb.create_connect_token``: the proxy's URL and the token to show it."""

    url: str
    token: str


class TunnelData(BaseModel):
    """One tunnel (Modal's TunnelData)."""

    container_port: int
    host: str
    port: int
    unencrypted_host: str
    unencrypted_port: int


class TunnelList(BaseModel):
    """``sb.tunnels``."""

    tunnels: list[TunnelData]


class SandboxName(WireModel):
    """``sb._experimental_set_name``."""

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        checked = check_sandbox_name(v)
        assert checked is not None
        return checked


class Tags(BaseModel):
    """``sb.get_tags`` / ``sb.set_tags``."""

    tags: dict[str, str]


class PercentileStats(BaseModel):
    """One measure's distribution over a sandbox's usage samples: its unit and (percentile, value) pairs."""

    unit: str
    percentiles: list[tuple[float, float]]


class SandboxStats(BaseModel):
    """``sb._experimental_stats()``: what a sandbox used over [since, until) (microseconds since the epoch)."""

    since_us: int
    until_us: int
    duration_seconds: float
    """How long the sandbox ran within the range."""
    percentile_stats: dict[str, PercentileStats]
    """``"CPU Usage (cores)"`` and ``"Memory Usage (GiB)"``; missing when no sample was taken in the range."""
    samples: int
    billed_cpu_core_seconds: float
    """Per sample, the greater of the cores used and the cores requested, times the seconds it stands for."""
    billed_memory_gib_seconds: float


class UsageSample(BaseModel):
    """A sandbox's latest usage sample."""

    at_us: int
    cpu_cores: float
    """Cores used on average since the sample before."""
    memory_bytes: int


class SandboxUsage(BaseModel):
    """``GET /v1/usage``: the latest sample of each running sandbox, by id."""

    usage: dict[str, UsageSample]


class StdinOffset(BaseModel):
    """How much of a process's stdin the daemon has taken: the offset the next write starts at."""

    offset: int


SIDECAR_NAME_RE = r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z"
"""A sidecar's name: one DNS label, in lower case (its sandbox resolves it)."""


class CreateSidecar(WireModel):
    """``sb._experimental_sidecars.create(*args, name=..., image=...)``: a container beside the sandbox, with its own
    image, process, environment and outbound policy, that the sandbox reaches by ``name``."""

    name: str
    args: list[str] = []
    image: ImageRef = ImageRef()
    env: EnvDict = {}
    secret_env: EnvDict = {}
    secret_ids: Annotated[list[str], Field(max_length=100)] = []
    workdir: Workdir = None
    volumes: Annotated[list[VolumeMount], Field(max_length=64)] = []
    outbound_cidr_allowlist: OutboundCidrs = None
    outbound_domain_allowlist: Domains = None
    pty: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v == "main":
            raise ValueError("the name 'main' is reserved for the sandbox's main container")
        if not re.match(SIDECAR_NAME_RE, v):
            raise ValueError(
                f"invalid sidecar name {v!r}: its sandbox resolves it as a host name, so use 1-63 lower-case"
                " letters, digits and '-', not starting or ending with '-'"
            )
        return v


class SidecarInfo(BaseModel):
    """A sidecar as the API shows it."""

    sidecar_id: str
    """Its own sandbox id (``exec``, files, ``wait`` and ``terminate`` go through it)."""
    name: str
    sandbox_id: str
    """The sandbox it belongs to."""
    state: SandboxState
    result: Result | None
    returncode: int | None


class SidecarList(BaseModel):
    """A sandbox's sidecars, oldest first."""

    sidecars: list[SidecarInfo]

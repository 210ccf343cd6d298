"""Validated shapes of what the API accepts and returns.

Validation here is the first defence against bad input: argv and environment
strings reach C code in the agent, so NUL bytes, oversized argv, malformed
variable names and relative paths are refused with a message that says what
to change.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from shoal.exception import Error
from shoal.gpu import request as gpu_request
from shoal.images import recipe
from shoal.images.reference import RegistrySource
from shoal.network import policy
from shoal.volumes.models import VolumeMount

ARG_MAX_BYTES = 1 << 16
ENV_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
NAME_RE = re.compile(r"\A[A-Za-z0-9\-_.]{1,64}\Z")
MAX_TIMEOUT = 24 * 3600


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    return value


def check_argv(args: list[str], what: str = "command") -> list[str]:
    """Refuse argv that the kernel or the agent cannot carry."""
    total = 0
    for a in args:
        _no_nul(a, f"{what} arguments")
        total += len(a.encode()) + 1
    if total > ARG_MAX_BYTES:
        raise ValueError(f"{what} arguments total {total} bytes; the limit is {ARG_MAX_BYTES}")
    return args


def check_env(env: dict[str, str]) -> dict[str, str]:
    """Refuse environment variables that are not NAME=value strings."""
    for k, v in env.items():
        if not ENV_NAME_RE.match(k):
            raise ValueError(f"invalid environment variable name {k!r}: use letters, digits and _")
        _no_nul(v, f"environment variable {k}")
    return env


def check_abs_path(path: str | None, what: str) -> str | None:
    """Refuse relative paths and NUL bytes."""
    if path is None:
        return None
    _no_nul(path, what)
    if not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path (starting with '/'), got {path!r}")
    if len(path) > 4096:
        raise ValueError(f"{what} is longer than 4096 bytes")
    return path


EnvDict = Annotated[dict[str, str], AfterValidator(check_env)]
"""Environment variables: NAME=value strings the agent can carry."""
Workdir = Annotated[str | None, AfterValidator(lambda v: check_abs_path(v, "workdir"))]
"""An absolute working directory."""
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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageRef(_Model):
    """Which image a sandbox runs: the base image for a Python version, an image id, a registry image, or an
    empty one (``scratch``)."""

    kind: Literal["debian_slim", "id", "registry", "scratch"] = "debian_slim"
    python_version: str | None = None
    image_id: str | None = None
    registry: RegistrySource | None = None
    """``Image.from_registry``: the reference and its credentials (``shoal.images.registry``)."""
    steps: Annotated[list[recipe.Step], Field(max_length=recipe.MAX_STEPS)] = []
    """Build steps applied on the base (``shoal.images.recipe``); each is a cached layer or a config change."""
    force_build: bool = False
    """Rebuild every step (the base itself is bootstrapped once per machine)."""


class AppLookup(_Model):
    """``App.lookup``."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    create_if_missing: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("app names may use letters, digits, '-', '_' and '.', at most 64 characters")
        return v


class AppCreate(_Model):
    """An ephemeral app (``with app.run():``)."""

    name: str | None = None


class NetworkPolicy(_Model):
    """``sb._experimental_set_outbound_network_policy``: the allowlists that replace a sandbox's (None: open)."""

    outbound_cidr_allowlist: OutboundCidrs = None
    outbound_domain_allowlist: Domains = None


class ConnectTokenRequest(_Model):
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


class ReadinessProbe(_Model):
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


class CreateSandbox(_Model):
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
    encrypted_ports: list[int] = []
    h2_ports: list[int] = []
    unencrypted_ports: list[int] = []
    volumes: Annotated[list[VolumeMount], Field(max_length=64)] = []
    readiness_probe: ReadinessProbe | None = None
    pty: bool = False
    """Run the entrypoint on a pseudo-terminal (its stderr then arrives merged into stdout)."""
    verbose: bool = False
    """Record every exec and file operation in the sandbox's logs (source ``system``)."""

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
        if v is not None and not NAME_RE.match(v):
            raise ValueError(
                f"invalid sandbox name {v!r}: use letters, digits, '-', '_' and '.', at most 64 characters"
            )
        return v

    @model_validator(mode="after")
    def _limits(self) -> CreateSandbox:
        if self.cpu is not None and self.cpu_limit is not None and self.cpu_limit < self.cpu:
            raise ValueError(f"cpu limit ({self.cpu_limit}) is below the request ({self.cpu})")
        if self.memory is not None and self.memory_limit is not None and self.memory_limit < self.memory:
            raise ValueError(f"memory limit ({self.memory_limit} MiB) is below the request ({self.memory} MiB)")
        return self


class ExecRequest(_Model):
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

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        return check_argv(v)


class TagsUpdate(_Model):
    """``sb.set_tags``."""

    tags: dict[str, str]


class ImportRootfs(_Model):
    """Import a root filesystem directory on the daemon's host as an image."""

    path: str
    env: dict[str, str] = {}
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    workdir: str | None = None


class Result(BaseModel):
    """How a sandbox ended (Modal's GenericResult)."""

    status: Literal["success", "failure", "terminated", "timeout", "init_failure"]
    exitcode: int | None = None
    message: str = ""


class SandboxInfo(BaseModel):
    """A sandbox as the API shows it (never its secrets)."""

    sandbox_id: str
    app_id: str
    name: str | None
    tags: dict[str, str]
    state: str
    created_at_us: int
    image_id: str
    timeout: int
    idle_timeout: int | None
    result: Result | None
    returncode: int | None


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

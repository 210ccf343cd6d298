"""Between Modal's messages and shoal's: sandbox definitions, results, ids and errors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from grpclib import GRPCError, Status
from modal_proto import api_pb2
from pydantic import ValidationError

from shoal import exception as exc
from shoal.wire.base import validation_message
from shoal.wire.cluster import parse_labels
from shoal.wire.images import ImageRef
from shoal.wire.sandboxes import CreateSandbox, CreateSidecar, Result

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300
"""Modal's sandbox lifetime when ``timeout_secs`` is 0 (unset)."""

_STATUS = {
    "success": api_pb2.GenericResult.GENERIC_STATUS_SUCCESS,
    "failure": api_pb2.GenericResult.GENERIC_STATUS_FAILURE,
    "terminated": api_pb2.GenericResult.GENERIC_STATUS_TERMINATED,
    "timeout": api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT,
    "init_failure": api_pb2.GenericResult.GENERIC_STATUS_INIT_FAILURE,
    "internal_failure": api_pb2.GenericResult.GENERIC_STATUS_INTERNAL_FAILURE,
}

_GRPC_STATUS: list[tuple[type[exc.Error], Status]] = [
    (exc.ConflictError, Status.FAILED_PRECONDITION),
    (exc.InvalidError, Status.INVALID_ARGUMENT),
    (exc.NotFoundError, Status.NOT_FOUND),
    (exc.AlreadyExistsError, Status.ALREADY_EXISTS),
    (exc.PermissionDeniedError, Status.PERMISSION_DENIED),
    (exc.AuthError, Status.UNAUTHENTICATED),
    (exc.ResourceExhaustedError, Status.RESOURCE_EXHAUSTED),
    (exc.UnimplementedError, Status.UNIMPLEMENTED),
]
"""shoal's errors as the statuses the client turns back into the same Modal classes.  Anything else is
FAILED_PRECONDITION (a ConflictError with shoal's message): never a status the client retries without end."""


def task_id(sandbox_id: str) -> str:
    """The task id the client addresses a sandbox's router calls with (``ta-`` and the sandbox id's suffix)."""
    return "ta-" + sandbox_id.removeprefix("sb-")


def sandbox_of_task(task: str) -> str:
    """The sandbox id behind a task id (``task_id``'s inverse)."""
    if not task.startswith("ta-"):
        raise GRPCError(Status.NOT_FOUND, f"no task {task!r} on this shoal gateway")
    return "sb-" + task.removeprefix("ta-")


def generic_result(result: Result | None) -> api_pb2.GenericResult:
    """A sandbox's end as Modal's GenericResult (unset status while it runs)."""
    if result is None:
        return api_pb2.GenericResult()
    return api_pb2.GenericResult(
        status=_STATUS[result.status], exitcode=result.exitcode or 0, exception=result.message or ""
    )


def create_request(
    app_id: str, definition: Any, secret_sources: Any, tags: Any, anonymous: dict[str, dict[str, str]]
) -> CreateSandbox:
    """``SandboxCreateV2``/``SandboxCreate``'s definition as shoal's create request (unsupported fields refused)."""
    d = definition
    refuse = [
        name
        for name, present in (
            ("nfs_mounts", bool(d.nfs_mounts)),
            ("cloud_bucket_mounts", bool(d.cloud_bucket_mounts)),
            ("outbound_policy (routes)", d.HasField("outbound_policy")),
        )
        if present
    ]
    if refuse:
        raise exc.UnimplementedError(f"shoal's gateway does not serve {', '.join(refuse)} yet (decision 0075)")
    options = {**dict(d.experimental_options), **dict(d.experimental_options_v2)}
    unknown = sorted(set(options) - {"node_labels"})
    if unknown:  # ignoring one could loosen what it was meant to restrict
        raise exc.InvalidError(f"shoal knows one experimental option, node_labels; not {', '.join(unknown)}")
    secret_env: dict[str, str] = {}
    secret_ids: list[str] = []
    for source in secret_sources:
        if source.secret_id:
            secret_ids.append(source.secret_id)
        secret_env.update(dict(source.env.contents))
    for sid in d.secret_ids:
        if sid in anonymous:
            secret_env.update(anonymous[sid])  # a V1 create's env (``SecretGetOrCreate``, owned by the app)
        elif sid not in secret_ids:
            secret_ids.append(sid)
    gpu = d.resources.gpu_config
    gpu_text = None
    if gpu.count:
        kind = gpu.gpu_type.lower() or "any"
        gpu_text = kind if gpu.count == 1 else f"{kind}:{gpu.count}"
    access = d.network_access
    allow_cidrs, allow_domains = (
        allowlists(access) if access.network_access_type == api_pb2.NetworkAccess.ALLOWLIST else (None, None)
    )
    ports: dict[str, list[int]] = {"encrypted_ports": [], "unencrypted_ports": [], "h2_ports": []}
    for spec in d.open_ports.ports:
        if spec.unencrypted:
            ports["unencrypted_ports"].append(spec.port)
        elif spec.tunnel_type == api_pb2.TUNNEL_TYPE_H2:
            ports["h2_ports"].append(spec.port)
        else:
            ports["encrypted_ports"].append(spec.port)
    fields: dict[str, Any] = {
        **ports,
        "volumes": volume_list(d.volume_mounts),
        "app_id": app_id,
        "args": list(d.entrypoint_args),
        "image": ImageRef(kind="id", image_id=d.image_id),
        "name": d.name or None,
        "tags": {t.tag_name: t.tag_value for t in tags},
        "secret_env": secret_env,
        "secret_ids": secret_ids,
        "timeout": d.timeout_secs or DEFAULT_TIMEOUT,
        "idle_timeout": d.idle_timeout_secs or None,
        "workdir": d.workdir or None,
        "cpu": d.resources.milli_cpu / 1000 if d.resources.milli_cpu else None,
        "cpu_limit": d.resources.milli_cpu_max / 1000 if d.resources.milli_cpu_max else None,
        "memory": d.resources.memory_mb or None,
        "memory_limit": d.resources.memory_mb_max or None,
        "block_network": d.block_network or access.network_access_type == api_pb2.NetworkAccess.BLOCKED,
        "outbound_cidr_allowlist": allow_cidrs,
        "outbound_domain_allowlist": allow_domains,
        "gpu": gpu_text,
        "pty": d.HasField("pty_info") and d.pty_info.enabled,
        "readiness_probe": _probe(d.readiness_probe) if d.HasField("readiness_probe") else None,
        "verbose": d.verbose,
        "enable_snapshot": d.enable_snapshot,
        "node_labels": _labels(str(options["node_labels"])) if "node_labels" in options else None,
        "outbound_headers": (
            outbound_headers(d.experimental_outbound_policy) if d.HasField("experimental_outbound_policy") else None
        ),
    }
    if d.runtime:
        fields["runtime"] = d.runtime
    return CreateSandbox.model_validate(fields)


def _labels(text: str) -> dict[str, str]:
    try:
        return parse_labels(text)
    except ValueError as error:
        raise exc.InvalidError(f"experimental_options['node_labels']: {error}") from None


def outbound_headers(policy: Any) -> list[dict[str, Any]]:
    """Modal's ``ExperimentalOutboundPolicy`` (``_experimental_outbound_policy``) as shoal's header replacements."""
    return [
        {"domain": r.domain, "headers": dict(r.headers), "secret_id": r.secret_id or None}
        for r in policy.header_replacements
    ]


async def create_sidecar(
    mgr: Any,
    sandbox_id: str,
    name: str,
    image_id: str,
    args: list[str],
    env: dict[str, str],
    secret_sources: Any,
    secret_ids: list[str],
    workdir: str,
    volume_mounts: Any,
    network_access: Any,
    pty: bool,
) -> Any:
    """``sb._experimental_sidecars.create``: shoal's sidecar (its own sandbox; its id is the client's container id)."""
    secret_env: dict[str, str] = {}
    for source in secret_sources:
        if source.secret_id:
            secret_ids.append(source.secret_id)
        secret_env.update(dict(source.env.contents))
    cidrs, domains = (
        allowlists(network_access)
        if network_access.network_access_type == api_pb2.NetworkAccess.ALLOWLIST
        else (None, None)
    )
    if network_access.network_access_type == api_pb2.NetworkAccess.BLOCKED:
        raise exc.InvalidError("a sidecar reaches its sandbox over the network: it cannot have block_network")
    body = CreateSidecar.model_validate(
        {
            "name": name,
            "args": args,
            "image": {"kind": "id", "image_id": image_id},
            "env": env,
            "secret_env": secret_env,
            "secret_ids": secret_ids,
            "workdir": workdir or None,
            "volumes": volume_list(volume_mounts),
            "outbound_cidr_allowlist": cidrs,
            "outbound_domain_allowlist": domains,
            "pty": pty,
        }
    )
    return await mgr.sidecars.create(sandbox_id, body)


def volume_list(mounts: Any) -> list[dict[str, Any]]:
    """``VolumeMount`` messages as shoal's volume mounts."""
    return [
        {"path": m.mount_path, "volume_id": m.volume_id, "read_only": m.read_only, "sub_path": m.sub_path or None}
        for m in mounts
    ]


def allowlists(access: Any) -> tuple[list[str] | None, list[str] | None]:
    """An ALLOWLIST ``NetworkAccess`` as shoal's (CIDRs, domains).  The client sends an empty list for the one it
    was not given: only domains → (None, domains); neither → ([], None), nothing allowed."""
    cidrs, domains = list(access.allowed_cidrs), list(access.allowed_domains)
    return (cidrs if cidrs or not domains else None), (domains or None)


def _probe(probe: Any) -> dict[str, Any]:
    """A ``Probe`` as shoal's readiness probe."""
    interval = {"interval_ms": probe.interval_ms} if probe.interval_ms else {}
    if probe.HasField("exec_command"):
        return {"exec_argv": list(probe.exec_command.argv), **interval}
    return {"tcp_port": probe.tcp_port, **interval}


F = TypeVar("F", bound=Callable[..., Awaitable[None]])


def grpc_status(error: exc.Error) -> Status:
    """The gRPC status the client turns back into ``error``'s Modal class."""
    return next((s for cls, s in _GRPC_STATUS if isinstance(error, cls)), Status.FAILED_PRECONDITION)


def grpc_errors(func: F) -> F:
    """Turn shoal's errors raised by a handler into the gRPC statuses the client maps to the same Modal errors."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            await func(*args, **kwargs)
        except GRPCError:
            raise
        except ValidationError as e:
            raise GRPCError(Status.INVALID_ARGUMENT, validation_message(e)) from None
        except exc.Error as e:
            raise GRPCError(grpc_status(e), str(e) or type(e).__name__) from None
        except Exception as e:
            log.exception("gateway: %s failed", func.__name__)
            raise GRPCError(Status.FAILED_PRECONDITION, f"shoal: {type(e).__name__}: {e}") from None

    return wrapper  # type: ignore[return-value]

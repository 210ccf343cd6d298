"""``Sandbox``: an isolated container created at run time, with Modal's API."""

from __future__ import annotations

import asyncio
import builtins
import datetime
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import PurePosixPath
from typing import Any, Literal, cast

from shoal.exception import (
    ClientClosed,
    DeprecationError,
    InvalidError,
    NotFoundError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from shoal.exception import TimeoutError as NotReadyError
from shoal.sdk import _snapshots, file_io
from shoal.sdk._sandbox_args import (
    check_args,
    check_runtime,
    check_workdir,
    deprecated_create_args,
    merge_env,
    node_labels_option,
    not_supported,
    ports,
    refuse_unsupported,
    resources,
    str_list,
)
from shoal.sdk._sandbox_network import SandboxNetworkMethods
from shoal.sdk._sync import live_function, live_generator, live_method, live_method_generator
from shoal.sdk.app import App
from shoal.sdk.dashboard import DashboardLink
from shoal.sdk.filesystem import SandboxFilesystem
from shoal.sdk.image import Image
from shoal.sdk.logs import SandboxLogs
from shoal.sdk.outbound_policy import OutboundPolicy
from shoal.sdk.probe import Probe
from shoal.sdk.process import ContainerProcess
from shoal.sdk.secret import Secret, secret_ids
from shoal.sdk.sidecars import SidecarManager
from shoal.sdk.snapshot import SandboxSnapshot
from shoal.sdk.streams import StreamReader, StreamType, StreamWriter
from shoal.sdk.transport import Client, default_client
from shoal.sdk.tunnel import Tunnel, TunnelMap
from shoal.sdk.volume import mounts_body
from shoal.types import (
    FileWatchEvent,
    FileWatchEventType,
    SandboxStats,
    StatsPercentile,
    StatsPercentileDistribution,
)
from shoal.wire import gpu as gpu_request
from shoal.wire import routes, times
from shoal.wire.base import build, dump
from shoal.wire.images import ImageRef
from shoal.wire.sandboxes import CreateSandbox, ExecRequest, SandboxName, TagsUpdate
from shoal.wire.snapshots import RestoreRequest

PERSISTENT_ONLY = "`{}` requires a persistent Sandbox, created with `_experimental_persistent=True`."
"""Modal's words for pause and resume of a sandbox that is not persistent (every shoal sandbox)."""
_KEEP_NAME = object()
"""``_experimental_from_snapshot``'s default: the snapshotted sandbox's name."""

ENTRYPOINT_STDIN_LIMIT = 2 << 20
WAIT_SECONDS = 10
READY_POLL = 50.0
"""Seconds one readiness request may wait in the daemon."""


class Sandbox(SandboxNetworkMethods, DashboardLink):
    """An isolated container.

    Examples:
        app = shoal.App.lookup("sandbox-app", create_if_missing=True)
        sb = shoal.Sandbox.create(app=app)
        p = sb.exec("python", "-c", "print('Hello!')")
        print(p.stdout.read())
        sb.terminate()
    """

    def __init__(
        self, client: Client, sandbox_id: str, info: dict[str, Any] | None = None, *, started: bool = False
    ) -> None:
        """``started``: this handle started the sandbox, so no one else wrote to its stdin yet."""
        self._client = client
        self._id = sandbox_id
        self._info = info or {}
        self._returncode: int | None = None
        self._result: dict[str, Any] | None = None
        self._detached = False
        self._tunnels: dict[int, Tunnel] | None = None
        if info:
            self._absorb(info)
        base = routes.path("sandboxes", sandbox_id, "execs", "entrypoint")
        self._stdout: StreamReader[str] = StreamReader(client, f"{base}/output/1", 1, text=True, by_line=True)
        self._stderr: StreamReader[str] = StreamReader(client, f"{base}/output/2", 2, text=True, by_line=True)
        self._persistent: dict[str, Any] | None = self._info.get("persistent")
        # A persistent sandbox's stdin is its current session's, which starts anew with each session.
        self._stdin = StreamWriter(
            client,
            f"{base}/stdin",
            ENTRYPOINT_STDIN_LIMIT,
            offset=0 if started and self._persistent is None else None,
            ask_each_drain=self._persistent is not None,
        )

    def __repr__(self) -> str:
        return f"Sandbox({self._id})"

    def _absorb(self, info: dict[str, Any]) -> None:
        self._info = info
        if info.get("result"):
            self._result = info["result"]
            self._returncode = info.get("returncode")

    def _check_attached(self) -> None:
        if self._detached:
            raise ClientClosed("Unable to perform operation on a detached sandbox")

    @property
    def object_id(self) -> str:
        """The sandbox's id (``sb-…``)."""
        return self._id

    def _dashboard_page(self) -> str:
        return f"sandboxes/{self._id}"

    @property
    def client(self) -> Client:
        """The client this object reaches the daemon with (Modal's ``.client``): pass it as ``client=`` to
        other calls."""
        return self._client

    @property
    def returncode(self) -> int | None:
        """The return code once finished (124 timeout, 137 terminated), else None."""
        return self._returncode

    @property
    def stdout(self) -> StreamReader[str]:
        """The entrypoint's output, line by line."""
        self._check_attached()
        return self._stdout

    @property
    def stderr(self) -> StreamReader[str]:
        """The entrypoint's error output, line by line."""
        self._check_attached()
        return self._stderr

    @property
    def stdin(self) -> StreamWriter:
        """The entrypoint's standard input."""
        self._check_attached()
        return self._stdin

    # ------------------------------------------------------------------ create and find

    @live_function
    async def create(  # static: Sandbox.create(...)
        *args: str,
        app: App | None = None,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        image: Image | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Collection[Secret] | None = None,
        network_file_systems: dict[Any, Any] | None = None,
        timeout: int | None = 300,
        idle_timeout: int | None = None,
        workdir: str | None = None,
        gpu: str | None = None,
        cloud: str | None = None,
        region: str | Sequence[str] | None = None,
        cpu: float | tuple[float, float] | None = None,
        memory: int | tuple[int, int] | None = None,
        runtime: str | None = None,
        block_network: bool = False,
        outbound_cidr_allowlist: Sequence[str] | None = None,
        outbound_domain_allowlist: Sequence[str] | None = None,
        _experimental_outbound_policy: Any = None,
        inbound_cidr_allowlist: Sequence[str] | None = None,
        volumes: dict[Any, Any] | None = None,
        pty: bool = False,
        encrypted_ports: Sequence[int] = (),
        h2_ports: Sequence[int] = (),
        unencrypted_ports: Sequence[int] = (),
        custom_domain: str | None = None,
        proxy: Any = None,
        include_oidc_identity_token: bool = False,
        readiness_probe: Any = None,
        verbose: bool = False,
        experimental_options: dict[str, Any] | None = None,
        _experimental_enable_snapshot: bool = False,
        _experimental_persistent: bool = False,
        restrict_modal_access: bool = False,
        client: Any = None,
        environment_name: str | None = None,
        pty_info: Any = None,
        cidr_allowlist: Sequence[str] | None = None,
    ) -> Sandbox:
        """Create a sandbox; with no command it stays up until ``timeout`` (create-then-exec)."""
        argv = check_args(args, "Sandbox.create")
        if app is None:
            raise InvalidError("Sandboxes require an App: pass app=shoal.App.lookup('my-app', create_if_missing=True)")
        if not isinstance(app, App):
            raise InvalidError(f"app must be a shoal.App, got {type(app).__name__}")
        if app.app_id is None:
            raise ValueError(
                "App has not been initialized yet. Use App.lookup(...) or run the app (`with app.run():`)"
                " before creating sandboxes in it."
            )
        check_workdir(workdir)
        if _experimental_persistent:
            # Each session has the daemon's lifetime and idle limits (an hour, five minutes), as in modal 1.6.
            if timeout is not None or idle_timeout is not None:
                raise InvalidError("Persistent Sandboxes require `timeout=None` and don't support `idle_timeout`.")
            if name is not None:
                raise InvalidError("Named persistent Sandboxes are not supported yet.")
            if _experimental_enable_snapshot:
                raise InvalidError("Memory snapshots are not supported by persistent Sandboxes.")
        elif timeout is None:
            raise InvalidError("`timeout=None` is only supported for experimental persistent Sandboxes.")
        if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)):
            raise InvalidError(f"timeout must be an integer number of seconds, got {timeout!r}")
        if idle_timeout is not None and (not isinstance(idle_timeout, int) or isinstance(idle_timeout, bool)):
            raise InvalidError(f"idle_timeout must be an integer number of seconds, got {idle_timeout!r}")
        pty, outbound_cidr_allowlist = deprecated_create_args(
            environment_name, pty_info, cidr_allowlist, pty, outbound_cidr_allowlist
        )
        if block_network and (encrypted_ports or h2_ports or unencrypted_ports):
            raise InvalidError("Cannot specify open ports when `block_network` is enabled")
        if block_network and (outbound_cidr_allowlist or outbound_domain_allowlist or inbound_cidr_allowlist):
            raise InvalidError("Cannot specify network allowlists when `block_network` is enabled")
        gpu_str = None if gpu is None else str(gpu_request.parse(gpu))  # InvalidError for lists and bad strings
        node_labels = node_labels_option(experimental_options)
        runtime_kind = check_runtime(runtime)
        outbound_headers = None
        if _experimental_outbound_policy is not None:
            if not isinstance(_experimental_outbound_policy, OutboundPolicy):
                raise InvalidError(
                    "_experimental_outbound_policy must be a shoal.experimental.OutboundPolicy, got"
                    f" {type(_experimental_outbound_policy).__name__}"
                )
            if block_network:
                raise InvalidError("`_experimental_outbound_policy` cannot be used when `block_network` is enabled")
            if outbound_domain_allowlist:
                raise InvalidError("`_experimental_outbound_policy` cannot be used with `outbound_domain_allowlist`")
            outbound_headers = await _experimental_outbound_policy._body()
        refuse_unsupported(
            network_file_systems=bool(network_file_systems),
            cloud=cloud is not None,
            region=region is not None,
            custom_domain=custom_domain is not None,
            proxy=proxy is not None,
            include_oidc_identity_token=include_oidc_identity_token,
        )
        if readiness_probe is not None and not isinstance(readiness_probe, Probe):
            raise InvalidError(
                "readiness_probe must be a shoal.Probe: Probe.with_tcp(port) or Probe.with_exec(*argv), got"
                f" {type(readiness_probe).__name__}"
            )
        cpu_req, cpu_lim = resources(cpu, "cpu")
        mem_req, mem_lim = resources(memory, "memory")
        plain_env, secret_env = merge_env(env, secrets)
        mounts = await mounts_body(volumes)  # InvalidError for anything but {"/path": Volume}
        named_secrets = await secret_ids(secrets)
        c = default_client()
        img = image or Image.debian_slim()
        image_id = await img._resolve(c)
        request = build(
            CreateSandbox,
            app_id=app.app_id,
            args=argv,
            image=ImageRef(kind="id", image_id=image_id),
            name=name,
            tags=dict(tags or {}),
            env=plain_env,
            secret_env=secret_env,
            secret_ids=named_secrets,
            volumes=mounts,
            timeout=300 if timeout is None else timeout,  # (a persistent sandbox's sessions have their own)
            idle_timeout=idle_timeout,
            workdir=workdir,
            cpu=cpu_req,
            cpu_limit=cpu_lim,
            memory=None if mem_req is None else int(mem_req),
            memory_limit=None if mem_lim is None else int(mem_lim),
            block_network=block_network,
            gpu=gpu_str,
            outbound_cidr_allowlist=str_list(outbound_cidr_allowlist, "outbound_cidr_allowlist"),
            outbound_domain_allowlist=str_list(outbound_domain_allowlist, "outbound_domain_allowlist"),
            inbound_cidr_allowlist=str_list(inbound_cidr_allowlist, "inbound_cidr_allowlist"),
            outbound_headers=outbound_headers,
            node_labels=node_labels,
            encrypted_ports=ports(encrypted_ports, "encrypted_ports"),
            h2_ports=ports(h2_ports, "h2_ports"),
            unencrypted_ports=ports(unencrypted_ports, "unencrypted_ports"),
            readiness_probe=None if readiness_probe is None else readiness_probe._body(),
            pty=bool(pty),
            verbose=bool(verbose),
            runtime=runtime_kind,
            enable_snapshot=bool(_experimental_enable_snapshot),
            persistent=bool(_experimental_persistent),
        )
        body = request.model_dump(mode="json")
        try:
            info = await c.request("POST", routes.path("sandboxes"), json_body=body, idempotent=False)
        except NotFoundError as exc:
            # An image id this process remembered was removed (`shoal image rm` / `prune`): resolve it afresh, once.
            if image_id not in str(exc) or not img._forget(c):
                raise
            body["image"] = {"kind": "id", "image_id": await img._resolve(c)}
            info = await c.request("POST", routes.path("sandboxes"), json_body=body, idempotent=False)
        return Sandbox(c, info["sandbox_id"], info, started=True)

    @live_function
    async def _experimental_from_snapshot(  # static
        snapshot: SandboxSnapshot, client: Any = None, *, name: str | object | None = _KEEP_NAME
    ) -> Sandbox:
        """A new sandbox from a memory snapshot: its processes carry on where they were, with their memory, open
        files and streams (``sb.stdout`` follows its entrypoint from the snapshot on).  ``name``: the snapshotted
        sandbox's by default, None for none, or a new one.  Restoring a snapshot twice gives two sandboxes."""
        if not isinstance(snapshot, SandboxSnapshot):
            raise TypeError(f"snapshot must be a SandboxSnapshot, got {type(snapshot).__name__}")
        if name is _KEEP_NAME:
            body: dict[str, Any] = {"keep_name": True}
        elif name is None or isinstance(name, str):
            body = dump(RestoreRequest, keep_name=False, name=name)  # InvalidError for a malformed name
        else:
            raise InvalidError(f"name must be a str or None, got {type(name).__name__}")
        c = default_client()
        info = await c.request(
            "POST", routes.path("memory_snapshots", snapshot.object_id, "restore"), json_body=body, idempotent=False
        )
        return Sandbox(c, info["sandbox_id"], info, started=True)

    @live_function
    async def from_id(sandbox_id: str, client: Any = None) -> Sandbox:  # static
        """A handle to an existing sandbox (running or finished)."""
        c = default_client()
        info = await c.request("GET", routes.path("sandboxes", sandbox_id))
        return Sandbox(c, sandbox_id, info)

    @live_function
    async def from_name(  # static
        app_name: str,
        name: str,
        *,
        environment_name: str | None = None,
        include_terminated: bool = False,
        client: Any = None,
    ) -> Sandbox:
        """The running sandbox called ``name`` in the app called ``app_name``; with ``include_terminated``, the
        most recent one that ended when none runs."""
        c = default_client()
        params = [("include_terminated", "1")] if include_terminated else []
        info = await c.request("GET", routes.path("apps", "by-name", app_name, "sandboxes", name), params=params)
        return Sandbox(c, info["sandbox_id"], info)

    @live_generator
    async def list(  # static
        *, app_id: str | None = None, tags: dict[str, str] | None = None, client: Any = None
    ) -> AsyncIterator[Sandbox]:
        """Running sandboxes, newest first (of one app, with at least ``tags``)."""
        c = default_client()
        params: list[tuple[str, str]] = []
        if app_id:
            params.append(("app_id", app_id))
        for k, v in (tags or {}).items():
            params.append(("tag", f"{k}={v}"))
        resp = await c.request("GET", routes.path("sandboxes"), params=params)
        for info in resp["sandboxes"]:
            yield Sandbox(c, info["sandbox_id"], info)

    # ------------------------------------------------------------------ processes

    async def _exec(
        self,
        *args: str,
        stdout: StreamType = StreamType.PIPE,
        stderr: StreamType = StreamType.PIPE,
        timeout: int | None = None,
        workdir: str | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Collection[Secret] | None = None,
        text: bool = True,
        bufsize: Literal[-1, 1] = -1,
        pty: bool = False,
        pty_info: Any = None,
        _pty_info: Any = None,
    ) -> ContainerProcess[Any]:
        self._check_attached()
        argv = check_args(args, "exec")
        if not argv:
            raise InvalidError("exec needs a command, e.g. sb.exec('ls', '-l')")
        check_workdir(workdir)
        if bufsize == 1 and not text:
            raise ValueError("line-buffering is only supported when text=True")
        if bufsize not in (-1, 1):
            raise InvalidError("bufsize must be -1 (chunks) or 1 (lines)")
        if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
            raise InvalidError(f"exec timeout must be a positive integer number of seconds, got {timeout!r}")
        for s in (stdout, stderr):
            if not isinstance(s, StreamType):
                raise InvalidError(f"stdout/stderr must be a shoal.StreamType, got {s!r}")
        if pty_info is not None or _pty_info is not None:
            warnings.warn("pty_info is deprecated (2025-06-01); use pty=True", DeprecationError, stacklevel=3)
            pty = True
        plain_env, secret_env = merge_env(env, secrets)
        exec_id = str(uuid.uuid4())
        request = build(
            ExecRequest,
            exec_id=exec_id,
            args=argv,
            workdir=workdir,
            env=plain_env,
            secret_env=secret_env,
            secret_ids=await secret_ids(secrets),
            timeout=timeout,
            stdout="devnull" if stdout == StreamType.DEVNULL else "pipe",
            stderr="devnull" if stderr == StreamType.DEVNULL else "pipe",
            pty=pty,
        )
        body = request.model_dump(mode="json", exclude_defaults=True)
        # exec is idempotent on exec_id, so a lost connection can be retried.
        await self._client.request("POST", routes.path("sandboxes", self._id, "execs"), json_body=body)
        return ContainerProcess(
            self._client,
            self._id,
            exec_id,
            text=text,
            by_line=bufsize == 1,
            stdout=stdout,
            stderr=stderr,
        )

    exec = live_method(_exec)
    """Run a command in the sandbox; returns at once with a ``ContainerProcess``.

    Examples:
        p = sb.exec("bash", "-c", "echo hi; exit 3")
        p.wait()            # 3
        p.stdout.read()     # "hi\\n"
    """

    # ------------------------------------------------------------------ files

    @property
    def filesystem(self) -> SandboxFilesystem:
        """The sandbox's files (Modal's ``sb.filesystem``): read, write, copy, list, stat, mkdir, remove, watch."""
        self._check_attached()
        return SandboxFilesystem(self._client, self._id)

    @property
    def logs(self) -> SandboxLogs:
        """The sandbox's logs (Modal's ``sb.logs``): ``fetch(since=...)`` and ``tail(n)`` of its entrypoint's
        output as timestamped lines, with lifecycle events as source ``system``; they outlive the sandbox."""
        return SandboxLogs(self._client, self._id)

    @property
    def open(self) -> file_io.FileOpener:
        """``sb.open(path, mode="r")`` → ``FileIO`` (Modal's alpha API; ``await sb.open.aio(...)`` in async code).

        Relative paths resolve against the sandbox's working directory.
        """
        self._check_attached()
        return file_io.FileOpener(self._client, self._id)

    @live_method
    async def ls(self, path: str) -> builtins.list[str]:
        """The names in a directory of the sandbox, sorted."""
        self._check_attached()
        return await file_io.ls(self._client, self._id, path)

    @live_method
    async def mkdir(self, path: str, parents: bool = False) -> None:
        """Create a directory in the sandbox (``parents=True``: missing parents too; an existing one is fine)."""
        self._check_attached()
        await file_io.mkdir(self._client, self._id, path, parents)

    @live_method
    async def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file, a symlink or an empty directory (``recursive=True``: a whole tree) in the sandbox."""
        self._check_attached()
        await file_io.rm(self._client, self._id, path, recursive)

    @live_method_generator
    def watch(
        self,
        path: str,
        filter: builtins.list[FileWatchEventType] | None = None,
        recursive: bool | None = None,
        timeout: int | None = None,
    ) -> AsyncIterator[FileWatchEvent]:
        """Changes under ``path`` in the sandbox as they happen (see ``SandboxFilesystem.watch``)."""
        self._check_attached()
        return file_io.watch(self._client, self._id, path, filter, recursive, timeout)

    # ------------------------------------------------------------------ lifecycle

    async def _wait_once(self, timeout: float) -> dict[str, Any]:
        info = await self._client.request(
            "GET", routes.path("sandboxes", self._id, "wait"), params={"timeout": str(timeout)}
        )
        self._absorb(info)
        return cast(dict[str, Any], info)

    @live_method
    async def wait(self, raise_on_termination: bool = True) -> None:
        """Wait for the sandbox to finish.

        Raises SandboxTimeoutError after its timeout (always) and
        SandboxTerminatedError after terminate() (unless ``raise_on_termination=False``).
        """
        while self._result is None:
            await self._wait_once(WAIT_SECONDS)
        status = self._result["status"]
        if status == "timeout":
            raise SandboxTimeoutError(self._result.get("message") or "Sandbox timed out")
        if status == "terminated" and raise_on_termination:
            raise SandboxTerminatedError(self._result.get("message") or "Sandbox terminated")

    @live_method
    async def hydrate(self, client: Any = None) -> Sandbox:
        """Check with the daemon that the sandbox exists (NotFoundError if it does not); returns it."""
        await self._client.request("GET", routes.path("sandboxes", self._id))
        return self

    @live_method
    async def poll(self) -> int | None:
        """The return code if finished, else None."""
        if self._result is None:
            await self._wait_once(0)
        return self._returncode

    @live_method
    async def terminate(self, *, wait: bool = False) -> int | None:
        """Stop the sandbox now (its return code becomes 137); ``wait=True`` returns that code."""
        if self._result is None:
            info = await self._client.request("POST", routes.path("sandboxes", self._id, "terminate"))
            self._absorb(info)
        if wait:
            while self._result is None:
                await self._wait_once(WAIT_SECONDS)
            return self._returncode
        return None

    def detach(self) -> None:
        """Forget the connection to this sandbox; afterwards only wait/poll/terminate work."""
        self._detached = True

    @live_method
    async def _get_task_id(self) -> str:
        """Modal's id of the task that runs the sandbox: here a sandbox is its own task, so its id (agent
        libraries written for Modal call this to name a sandbox)."""
        return self._id

    @live_method
    async def _experimental_stats(
        self, *, since: datetime.datetime | None = None, until: datetime.datetime | None = None
    ) -> SandboxStats:
        """What the sandbox used over [since, until) (defaults: its creation, now): how long it ran then, the
        p50/p90/p99 of its CPU cores and memory GiB (sampled every few seconds), and the billed core- and
        GiB-seconds.  Datetimes without a timezone are local time."""
        if self._persistent is not None:
            raise NotImplementedError("Statistics aren't supported for persistent Sandboxes yet.")
        params: dict[str, str] = {}
        for name, value in (("since", since), ("until", until)):
            if value is not None:
                if not isinstance(value, datetime.datetime):
                    raise InvalidError(f"`{name}` must be a datetime, not {type(value).__name__}")
                params[name] = repr(value.astimezone().timestamp())
        if since is not None and until is not None and since.astimezone() >= until.astimezone():
            raise InvalidError("`since` must be before `until`.")
        d = await self._client.request("GET", routes.path("sandboxes", self._id, "stats"), params=params or None)
        return SandboxStats(
            since=times.to_datetime(d["since_us"]),
            until=times.to_datetime(d["until_us"]),
            duration=datetime.timedelta(seconds=d["duration_seconds"]),
            percentile_stats={
                key: StatsPercentileDistribution(
                    dist["unit"], [StatsPercentile(float(p), float(v)) for p, v in dist["percentiles"]]
                )
                for key, dist in d["percentile_stats"].items()
            },
            cost=None,
            cost_by_resource={},
            billed_cpu_core_seconds=d["billed_cpu_core_seconds"],
            billed_memory_gib_seconds=d["billed_memory_gib_seconds"],
        )

    @live_method
    async def _experimental_set_name(self, name: str) -> None:
        """Name a running sandbox that was created without one (once; the same name again succeeds), so that
        ``Sandbox.from_name(app_name, name)`` finds it.  AlreadyExistsError if a running sandbox of the app holds
        the name; ConflictError if this one has another name or has finished."""
        if not isinstance(name, str):
            raise InvalidError("name must be a string")
        if self._persistent is not None:
            raise NotImplementedError("Names of persistent Sandboxes are set at create.")
        body = dump(SandboxName, name=name)
        await self._client.request("PUT", routes.path("sandboxes", self._id, "name"), json_body=body)

    @live_method
    async def get_tags(self) -> dict[str, str]:
        """The sandbox's tags."""
        if self._persistent is not None:
            raise NotImplementedError("Tags aren't supported for persistent Sandboxes yet.")
        info = await self._client.request("GET", routes.path("sandboxes", self._id))
        self._absorb(info)
        return dict(info["tags"])

    @live_method
    async def set_tags(self, tags: dict[str, str], *, client: Any = None) -> None:
        """Replace the sandbox's tags (``{}`` clears them)."""
        if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise InvalidError("tags must be a dict of str to str")
        if self._persistent is not None:
            raise NotImplementedError("Tags aren't supported for persistent Sandboxes yet.")
        await self._client.request(
            "PUT", routes.path("sandboxes", self._id, "tags"), json_body=dump(TagsUpdate, tags=tags)
        )

    @live_method
    async def tunnels(self, timeout: int = 50) -> dict[int, Tunnel]:
        """Tunnels to the ports declared at create (``encrypted_ports``, ``h2_ports``, ``unencrypted_ports``).

        Returns ``{container_port: Tunnel}``; raises SandboxTimeoutError when
        they are not up within ``timeout`` seconds (or the sandbox has ended).

        Examples:
            sb = shoal.Sandbox.create("python", "-m", "http.server", "8080", encrypted_ports=[8080], app=app)
            print(sb.tunnels()[8080].url)
        """
        self._check_attached()
        if self._tunnels is not None:
            return self._tunnels
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                resp = await self._client.request(
                    "GET",
                    routes.path("sandboxes", self._id, "tunnels"),
                    params={"timeout": str(min(left, WAIT_SECONDS))},
                )
                break
            except SandboxTimeoutError:
                if time.monotonic() >= deadline or self._result is not None:
                    raise
                await self._wait_once(0)
                if self._result is not None:
                    raise
        self._tunnels = TunnelMap(self._client, self._id, resp["tunnels"])
        return self._tunnels

    @live_method
    async def _experimental_pause(self) -> None:
        """Pause a persistent sandbox: its session stops and its files are kept; the next session
        (``_experimental_resume``, or any call that needs the sandbox running) starts from them, its processes
        afresh.  NotImplementedError for a sandbox that is not persistent, as in Modal."""
        self._check_attached()
        if self._persistent is None:
            raise NotImplementedError(PERSISTENT_ONLY.format("_experimental_pause()"))
        self._absorb(await self._client.request("POST", routes.path("sandboxes", self._id, "pause")))

    @live_method
    async def _experimental_resume(self) -> None:
        """Start a paused persistent sandbox's next session from the files the last one left (nothing if one
        runs).  NotImplementedError for a sandbox that is not persistent, as in Modal."""
        self._check_attached()
        if self._persistent is None:
            raise NotImplementedError(PERSISTENT_ONLY.format("_experimental_resume()"))
        self._absorb(await self._client.request("POST", routes.path("sandboxes", self._id, "resume")))

    @property
    def _experimental_sidecars(self) -> SidecarManager:
        """Containers beside this sandbox, each with its own image and outbound policy, that it reaches by name."""
        self._check_attached()
        return SidecarManager(self)

    @live_method
    async def _experimental_snapshot(self) -> SandboxSnapshot:
        """A memory snapshot of this gVisor sandbox: its processes, their memory and its filesystem now (it keeps
        running; it is frozen for the copy).  InvalidError for a runc sandbox (create it with runtime='gvisor' or
        ``_experimental_enable_snapshot=True``)."""
        self._check_attached()
        if self._persistent is not None:
            raise NotImplementedError("Memory snapshots aren't supported for persistent Sandboxes.")
        info = await self._client.request(
            "POST", routes.path("sandboxes", self._id, "memory_snapshot"), idempotent=False
        )
        return SandboxSnapshot(str(info["snapshot_id"]), info)

    @live_method
    async def snapshot_filesystem(self, timeout: int = 55, *, ttl: int | None = 30 * 24 * 3600) -> Image:
        """A new image holding the sandbox's filesystem now (its changes over its image); it keeps running.

        Usable as ``Sandbox.create(image=...)``.  TimeoutError past ``timeout`` seconds.

        Examples:
            image = sb.snapshot_filesystem()
            sb2 = shoal.Sandbox.create(image=image, app=app)
        """
        self._check_attached()
        return await _snapshots.snapshot_filesystem(self._client, self._id, timeout, ttl)

    @live_method
    async def snapshot_directory(
        self,
        path: str | PurePosixPath,
        *,
        timeout: int = 55,
        ttl: int | None = 30 * 24 * 3600,
        _experimental_encryption_key: bytes | None = None,
    ) -> Image:
        """A new image holding one directory of the sandbox (for ``mount_image``)."""
        self._check_attached()
        if _experimental_encryption_key is not None:
            raise not_supported("_experimental_encryption_key", "snapshots are stored unencrypted on the host")
        return await _snapshots.snapshot_directory(self._client, self._id, path, timeout, ttl)

    @live_method
    async def mount_image(
        self, path: str | PurePosixPath, image: Image, *, _experimental_encryption_key: bytes | None = None
    ) -> None:
        """Mount ``image`` at ``path`` (created if missing; replaces what was there; writable, changes stay here).

        Examples:
            image = sb.snapshot_directory("/repo")
            sb2.mount_image("/repo", image)
        """
        self._check_attached()
        if _experimental_encryption_key is not None:
            raise not_supported("_experimental_encryption_key", "snapshots are stored unencrypted on the host")
        await _snapshots.mount_image(self._client, self._id, path, image)

    @live_method
    async def unmount_image(self, path: str | PurePosixPath) -> None:
        """Unmount an image mounted with ``mount_image`` (what was at ``path`` shows again)."""
        self._check_attached()
        await _snapshots.unmount_image(self._client, self._id, path)

    @live_method
    async def reload_volumes(self, *, timeout: int = 55) -> None:
        """Pick up the latest committed state of mounted volumes (shoal's volume mounts are always current)."""
        await self._client.request("POST", routes.path("sandboxes", self._id, "reload_volumes"))

    @live_method
    async def wait_until_ready(self, *, timeout: int = 300) -> None:
        """Wait until the sandbox's ``readiness_probe`` succeeds (it runs inside the sandbox while you wait).

        Raises InvalidError without a probe or for ``timeout <= 0``, ConflictError once the sandbox has finished,
        and ``shoal.exception.TimeoutError`` if it is not ready within ``timeout`` seconds.
        """
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidError(f"timeout must be a positive number of seconds, got {timeout!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise NotReadyError(f"Sandbox {self._id} did not become ready within {timeout} s")
            answer = await self._client.request(
                "POST", routes.path("sandboxes", self._id, "ready"), params={"timeout": f"{min(left, READY_POLL):.3f}"}
            )
            if answer.get("ready"):
                return

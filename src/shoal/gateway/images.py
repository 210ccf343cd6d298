"""``ImageGetOrCreate``/``ImageJoinStreaming``: the client's Dockerfile fragments as shoal images.

The client sends every layer as Dockerfile commands.  Modal's own ``debian_slim`` layer (``FROM
python:X.Y.Z-slim-<suite>``, apt-get of compilers, pip/uv upgrades, the ``sleep 172800`` command) is taken for
shoal's ``debian_slim`` of that Python (decision 0075 says what differs); a ``FROM base`` layer is its base image
plus build steps (RUN, ENV, WORKDIR, CMD, ENTRYPOINT, USER) through shoal's builder, and any other ``FROM``
(``Image.from_registry``) a registry image plus its steps.  A build that does not finish at once gets a handle
id; the client joins it (logs streamed as they come) and creates sandboxes with that id, which the gateway maps
to the image built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modal_proto import api_pb2

from shoal import exception as exc
from shoal.engine.manager import Manager
from shoal.gateway.mounts import GatewayMounts
from shoal.wire import dockerfile, ids
from shoal.wire.images import ImageRef
from shoal.wire.reference import RegistrySource

log = logging.getLogger(__name__)

BUILDER_VERSION = "2025.06"
"""The image builder version the gateway tells clients (``EnvironmentGetOrCreate``): it selects the layers
they send, and the ``debian_slim`` layer of this version is the one recognised below."""
QUICK = 1.0
"""Seconds ``ImageGetOrCreate`` waits for a build before answering with a handle to join."""
KEEP = 3600.0
"""Seconds a finished build's handle stays known (clients create their sandboxes right after the build)."""
JOIN_SLICE = 50.0
"""Seconds one ``ImageJoinStreaming`` call streams before it ends for the client to call again (it allows 55)."""

_MODAL_SLIM = re.compile(r"FROM python:(\d+\.\d+)(?:\.\d+)?-slim-[a-z]+")
_MODAL_SLIM_REST = (
    re.compile(r"RUN apt-get update"),
    re.compile(r"RUN apt-get install -y gcc gfortran build-essential"),
    re.compile(r"RUN pip install --upgrade [a-z0-9 .=<>_-]+"),
    re.compile(r"RUN echo 'debconf debconf/frontend select Noninteractive' \| debconf-set-selections"),
    re.compile(r'CMD \["sleep", "172800"\]'),
)


def image_ref(image: Any, secret_env: Callable[[str], dict[str, str]], context: str | None = None) -> ImageRef:
    """The shoal image a Modal ``Image`` message describes (``secret_env``: a secret's values, by id; ``context``:
    the stored context its ``context_mount_id`` became, for its ``COPY . DEST``)."""
    lines = [line.strip() for line in image.dockerfile_commands if line.strip()]
    unsupported = [
        name
        for name, present in (
            ("context_files", bool(image.context_files)),
            ("secret_ids", bool(image.secret_ids)),
            ("build_function", bool(image.build_function_def) or image.HasField("build_function")),
            ("gpu_config", image.HasField("gpu_config") and bool(image.gpu_config.count)),
            ("volume_mounts", bool(image.volume_mounts)),
        )
        if present
    ]
    if unsupported:
        raise exc.UnimplementedError(f"shoal's gateway cannot build images with {', '.join(unsupported)} yet")
    if not lines:
        raise exc.InvalidError("the image has no Dockerfile commands")
    slim = _MODAL_SLIM.fullmatch(lines[0])
    if slim and not image.base_images and all(any(p.fullmatch(x) for p in _MODAL_SLIM_REST) for x in lines[1:]):
        return ImageRef(kind="debian_slim", python_version=slim.group(1))
    ops = dockerfile.parse("\n".join(lines))
    first = ops[0]
    bases = {b.docker_tag: b.image_id for b in image.base_images}
    if first.kind != "from":
        raise exc.InvalidError(f"the image's Dockerfile commands must start with FROM, not {lines[0][:80]!r}")
    if first.argv[0] in bases:
        return ImageRef(kind="id", image_id=bases[first.argv[0]], steps=_steps(ops[1:], context))
    # ``Image.from_registry`` (and ``from_dockerfile``): a registry image, then its own steps.
    registry: dict[str, Any] = {"tag": first.argv[0]}
    auth = image.image_registry_config
    if auth.secret_id:
        registry["secret_env"] = secret_env(auth.secret_id)
    return ImageRef(kind="registry", registry=RegistrySource.model_validate(registry), steps=_steps(ops[1:], context))


def _steps(ops: list[dockerfile.Op], context: str | None) -> list[Any]:
    steps: list[dict[str, Any]] = []
    for op in ops:
        if op.kind == "copy" and context is not None and [s.rstrip("/") for s in op.sources] in (["."], [""]):
            extra = {k: v for k, v in (("chmod", op.chmod), ("chown", op.chown)) if v is not None}
            steps.append({"op": "copy", "context": context, "dest": op.dest, **extra})
            continue
        if op.kind == "run":
            steps.append({"op": "run", "commands": [op.argv], "env": op.env})
        elif op.kind == "env":
            steps.append({"op": "env", "vars": op.env})
        elif op.kind == "workdir":
            steps.append({"op": "workdir", "path": op.argv[0]})
        elif op.kind in ("cmd", "entrypoint"):
            steps.append({"op": op.kind, "argv": op.argv})
        elif op.kind == "user":
            steps.append({"op": "user", "user": op.argv[0]})
        else:
            raise exc.UnimplementedError(f"shoal's gateway cannot build {op.kind.upper()} (line {op.line}) yet")
    return ImageRef.model_validate({"steps": steps}).steps


@dataclass
class Build:
    """One image build the gateway runs for clients."""

    handle: str
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    image_id: str | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = None
    ended_at: float | None = None
    built: bool = False
    """Whether anything was built (not all cached): the client is then sent to join it, which shows the log."""
    handed_out: bool = False
    """Whether the client was given ``handle`` (then it is recorded in the store once the image is known)."""

    @property
    def done(self) -> bool:
        return self.image_id is not None or self.error is not None


class GatewayImages:
    """The builds clients asked for, and the handle ids they know them by."""

    def __init__(self, mgr: Manager, mounts: GatewayMounts) -> None:
        self.mgr = mgr
        self.mounts = mounts
        self._builds: dict[str, Build] = {}
        """By handle id."""
        self._by_recipe: dict[str, Build] = {}

    def image_id(self, handle: str) -> str:
        """The image a sandbox definition's ``image_id`` names (a handle of a build, or an image's own id)."""
        build = self._builds.get(handle)
        if build is None:
            # A build this daemon no longer holds in memory (it ended long ago, or before a restart).
            return self.mgr.state.image_handle(handle) or handle
        if build.image_id is None:
            raise exc.ConflictError(f"image {handle} is not built yet: wait for ImageJoinStreaming's result")
        return build.image_id

    async def get_or_create(self, req: Any) -> api_pb2.ImageGetOrCreateResponse:
        context = None
        if req.image.context_mount_id:  # Image.add_local_*(copy=True): COPY . DEST of the mount's files
            (step,) = self.mounts.copy_steps([req.image.context_mount_id]) or [{"context": None}]
            context = step["context"]
        ref = image_ref(req.image, lambda secret_id: self.mgr.secrets.resolve([secret_id]), context)
        if ref.kind == "id" and ref.image_id:
            ref = ref.model_copy(update={"image_id": self.image_id(ref.image_id)})
        if req.force_build or req.ignore_cache:
            ref = ref.model_copy(update={"force_build": True})
        key = ref.model_dump_json()
        build = self._by_recipe.get(key)
        self._forget_old()
        if build is None or build.done or ref.force_build:
            # A finished build is not reused: resolving again is all cache hits (and shows no old log).
            build = Build(handle=ids.new("image"))
            self._builds[build.handle] = build
            self._by_recipe[key] = build
            build.task = asyncio.create_task(self._run(build, ref))
        if build.task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(build.task), QUICK)
        if build.image_id is not None and not build.built:
            ok = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
            return api_pb2.ImageGetOrCreateResponse(image_id=build.image_id, result=ok)
        if build.error is not None:
            return api_pb2.ImageGetOrCreateResponse(image_id=build.handle, result=_failed(build.error))
        build.handed_out = True
        if build.image_id is not None:
            self.mgr.state.add_image_handle(build.handle, build.image_id)
        return api_pb2.ImageGetOrCreateResponse(image_id=build.handle)

    def _forget_old(self) -> None:
        """Drop builds that ended more than ``KEEP`` seconds ago (their handles are used right after)."""
        now = time.monotonic()
        for handle, build in list(self._builds.items()):
            if build.ended_at is not None and now - build.ended_at > KEEP:
                del self._builds[handle]
        for key, build in list(self._by_recipe.items()):
            if build.handle not in self._builds:
                del self._by_recipe[key]

    async def _run(self, build: Build, ref: ImageRef) -> None:
        def line(text: str) -> None:
            build.lines.append(str(text))
            if getattr(text, "event", {}).get("status") != "cached":
                build.built = True
            build.changed.set()

        try:
            build.image_id, _ = await self.mgr.images.resolve(ref, line)
            if build.handed_out:  # only a handle the client holds needs to outlive this daemon
                self.mgr.state.add_image_handle(build.handle, build.image_id)
        except Exception as e:
            build.error = str(e) or type(e).__name__
        build.ended_at = time.monotonic()
        build.changed.set()

    async def join(self, req: Any, send: Any) -> None:
        """Stream a build's log lines after ``last_entry_id`` and, once it ends, its result."""
        build = self._builds.get(req.image_id)
        if build is None:
            ok = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
            if self.mgr.state.image(self.image_id(req.image_id)) is None:
                raise exc.NotFoundError(f"no image build {req.image_id!r} on this shoal gateway")
            await send(api_pb2.ImageJoinStreamingResponse(result=ok, eof=True))
            return
        sent = int(req.last_entry_id) if req.last_entry_id.isdigit() else 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(JOIN_SLICE, req.timeout or JOIN_SLICE)
        while True:
            build.changed.clear()
            if sent < len(build.lines):
                logs = [api_pb2.TaskLogs(data=text + "\n") for text in build.lines[sent:]]
                sent = len(build.lines)
                await send(api_pb2.ImageJoinStreamingResponse(task_logs=logs, entry_id=str(sent)))
                continue
            if build.done:
                if build.error is not None:
                    result = _failed(build.error)
                else:
                    result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
                await send(api_pb2.ImageJoinStreamingResponse(result=result, entry_id=str(sent), eof=True))
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return  # the client calls again from entry_id
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(build.changed.wait(), remaining)


def _failed(message: str) -> api_pb2.GenericResult:
    return api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_FAILURE, exception=message)

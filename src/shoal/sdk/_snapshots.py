"""The client side of filesystem snapshots and image mounts (``sb.snapshot_filesystem()`` and friends).

Arguments are checked here with Modal's errors (a non-absolute path or ``/``
for a mount → InvalidError, a non-Image → TypeError, ``ttl <= 0`` →
InvalidError); the daemon checks them again.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from shoal.exception import InvalidError
from shoal.sdk.image import Image
from shoal.sdk.transport import Client
from shoal.wire import routes
from shoal.wire.base import dump
from shoal.wire.snapshots import DirectorySnapshotRequest, MountRequest, SnapshotRequest, UnmountRequest


def _path(path: Any, what: str) -> str:
    if isinstance(path, PurePosixPath):
        path = str(path)
    if not isinstance(path, str):
        raise TypeError(f"{what} must be a str or PurePosixPath, got {type(path).__name__}")
    if not path.startswith("/"):
        raise InvalidError(f"{what} must be an absolute path (starting with '/'), got {path!r}")
    return path


def _timeout_ttl(timeout: Any, ttl: Any) -> dict[str, Any]:
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise InvalidError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
        raise InvalidError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
    return {"timeout": timeout, "ttl": ttl}


async def snapshot_filesystem(client: Client, sandbox_id: str, timeout: int, ttl: int | None) -> Image:
    """A new image of the sandbox's filesystem."""
    body = dump(SnapshotRequest, **_timeout_ttl(timeout, ttl))
    resp = await client.request(
        "POST", routes.path("sandboxes", sandbox_id, "snapshot"), json_body=body, idempotent=False
    )
    return Image._with_id(str(resp["image_id"]))


async def snapshot_directory(client: Client, sandbox_id: str, path: Any, timeout: int, ttl: int | None) -> Image:
    """A new image holding one directory of the sandbox."""
    body = dump(DirectorySnapshotRequest, path=_path(path, "path"), **_timeout_ttl(timeout, ttl))
    resp = await client.request(
        "POST", routes.path("sandboxes", sandbox_id, "snapshot_directory"), json_body=body, idempotent=False
    )
    return Image._with_id(str(resp["image_id"]))


async def mount_image(client: Client, sandbox_id: str, path: Any, image: Any) -> None:
    """Mount ``image`` at ``path`` in the running sandbox."""
    target = _path(path, "path")
    if PurePosixPath(target) == PurePosixPath("/"):
        raise InvalidError("mount_image cannot mount over '/': pick a directory such as /mnt/data")
    if not isinstance(image, Image):
        raise TypeError(f"mount_image needs a shoal.Image, got {type(image).__name__}")
    image_id = await image._resolve(client)
    await client.request(
        "POST",
        routes.path("sandboxes", sandbox_id, "mounts"),
        json_body=dump(MountRequest, path=target, image_id=image_id),
    )


async def unmount_image(client: Client, sandbox_id: str, path: Any) -> None:
    """Unmount the image mounted at ``path``."""
    target = _path(path, "path")
    if PurePosixPath(target) == PurePosixPath("/"):
        raise InvalidError("unmount_image cannot unmount '/'")
    await client.request(
        "POST", routes.path("sandboxes", sandbox_id, "unmount"), json_body=dump(UnmountRequest, path=target)
    )

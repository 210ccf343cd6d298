"""``Image``: what a sandbox's root filesystem is made from.

Images are lazy: a builder call only records a step; the daemon resolves (and
builds) the image when a sandbox needs it.  Resolved ids are cached per
process, so repeating ``Image.debian_slim()`` costs nothing after the first.
"""

from __future__ import annotations

import json
from typing import Any

from shoal.exception import Error, InvalidError, UnimplementedError
from shoal.sdk import output
from shoal.sdk._sync import live_method
from shoal.sdk.transport import Client, default_client, error_from

_resolved: dict[tuple[str, str], str] = {}
"""Image ids by (daemon, recipe): each daemon has its own images."""


class Image:
    """A sandbox image.

    Examples:
        image = shoal.Image.debian_slim()
        sb = shoal.Sandbox.create(image=image, app=app)
    """

    def __init__(self, ref: dict[str, Any], steps: list[dict[str, Any]] | None = None) -> None:
        self._ref = ref
        self._steps = steps or []
        self._object_id: str | None = ref.get("image_id") if ref.get("kind") == "id" else None

    def __repr__(self) -> str:
        return f"Image({self._object_id or self._ref})"

    @property
    def object_id(self) -> str | None:
        """The image's id once resolved (``im-…``)."""
        return self._object_id

    @staticmethod
    def debian_slim(python_version: str | None = None, force_build: bool = False) -> Image:
        """Debian bookworm with Python, ``python`` and ``pip`` on PATH."""
        if python_version is not None and not isinstance(python_version, str):
            raise TypeError(f"python_version must be a string such as '3.11', not {type(python_version).__name__}")
        if force_build:
            raise InvalidError("force_build is not supported for the base image; it is built once per machine")
        return Image({"kind": "debian_slim", "python_version": python_version})

    @staticmethod
    def from_id(image_id: str) -> Image:
        """An image the daemon already has (from ``shoal image ls`` or ``image.object_id``)."""
        if not isinstance(image_id, str) or not image_id.startswith("im-"):
            raise InvalidError(f"{image_id!r} is not an image id (they start with 'im-')")
        return Image({"kind": "id", "image_id": image_id})

    def _step(self, name: str, **args: Any) -> Image:
        return Image(self._ref, [*self._steps, {"op": name, **args}])

    def pip_install(self, *packages: str | list[str], **kwargs: Any) -> Image:
        """Install Python packages with pip (a new cached layer)."""
        return self._step("pip_install", packages=list(packages), **kwargs)

    def apt_install(self, *packages: str | list[str], **kwargs: Any) -> Image:
        """Install Debian packages (a new cached layer)."""
        return self._step("apt_install", packages=list(packages), **kwargs)

    def run_commands(self, *commands: str | list[str], **kwargs: Any) -> Image:
        """Run shell commands (a new cached layer)."""
        return self._step("run_commands", commands=list(commands), **kwargs)

    def _wire_ref(self) -> dict[str, Any]:
        if self._steps:
            names = ", ".join(sorted({s["op"] for s in self._steps}))
            raise UnimplementedError(
                f"image build steps ({names}) are not supported by this shoal version yet;"
                " use Image.debian_slim() or Image.from_id()"
            )
        return dict(self._ref)

    async def _resolve(self, client: Client) -> str:
        """The image id, asking the daemon (which builds what is missing) on first use."""
        if self._ref.get("kind") == "id" and self._object_id is not None:
            return self._object_id
        ref = self._wire_ref()
        key = (client.identity, json.dumps(ref, sort_keys=True))
        cached = _resolved.get(key)
        if cached is not None:
            self._object_id = cached
            return cached
        final: dict[str, Any] = {}
        buf = b""
        async for chunk in client.stream("POST", "/v1/images/resolve", json_body=ref):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                item = json.loads(line)
                if "log" in item:
                    output.log_line(str(item["log"]))
                else:
                    final = item
        if "error" in final:
            raise error_from(400, json.dumps(final).encode())
        if "image_id" not in final:
            raise Error("the daemon ended the image build without a result")
        self._object_id = str(final["image_id"])
        _resolved[key] = self._object_id
        return self._object_id

    @live_method
    async def build(self, app: Any = None) -> Image:
        """Resolve (and build) the image now rather than at the first sandbox."""
        await self._resolve(default_client())
        return self

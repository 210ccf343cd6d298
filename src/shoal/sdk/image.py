"""``Image``: what a sandbox's root filesystem is made from.

Images are lazy: a builder call only records a step; the daemon resolves (and
builds) the image when a sandbox needs it.  Resolved ids are cached per
process, so repeating ``Image.debian_slim()`` costs nothing after the first.
"""

from __future__ import annotations

from typing import Any

from shoal.exception import InvalidError
from shoal.sdk import _image_resolve
from shoal.sdk._image_build import ImageBuilder, PendingStep
from shoal.sdk._sync import live_function, live_method
from shoal.sdk._unbuilt import ImageUnbuilt
from shoal.sdk.dashboard import DashboardLink
from shoal.sdk.logs import ImageLogs
from shoal.sdk.secret import Secret
from shoal.sdk.transport import Client, default_client
from shoal.wire import reference
from shoal.wire.pythons import check_python_version

_resolved: dict[tuple[str, str], str] = {}
"""Image ids by (daemon, recipe): each daemon has its own images."""


class Image(ImageBuilder, ImageUnbuilt, DashboardLink):
    """A sandbox image.

    Examples:
        image = shoal.Image.debian_slim()
        sb = shoal.Sandbox.create(image=image, app=app)
    """

    def __init__(self, ref: dict[str, Any], steps: list[PendingStep] | None = None) -> None:
        self._ref = ref
        self._steps = steps or []
        self._object_id: str | None = ref.get("image_id") if ref.get("kind") == "id" else None

    def __repr__(self) -> str:
        return f"Image({self._object_id or self._ref})"

    @property
    def client(self) -> Client:
        """The client this object reaches the daemon with (Modal's ``.client``): pass it as ``client=`` to
        other calls."""
        return default_client()

    @property
    def object_id(self) -> str | None:
        """The image's id once resolved (``im-…``)."""
        return self._object_id

    def _dashboard_page(self) -> str:
        return "images"

    @property
    def logs(self) -> ImageLogs:
        """What the image's build steps printed: ``image.logs.fetch(layers=1)`` (the last step's lines; None: every
        step's) and ``image.logs.tail(entries=100)``; the image is built first if it is not yet."""
        return ImageLogs(default_client(), self)

    @staticmethod
    def debian_slim(python_version: str | None = None, force_build: bool = False) -> Image:
        """Debian with Python, ``python`` and ``pip`` on PATH: 3.11 on bookworm (the default), 3.9 on bullseye,
        3.13 on trixie, 3.14 on forky (Debian testing); another version is an ``InvalidError`` that lists these."""
        if python_version is not None and not isinstance(python_version, str):
            raise TypeError(f"python_version must be a string such as '3.11', not {type(python_version).__name__}")
        ref: dict[str, Any] = {"kind": "debian_slim", "python_version": python_version}
        if force_build:
            ref["force_build"] = True  # rebuilds every step on it; the base itself is bootstrapped once per machine
        return Image(ref)

    @staticmethod
    def from_scratch(force_build: bool = False) -> Image:
        """An empty image: nothing but what you add (``add_local_*``), e.g. to ``sb.mount_image`` data.

        A sandbox can run it too (shoal's agent needs nothing from the image), though it has no shell or tools.
        """
        ref: dict[str, Any] = {"kind": "scratch"}
        if force_build:
            ref["force_build"] = True
        return Image(ref)

    @live_function
    async def from_id(image_id: str, client: Any = None) -> Image:  # static
        """An image the daemon already has (from ``shoal image ls`` or ``image.object_id``); also ``.aio``."""
        return Image._with_id(image_id)

    @staticmethod
    def _with_id(image_id: str) -> Image:
        if not isinstance(image_id, str) or not image_id.startswith("im-"):
            raise InvalidError(f"{image_id!r} is not an image id (they start with 'im-')")
        return Image({"kind": "id", "image_id": image_id})

    @staticmethod
    def from_registry(
        tag: str,
        secret: Secret | None = None,
        *,
        setup_dockerfile_commands: list[str] | None = None,
        force_build: bool = False,
        add_python: str | None = None,
        **kwargs: Any,
    ) -> Image:
        """An image from a registry (linux/amd64), pulled by the daemon when first used; cached by digest.

        ``secret`` holds ``REGISTRY_USERNAME`` and ``REGISTRY_PASSWORD`` for a
        private registry.  The image needs no Python: shoal's agent brings
        what it needs.  Registries on this machine (``localhost``,
        ``127.0.0.1``) are reached over plain HTTP.

        Examples:
            image = shoal.Image.from_registry("python:3.11-slim")
            image = shoal.Image.from_registry("ghcr.io/org/app:v1", secret=shoal.Secret.from_name("ghcr"))
        """
        try:
            reference.parse(tag)
        except reference.BadReference as exc:
            raise InvalidError(str(exc)) from None
        if add_python is not None:
            check_python_version(add_python)  # InvalidError listing the versions there are
        if kwargs:
            raise InvalidError(f"Image.from_registry got unexpected arguments: {', '.join(sorted(kwargs))}")
        source: dict[str, Any] = {"tag": tag}
        if add_python is not None:
            source["add_python"] = add_python
        if secret is not None:
            if not isinstance(secret, Secret):
                raise InvalidError(f"secret must be a shoal.Secret, got {type(secret).__name__}")
            if secret.name is not None:
                source["secret_name"] = secret.name
            else:
                source["secret_env"] = secret._as_env()
        ref: dict[str, Any] = {"kind": "registry", "registry": source}
        if force_build:
            ref["force_build"] = True  # pull again even when this digest was pulled before
        image = Image(ref)
        if setup_dockerfile_commands:
            image = image.dockerfile_commands(*setup_dockerfile_commands)
        return image

    async def _resolve(self, client: Client) -> str:
        """The image id, asking the daemon (which builds what is missing) on first use."""
        if self._ref.get("kind") == "id" and self._object_id is not None and not self._steps:
            return self._object_id
        self._object_id = await _image_resolve.resolve(self._ref, self._steps, client, _resolved)
        return self._object_id

    def _forget(self, client: Client) -> bool:
        """Drop the ids this process remembers for the daemon (one was removed there); False for an image that
        is only an id, which has nothing to resolve again."""
        if self._ref.get("kind") == "id" and not self._steps:
            return False
        self._object_id = None
        for key in [k for k in _resolved if k[0] == client.identity]:
            del _resolved[key]
        return True

    @live_method
    async def hydrate(self, client: Any = None) -> Image:
        """Resolve (and build) the image now, as ``build`` does; returns the image."""
        await self._resolve(default_client())
        return self

    @live_method
    async def build(self, app: Any = None) -> Image:
        """Resolve (and build) the image now rather than at the first sandbox."""
        await self._resolve(default_client())
        return self

"""Members of Modal's API that shoal does not offer, present with Modal's signature so that code written for
Modal fails where it calls one, with an error that says why, instead of an ``AttributeError`` (or a silent
ignore).  ``tests/compat`` lists them apart from the members that work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from shoal.exception import UnimplementedError

F = TypeVar("F", bound=Callable[..., Any])

FUNCTIONS = "Modal Functions, Classes, web servers and deployments do not exist in shoal, which runs sandboxes only"
INTERACTIVE = (
    "attaching this program's terminal is not built; from a terminal, `shoal sandbox shell ID` or"
    " `shoal sandbox exec -it ID CMD` does it"
)
PUBLISHED = "named, published images are a Modal workspace feature; build the image from its recipe instead"


def unimplemented(reason: str) -> Callable[[F], F]:
    """Make the decorated function (whose body is never run) raise ``UnimplementedError`` naming itself and
    ``reason``; its ``.aio`` form raises the same."""

    def wrap(fn: F) -> F:
        def message() -> str:
            return f"{fn.__qualname__} is not available in shoal: {reason}"

        @functools.wraps(fn)
        def refuse(*args: Any, **kwargs: Any) -> NoReturn:
            raise UnimplementedError(message())

        async def refuse_aio(*args: Any, **kwargs: Any) -> NoReturn:
            raise UnimplementedError(message())

        refuse.aio = refuse_aio  # type: ignore[attr-defined]
        refuse.__shoal_unimplemented__ = reason  # type: ignore[attr-defined]
        return refuse  # type: ignore[return-value]

    return wrap


CLOUD_AUTH = "cloud registry credentials are not built; from_registry(tag, secret=) takes a user and password"
MAMBA = "micromamba and its conda channels are not built (a host limited to PyPI, Debian and npm cannot reach them)"
PRIVATE_REPOS = "private git repositories are not built; pip_install() of a git+https URL with a token works"


class AppUnbuilt:
    """What Modal's ``App`` does besides sandboxes."""

    @unimplemented(FUNCTIONS)
    def function(self, **options: Any) -> Any: ...

    @unimplemented(FUNCTIONS)
    def cls(self, **options: Any) -> Any: ...

    @unimplemented(FUNCTIONS)
    def server(self, **options: Any) -> Any: ...

    @unimplemented(FUNCTIONS)
    def local_entrypoint(self, *, name: str | None = None) -> Any: ...

    @unimplemented(FUNCTIONS)
    def include(self, /, other_app: Any, inherit_tags: bool = True) -> Any: ...

    @unimplemented(FUNCTIONS)
    def deploy(
        self,
        *,
        name: str | None = None,
        environment_name: str | None = None,
        tag: str = "",
        client: Any = None,
        strategy: str = "rolling",
    ) -> Any: ...

    @property
    def registered_functions(self) -> dict[str, Any]:
        """Modal Functions of this app: none (shoal runs sandboxes only)."""
        return {}

    @property
    def registered_classes(self) -> dict[str, Any]:
        """Modal Classes of this app: none (shoal runs sandboxes only)."""
        return {}

    @property
    def registered_entrypoints(self) -> dict[str, Any]:
        """Local entrypoints of this app: none (shoal runs sandboxes only)."""
        return {}

    @property
    def registered_web_endpoints(self) -> list[str]:
        """Web endpoints of this app: none (shoal runs sandboxes only)."""
        return []


class ImageUnbuilt:
    """Modal ``Image`` members that shoal does not build."""

    @unimplemented(FUNCTIONS)
    def run_function(self, raw_f: Callable[..., Any], **options: Any) -> Any: ...

    @unimplemented(INTERACTIVE)
    def shell(self, shell_commands: list[str]) -> Any: ...

    @staticmethod
    @unimplemented(CLOUD_AUTH)
    def from_aws_ecr(
        tag: str,
        secret: Any = None,
        *,
        setup_dockerfile_commands: tuple[str, ...] = (),
        force_build: bool = False,
        add_python: str | None = None,
        **kwargs: Any,
    ) -> Any: ...

    @staticmethod
    @unimplemented(CLOUD_AUTH)
    def from_gcp_artifact_registry(
        tag: str,
        secret: Any = None,
        *,
        setup_dockerfile_commands: tuple[str, ...] = (),
        force_build: bool = False,
        add_python: str | None = None,
        **kwargs: Any,
    ) -> Any: ...

    @staticmethod
    @unimplemented(PUBLISHED)
    def from_name(name: str, *, environment_name: str | None = None, client: Any = None) -> Any: ...

    @unimplemented(PUBLISHED)
    def publish(
        self,
        name: str,
        *,
        environment_name: str | None = None,
        experimental_options: dict[str, Any] | None = None,
        client: Any = None,
    ) -> None: ...

    @staticmethod
    @unimplemented(MAMBA)
    def micromamba(python_version: str | None = None, force_build: bool = False) -> Any: ...

    @unimplemented(MAMBA)
    def micromamba_install(
        self,
        *packages: str | list[str],
        spec_file: str | None = None,
        channels: tuple[str, ...] = (),
        force_build: bool = False,
        env: dict[str, str | None] | None = None,
        secrets: Any = None,
        gpu: str | None = None,
    ) -> Any: ...

    @unimplemented(PRIVATE_REPOS)
    def pip_install_private_repos(
        self,
        *repositories: str,
        git_user: str,
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        gpu: str | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Any = None,
        force_build: bool = False,
    ) -> Any: ...


class ProcessUnbuilt:
    """Modal ``ContainerProcess`` members that shoal does not build."""

    @unimplemented(INTERACTIVE)
    def attach(self) -> None: ...

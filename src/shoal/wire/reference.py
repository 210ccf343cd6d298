"""Registry image references (``python:3.11-slim``, ``ghcr.io/org/app@sha256:…``) and the pull request's shape.

Parsed as Docker parses them: a name without a registry host is on Docker
Hub (``docker.io``, ``library/`` for one-component names), a missing tag is
``latest``.  Anything outside the grammar is refused here, before a
reference reaches a command line.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

DOCKER_HUB = "docker.io"
TAG_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
DIGEST_RE = re.compile(r"\Asha256:[0-9a-f]{64}\Z")
COMPONENT_RE = re.compile(r"\A[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
HOST_RE = re.compile(rf"\A(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?\Z")
MAX_REFERENCE = 512


class BadReference(ValueError):
    """Not a valid image reference."""


@dataclass(frozen=True)
class Reference:
    """A parsed image reference."""

    host: str
    """Registry host, with its port if any (``docker.io``, ``127.0.0.1:5000``)."""
    path: str
    """Repository path (``library/python``)."""
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """``host/path``."""
        return f"{self.host}/{self.path}"

    def transport(self, digest: str | None = None) -> str:
        """The ``docker://`` reference for skopeo, pinned to ``digest`` when given."""
        if digest or self.digest:
            return f"docker://{self.repository}@{digest or self.digest}"
        return f"docker://{self.repository}:{self.tag or 'latest'}"

    @property
    def loopback(self) -> bool:
        """Whether the registry is on this machine (contacted without TLS verification, as Docker does)."""
        host = self.host.rsplit(":", 1)[0] if not self.host.endswith("]") else self.host
        host = host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse(ref: str) -> Reference:
    """Parse an image reference; BadReference with the reason if it is not one."""
    if not isinstance(ref, str) or not ref:
        raise BadReference("an image reference must be a non-empty string such as 'python:3.11-slim'")
    if len(ref) > MAX_REFERENCE or any(c.isspace() or ord(c) < 32 for c in ref):
        raise BadReference(f"{ref[:80]!r} is not an image reference (too long or contains spaces)")
    name, at, digest = ref.partition("@")
    if at and not DIGEST_RE.match(digest):
        raise BadReference(f"{ref!r}: the digest must be sha256:<64 hex digits>")
    tag: str | None = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not TAG_RE.match(tag):
            raise BadReference(f"{ref!r}: invalid tag {tag!r}")
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost" or parts[0].startswith("[")):
        host, parts = parts[0], parts[1:]
        if not HOST_RE.match(host):
            raise BadReference(f"{ref!r}: invalid registry host {host!r}")
    else:
        host = DOCKER_HUB
        if len(parts) == 1:
            parts = ["library", *parts]
    if host == "index.docker.io":
        host = DOCKER_HUB
    for p in parts:
        if not COMPONENT_RE.match(p):
            raise BadReference(f"{ref!r}: invalid repository name component {p!r} (lowercase letters, digits, . _ -)")
    if tag is None and not digest:
        tag = "latest"
    return Reference(host, "/".join(parts), tag, digest or None)


class RegistrySource(BaseModel):
    """``Image.from_registry(tag, secret=)`` as the SDK sends it (secrets never stored with the image)."""

    model_config = ConfigDict(extra="forbid")

    tag: Annotated[str, Field(min_length=1, max_length=MAX_REFERENCE)]
    """The image reference, e.g. ``python:3.11-slim`` or ``registry.example.com/team/app@sha256:…``."""
    secret_env: dict[str, str] = {}
    """REGISTRY_USERNAME and REGISTRY_PASSWORD from a ``Secret.from_dict`` (or other unnamed) secret."""
    secret_name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """A named secret (``Secret.from_name``) holding them, looked up by the daemon."""
    add_python: Annotated[str, Field(min_length=1, max_length=16)] | None = None
    """``add_python="3.X"``: a self-contained Python laid over the image (``shoal.images.portable_python``)."""

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        parse(v)
        return v

"""The API's paths, written once for the SDK, the CLI's admin client and the tests.

Path parameters are ids and names the caller already checked; they are quoted so that a stray ``/`` or ``?``
in one cannot reach another route.
"""

from __future__ import annotations

from urllib.parse import quote

PREFIX = "/v1"
STATUS = f"{PREFIX}/status"
SANDBOXES = f"{PREFIX}/sandboxes"
SECRETS = f"{PREFIX}/secrets"
VOLUMES = f"{PREFIX}/volumes"
IMAGES_IMPORT = f"{PREFIX}/images/import"
IMAGE_STORE = f"{PREFIX}/image-store"
IMAGE_STORE_PRUNE = f"{PREFIX}/image-store/prune"


def _part(value: str) -> str:
    return quote(value, safe="")


def sandbox(sandbox_id: str) -> str:
    """One sandbox."""
    return f"{SANDBOXES}/{_part(sandbox_id)}"


def entrypoint_output(sandbox_id: str, fd: int) -> str:
    """The entrypoint's stdout (1) or stderr (2), readable from a byte offset."""
    return f"{sandbox(sandbox_id)}/execs/entrypoint/output/{fd}"


def image(image_id: str) -> str:
    """One image."""
    return f"{PREFIX}/images/{_part(image_id)}"


def secret_by_name(name: str) -> str:
    """A named secret."""
    return f"{SECRETS}/by-name/{_part(name)}"


def volume_by_name(name: str) -> str:
    """A named volume."""
    return f"{VOLUMES}/by-name/{_part(name)}"

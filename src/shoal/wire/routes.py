"""The API's paths, written once for the SDK, the CLI's admin client and the tests.

``path("sandboxes", sandbox_id, "execs")`` is ``/v1/sandboxes/<id>/execs``.  Every part is quoted, so a stray
``/`` or ``?`` in an id or a name can never reach another route.
"""

from __future__ import annotations

from urllib.parse import quote

PREFIX = "/v1"


def path(*parts: str | int) -> str:
    """The API path made of ``parts``, each quoted as one path segment."""
    return PREFIX + "".join("/" + quote(str(part), safe="") for part in parts)


STATUS = path("status")
GATEWAY = path("gateway")
CLUSTER = path("cluster")
DASHBOARD = path("dashboard")
SANDBOXES = path("sandboxes")
SECRETS = path("secrets")
VOLUMES = path("volumes")
IMAGE_STORE = path("image-store")
